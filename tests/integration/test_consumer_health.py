"""A worker whose consumer stops taking messages while work waits is reported unhealthy (issue
12, item 2).  The fault is real: the worker's broker connections go through a TCP proxy that
stops forwarding on them (a half-open connection: Redis's protocol has no heartbeat to notice),
while its heartbeat reaches the registry directly.  The process, its heartbeat and its registry
entry all stay alive; only the consumer is wedged."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
import redis

from celery_ext.model import TaskStatus
from tests.conftest import TEST_TASKS
from tests.support.scrape import poll
from tests.support.services import REDIS_HOST, REDIS_PORT
from tests.support.tcpproxy import FreezableProxy
from tests.support.workers import subprocess_env


@pytest.fixture
def proxy() -> Iterator[FreezableProxy]:
    p = FreezableProxy(REDIS_PORT, REDIS_HOST)
    yield p
    p.close()


def entry(c, name: str):
    found = [w for w in c.runtime.router.registry.all() if w.id.startswith(name + "@")]
    return found[0] if found else None


def test_a_worker_whose_consumer_is_wedged_is_reported_unhealthy(make_cluster, proxy) -> None:
    c = make_cluster(
        executors=TEST_TASKS,
        broker={"url": f"redis://127.0.0.1:{proxy.port}/0"},
        scheduler={"registry_url": f"redis://{REDIS_HOST}:{REDIS_PORT}/0"},
        worker={"stall_after": 2.0, "heartbeat_interval": 0.5},
    )
    worker = c.worker(concurrency=2)
    wid = worker.hostname.split("@")[0]
    poll(lambda: entry(c, wid) is not None, 20, "the worker's registry entry")
    assert entry(c, wid).healthy  # idle, nothing waits: healthy

    assert proxy.freeze() > 0  # every connection the worker has to the broker goes silent
    tasks = [c.manager.submit("echo", {"i": i}) for i in range(3)]  # this producer's first: it passes
    poll(lambda: not entry(c, wid).healthy, 30, "the worker to be reported unhealthy")
    w = entry(c, wid)
    assert w.online and "consumer stalled" in w.problem, w
    assert all(c.manager.get(t.task_id).status is not TaskStatus.SUCCEEDED for t in tasks)
    worker.wait_for_log("worker unhealthy: its consumer took no message", 10)
    shown = subprocess.run(
        [sys.executable, "-m", "celery_ext.cli", "workers", "--json"],
        env=subprocess_env(CELERY_EXT_CONFIG=str(c.config_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    mine = [w for w in json.loads(shown.stdout) if w["id"].startswith(wid + "@")]
    assert mine and mine[0]["healthy"] is False and "consumer stalled" in mine[0]["problem"], shown

    proxy.thaw()
    for t in tasks:
        assert c.manager.wait(t.task_id, 60).status is TaskStatus.SUCCEEDED
    poll(lambda: entry(c, wid).healthy, 20, "the worker to be healthy again")
    assert worker.alive()


def test_progress_reports_a_stall_only_while_work_waits_slots_are_free_and_nothing_is_taken(redis_url) -> None:
    from celery_ext.routing.seat import Progress
    from celery_ext.routing.workers import WorkerInfo
    from tests.support.services import unique

    client = redis.Redis.from_url(redis_url)
    key = unique("stall-q.")
    info = WorkerInfo(id="w@test", queue=key, capacity=2)
    progress = Progress([key], stall_after=10.0)
    try:
        progress.check(client, info, reserved=0, now=0.0)
        progress.check(client, info, reserved=0, now=100.0)
        assert info.healthy  # nothing waits: idle, not stalled
        client.lpush(key, b"{}")
        progress.check(client, info, reserved=0, now=100.0)
        progress.check(client, info, reserved=2, now=200.0)
        assert info.healthy  # every slot busy: not the consumer's fault
        progress.check(client, info, reserved=1, now=201.0)
        progress.check(client, info, reserved=1, now=209.0)
        assert info.healthy  # not yet stall_after
        progress.check(client, info, reserved=1, now=212.0)
        assert not info.healthy and "consumer stalled" in info.problem
        progress.taken += 1  # it took a message
        progress.check(client, info, reserved=1, now=213.0)
        assert info.healthy and info.problem == ""
    finally:
        client.delete(key)
