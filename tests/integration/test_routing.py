"""Routing through real worker processes: three workers with different capacities, weights and
supported types, and producers using different strategies against the same workers."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from celery_ext.config import parse_config
from celery_ext.factory import Runtime, create_app
from celery_ext.model import TaskStatus
from celery_ext.runtime import runtime_of
from tests.conftest import Cluster, cluster_data, storage_section
from tests.support.routing_tasks import runs
from tests.support.services import REDIS_HOST, REDIS_PORT, require, unique

ROUTING_TASKS = [{"type": "python", "config": {"modules": ["tests.support.routing_tasks"]}}]
HEARTBEAT = 1.0
# name -> (pool size, weight, supported types)
WORKERS = {
    "wa": (2, 3, "rt_slow,rt_other,echo"),
    "wb": (2, 1, "rt_slow,echo"),
    "wc": (1, 1, "rt_slow,rt_other"),
}


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory, database_urls: dict[str, str]) -> Iterator[Cluster]:
    require("Redis", REDIS_HOST, REDIS_PORT)
    directory = tmp_path_factory.mktemp("routing")
    data = cluster_data(
        unique("ce"),
        f"redis://{REDIS_HOST}:{REDIS_PORT}/0",
        storage_section("sqlite", database_urls),
        {"executors": ROUTING_TASKS, "worker": {"heartbeat_interval": HEARTBEAT}},
    )
    cluster = Cluster(directory, data)
    cluster.ids = {}  # type: ignore[attr-defined]
    cluster.procs = {}  # type: ignore[attr-defined]
    for name, (size, weight, types) in WORKERS.items():
        # -c 1 everywhere: --capacity must set the pool size.
        w = cluster.worker(
            hostname=f"{name}@%h",
            concurrency=1,
            extra_args=["--capacity", str(size), "--weight", str(weight), "--supported-types", types],
        )
        cluster.ids[name] = w.hostname.replace("%h", _host())  # type: ignore[attr-defined]
        cluster.procs[name] = w  # type: ignore[attr-defined]
    yield cluster
    cluster.close()


def _host() -> str:
    import socket

    return socket.gethostname()


def producer(cluster: Cluster, strategy: str, closing: list[Runtime]) -> Runtime:
    data = {**cluster.data, "scheduler": {"load_balance_strategy": strategy}}
    rt: Runtime = runtime_of(create_app(parse_config(data, source=str(cluster.config_path))))
    closing.append(rt)
    return rt


@pytest.fixture
def closing() -> Iterator[list[Runtime]]:
    runtimes: list[Runtime] = []
    yield runtimes
    for rt in runtimes:
        rt.storage.close()


def wait_all(rt: Runtime, ids: list[str], timeout: float = 60) -> list[Any]:
    return [rt.manager.wait(i, timeout) for i in ids]


def test_workers_register_with_their_capacity_weight_types_and_queue(three: Cluster) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "celery_ext.cli", "--config", str(three.config_path), "workers", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    listed = {w["id"]: w for w in json.loads(out.stdout)}
    assert set(listed) == set(three.ids.values())
    for name, (size, weight, types) in WORKERS.items():
        w = listed[three.ids[name]]
        assert (w["capacity"], w["weight"], w["supported_types"]) == (size, weight, sorted(types.split(",")))
        assert w["queue"] == f"{three.data['app']['name']}.worker.{three.ids[name]}" and w["online"]
        assert 0 <= w["in_flight"] <= size
        children = subprocess.run(["pgrep", "-P", str(three.procs[name].pid)], capture_output=True, text=True)
        assert len(children.stdout.split()) == size  # pool processes
    # A worker refuses to start with a type it cannot run, naming it.
    bad = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "celery_ext", "worker", "--supported-types", "rt_slow,nope"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**__import__("os").environ, "CELERY_EXT_CONFIG": str(three.config_path)},
    )
    assert bad.returncode != 0 and "worker.supported_types: unknown task type(s) 'nope'" in bad.stdout + bad.stderr


def test_least_task_burst_keeps_every_slot_busy_while_work_waits(three: Cluster, closing: list[Runtime]) -> None:
    burst(three, producer(three, "least_task", closing), n=30, seconds=0.4)


@pytest.mark.slow
def test_least_task_burst_of_300(three: Cluster, closing: list[Runtime]) -> None:
    burst(three, producer(three, "least_task", closing), n=300, seconds=0.2)


def burst(three: Cluster, rt: Runtime, n: int, seconds: float) -> None:
    """Submit ``n`` slow tasks at once; check balance, in-flight bounds and idle slots."""
    key = unique("burst:")
    capacity = {three.ids[name]: spec[0] for name, spec in WORKERS.items()}
    registry = rt.router.registry
    peaks: Counter[str] = Counter()
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            for w in registry.all():
                peaks[w.id] = max(peaks[w.id], w.in_flight)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    submitted = time.time()
    try:
        tasks = rt.manager.submit_many([{"task_type": "rt_slow", "payload": {"key": key, "seconds": seconds}}] * n)
        done = wait_all(rt, [t.task_id for t in tasks], timeout=60 + n * seconds)
    finally:
        stop.set()
        sampler.join()
    assert {t.status for t in done} == {TaskStatus.SUCCEEDED}
    timeline = runs(key)
    assert len(timeline) == n
    counts = Counter(r["w"] for r in timeline)
    total_capacity = sum(capacity.values())
    for wid, cap in capacity.items():
        # Every worker carried work roughly in proportion to its slots.
        assert counts[wid] >= 0.5 * n * cap / total_capacity, counts
        assert max_concurrency([r for r in timeline if r["w"] == wid]) <= cap
        # The registry's in-flight (held + waiting in the direct queue) never ran past capacity
        # by more than one task caught between two steps.
        assert peaks[wid] <= cap + 1, peaks
    gap = longest_idle_slot_while_waiting(timeline, capacity, submitted)
    print(
        f"least_task burst of {n}: runs {dict(counts)}, peak in-flight {dict(peaks)}, "
        f"longest idle slot while work waited {gap * 1000:.0f} ms"
    )
    assert gap <= HEARTBEAT, f"a slot stayed idle {gap:.2f}s while tasks waited"


def max_concurrency(runs_of_one: list[dict[str, Any]]) -> int:
    events = sorted([(r["s"], 1) for r in runs_of_one] + [(r["e"], -1) for r in runs_of_one])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def longest_idle_slot_while_waiting(timeline: list[dict[str, Any]], capacity: dict[str, int], t0: float) -> float:
    """Longest stretch during which some task had not started yet and some slot was free.

    All tasks were submitted at ``t0``; the stretch ends at the last start."""
    last_start = max(r["s"] for r in timeline)
    step, t, current, longest = 0.005, t0, 0.0, 0.0
    while t < last_start:
        waiting = any(r["s"] > t for r in timeline)
        idle = any(
            sum(1 for r in timeline if r["w"] == wid and r["s"] <= t < r["e"]) < cap for wid, cap in capacity.items()
        )
        current = current + step if (waiting and idle) else 0.0
        longest = max(longest, current)
        t += step
    return longest


def test_tasks_only_run_on_workers_that_support_their_type(three: Cluster, closing: list[Runtime]) -> None:
    rt = producer(three, "round_robin", closing)
    key = unique("other:")
    ids = [rt.manager.submit("rt_other", {"key": key, "seconds": 0.05}).task_id for _ in range(12)]
    done = wait_all(rt, ids)
    assert {t.status for t in done} == {TaskStatus.SUCCEEDED}
    assert {t.worker_id for t in done} <= {three.ids["wa"], three.ids["wc"]}
    assert {r["w"] for r in runs(key)} == {three.ids["wa"], three.ids["wc"]}  # round robin used both


def test_weighted_round_robin_end_to_end_follows_weights(three: Cluster, closing: list[Runtime]) -> None:
    rt = producer(three, "weighted_round_robin", closing)
    # echo runs on wa (weight 3) and wb (weight 1); one at a time, so capacity never binds.
    from tests.integration.test_routing_failover import one_at_a_time

    workers = Counter(one_at_a_time(rt, rt.manager.submit("echo", {"i": i})).worker_id for i in range(40))
    assert workers[three.ids["wa"]] == pytest.approx(30, abs=3), workers
    assert workers[three.ids["wb"]] == pytest.approx(10, abs=3), workers


def test_a_type_no_worker_supports_waits_then_runs_when_one_starts(three: Cluster, closing: list[Runtime]) -> None:
    rt = producer(three, "least_task", closing)
    key = unique("orphan:")
    task = rt.manager.submit("rt_orphan", {"key": key})
    shared = f"{three.data['app']['name']}.rt_orphan"
    import redis

    r = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    assert sum(r.llen(k) for k in [shared] + [f"{shared}:{p}" for p in range(1, 10)]) == 1
    # Two heartbeats later it is still waiting: no running worker takes a type it cannot run.
    deadline = time.monotonic() + 2 * HEARTBEAT
    while time.monotonic() < deadline:
        assert rt.manager.get(task.task_id).status is TaskStatus.QUEUED
        time.sleep(0.1)
    w = three.worker(hostname=f"{unique('wo')}@%h", concurrency=1, extra_args=["--supported-types", "rt_orphan"])
    try:
        done = rt.manager.wait(task.task_id, 30)
        assert done.status is TaskStatus.SUCCEEDED and done.worker_id.startswith(w.hostname.split("@")[0])
    finally:
        w.stop()
    router = rt.router
    router.invalidate()
    assert w.hostname.split("@")[0] not in {x.id.split("@")[0] for x in router.registry.online()}
