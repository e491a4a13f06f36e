"""The outbox guarantee with records written QUEUED before their publish (a Redis broker): a
producer SIGKILLed between its insert and its publish, and a publish to a broker that is down.
Nothing is lost, nothing runs twice; on RabbitMQ records are still written PENDING and marked
after the publish.  The broker that goes down is a private Redis (never the shared one)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import redis

from celery_ext.dispatch import queue_name
from celery_ext.errors import PublishError
from celery_ext.model import Task, TaskStatus
from celery_ext.routing.stranded import queue_keys
from celery_ext.scheduler import Scheduler, TickReport
from tests.conftest import TEST_TASKS, Cluster
from tests.support.private import PrivateRedis
from tests.support.services import RABBIT_URL, REDIS_HOST, REDIS_PORT, require, unique
from tests.support.workers import subprocess_env

pytestmark = pytest.mark.timeout(180)


def records(c: Cluster) -> list[Task]:
    return sorted(c.manager.list(limit=100).items, key=lambda t: t.created_at)


def tick_until(scheduler: Scheduler, done: int, what: str) -> list[TickReport]:
    """Rounds of the leader until ``what`` (a field of the report) holds ``done`` tasks in all."""
    reports: list[TickReport] = []
    deadline = time.monotonic() + 60
    while sum(len(getattr(r, what)) for r in reports) < done:
        assert time.monotonic() < deadline, f"{what}: only {reports}"
        reports.append(scheduler.tick())
        time.sleep(0.3)
    return reports


def ran_once_each(c: Cluster, tasks: list[Task], runs: str) -> None:
    """Each of ``tasks`` (type ``record``, pushing its ``value`` onto the Redis list ``runs``)
    succeeded, and ran once: the list counts every run, also one whose outcome was refused."""
    for t in tasks:
        done = c.manager.wait(t.task_id, 60)
        assert (done.status, done.attempt) == (TaskStatus.SUCCEEDED, 1), done
    time.sleep(1)  # a second copy of a message, had one been run, would have run by now
    ran = redis.Redis(host=REDIS_HOST, port=REDIS_PORT).lrange(runs, 0, -1)
    assert sorted(v.decode() for v in ran) == sorted(t.payload["value"] for t in tasks)


def test_a_producer_killed_between_insert_and_publish_leaves_queued_records_the_scheduler_publishes(
    make_cluster,
) -> None:
    c = make_cluster(executors=TEST_TASKS, scheduler={"lost_after": 1.0, "interval": 0.2, "publish_grace": 0.5})
    c.runtime.storage.migrate()
    runs = unique("runs:")
    for values in (["one"], ["b1", "b2", "b3"]):  # submit, then submit_many
        payloads = [{"key": runs, "value": v} for v in values]
        run = subprocess.run(
            [sys.executable, "-m", "tests.support.dying_producer", "record", json.dumps(payloads)],
            env=subprocess_env(CELERY_EXT_CONFIG=str(c.config_path)),
            cwd=c.tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == -signal.SIGKILL, run.stderr
    orphans = records(c)
    assert [t.payload["value"] for t in orphans] == ["one", "b1", "b2", "b3"]
    assert all(t.status is TaskStatus.QUEUED and t.queued_at == t.created_at for t in orphans), orphans
    broker = redis.Redis.from_url(c.data["broker"]["url"])
    keys = queue_keys(queue_name(c.data["app"]["name"], "record"), c.runtime.celery.conf.broker_transport_options)
    assert sum(broker.llen(k) for k in keys) == 0  # no message went out

    c.worker()
    reports = tick_until(Scheduler(c.runtime), len(orphans), "republished")
    assert sorted(t for r in reports for t in r.republished) == sorted(t.task_id for t in orphans)
    assert [t for r in reports for t in r.published] == []  # QUEUED: not the outbox duty's (PENDING)
    ran_once_each(c, orphans, runs)


def test_a_publish_to_a_broker_that_is_down_leaves_pending_records_the_outbox_publishes(
    make_cluster,
    private_redis: PrivateRedis,
) -> None:
    c = make_cluster(
        executors=TEST_TASKS, broker={"url": private_redis.url}, scheduler={"publish_grace": 1, "interval": 0.2}
    )
    c.manager.ensure_schema()
    runs = unique("runs:")  # on the shared Redis: the task writes there, whatever the broker
    private_redis.kill()
    with pytest.raises(PublishError):
        c.manager.submit("record", {"key": runs, "value": "one"})
    with pytest.raises(PublishError):
        c.manager.submit_many([{"task_type": "record", "payload": {"key": runs, "value": f"b{i}"}} for i in range(3)])
    unpublished = records(c)
    assert [(t.status, t.queued_at) for t in unpublished] == [(TaskStatus.PENDING, None)] * 4

    private_redis.start()  # the same port, empty
    c.worker()
    reports = tick_until(Scheduler(c.runtime), len(unpublished), "published")
    assert sorted(t for r in reports for t in r.published) == sorted(t.task_id for t in unpublished)
    ran_once_each(c, unpublished, runs)


def test_on_rabbitmq_records_are_written_pending_and_marked_queued_after_the_publish(make_cluster) -> None:
    require("RabbitMQ", "127.0.0.1", 5672)
    c = make_cluster(executors=TEST_TASKS, broker={"url": RABBIT_URL})
    assert not c.runtime.lifecycle.queued_before_publish
    spec = {"task_type": "echo", "payload": {"k": 1}}
    ((built, _),) = c.manager.build_specs([spec])
    assert (built.status, built.queued_at) == (TaskStatus.PENDING, None)
    try:
        one = c.manager.submit("echo", spec["payload"])
        many = c.manager.submit_many([spec, spec])
        assert all(t.status is TaskStatus.QUEUED and t.queued_at is not None for t in [one, *many])
        stored = {t.task_id: t for t in records(c)}  # read after the marks (``get`` and ``list`` flush them)
        assert all(stored[t.task_id].status is TaskStatus.QUEUED for t in [one, *many])
        assert all((r := stored[t.task_id]).queued_at and r.queued_at > r.created_at for t in [one, *many])
    finally:  # no worker runs them: leave nothing on the shared server (its own queue only)
        with c.runtime.celery.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue_name(c.data["app"]["name"], "echo"))
