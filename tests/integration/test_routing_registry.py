"""The worker registry, the router and the stranded-queue mover against a real Redis.

Workers here are registry entries written through the same calls a worker's heartbeat makes,
so the router's decisions can be counted exactly; test_routing.py runs real worker processes.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import redis

from celery_ext.routing.stranded import move_stranded, queue_keys
from celery_ext.routing.workers import WorkerInfo, WorkerRegistry, direct_queue_name

ROUTING_TASKS = [{"type": "python", "config": {"modules": ["tests.support.routing_tasks"]}}]


def r() -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=6379, db=0)


def producer(make_cluster, strategy: str = "least_task", **scheduler):
    c = make_cluster(executors=ROUTING_TASKS, scheduler={"load_balance_strategy": strategy, **scheduler})
    rt = c.runtime
    return rt, rt.router


def fake(
    router, wid: str, *, capacity: int = 1000, weight: int = 1, types=("rt_slow",), ttl: float = 30.0, held: int = 0
) -> WorkerInfo:
    info = WorkerInfo(
        id=wid,
        queue=direct_queue_name(router.prefix, wid),
        hostname=wid,
        weight=weight,
        capacity=capacity,
        supported_types=tuple(types),
    )
    router.registry.heartbeat(info, ttl, held, queue_keys(info.queue, {"sep": ":", "priority_steps": range(10)}))
    return info


def route(router, task_type: str = "rt_slow", **options) -> str:
    return router(task_type, (), {"task_id": "x", "payload": {}}, options)["queue"]


def test_weighted_round_robin_1000_tasks_land_within_5_percent_of_weights(make_cluster) -> None:
    rt, router = producer(make_cluster, "weighted_round_robin")
    for wid, weight in (("a", 5), ("b", 3), ("c", 2)):
        fake(router, wid, weight=weight)
    counts = Counter(route(router) for _ in range(1000))
    total = sum(counts.values())
    assert total == 1000
    for wid, weight in (("a", 5), ("b", 3), ("c", 2)):
        share = counts[direct_queue_name(router.prefix, wid)] / total
        assert abs(share - weight / 10) <= 0.05 * weight / 10, counts
    # Every decision reserved a slot in Redis.
    inflight = {k.decode(): int(v) for k, v in r().hgetall(router.registry.keys[2]).items()}
    assert sum(inflight.values()) == 1000


def test_capacity_is_reserved_then_work_waits_in_the_shared_queue(make_cluster) -> None:
    rt, router = producer(make_cluster)
    fake(router, "a", capacity=2)
    fake(router, "b", capacity=1, types=("rt_other",))
    queues = [route(router) for _ in range(4)]
    assert queues == [direct_queue_name(router.prefix, "a")] * 2 + [f"{router.prefix}.rt_slow"] * 2
    assert router.registry.reserve("a", 2) == -1
    # The worker finished one task: the slot is free again from the next registry read.
    router.registry.adjust("a", -1)
    router.invalidate()
    assert route(router) == direct_queue_name(router.prefix, "a")
    # A type only "b" supports, and a type nobody supports.
    assert route(router, "rt_other") == direct_queue_name(router.prefix, "b")
    assert route(router, "rt_orphan") == f"{router.prefix}.rt_orphan"
    # Delayed tasks never hold a slot; unknown task names are not ours to route.
    assert route(router, "rt_other", countdown=5) == f"{router.prefix}.rt_other"
    assert router("celery.backend_cleanup", (), {}, {}) is None


def test_new_work_queues_behind_a_shared_queue_backlog(make_cluster) -> None:
    rt, router = producer(make_cluster)
    fake(router, "a", capacity=100)
    shared = queue_keys(f"{router.prefix}.rt_slow", rt.celery.conf.broker_transport_options)
    r().rpush(shared[9], "waiting")
    assert {route(router) for _ in range(5)} == {f"{router.prefix}.rt_slow"}
    r().delete(shared[9])
    router.invalidate()  # the backlog is remembered until the next snapshot (routing_cache)
    assert route(router) == direct_queue_name(router.prefix, "a")


def test_concurrent_producers_never_overbook_a_worker(make_cluster) -> None:
    rt, router = producer(make_cluster)
    fake(router, "a", capacity=7)
    fake(router, "b", capacity=5)
    routers = [router] + [producer(make_cluster)[1] for _ in range(3)]
    for other in routers[1:]:
        other.prefix = router.prefix  # same app name: share the registry keys
        other.registry.keys = router.registry.keys
        other.shared = router.shared
    results: list[str] = []
    lock = threading.Lock()

    def burst(rtr) -> None:
        for _ in range(10):
            q = route(rtr)
            with lock:
                results.append(q)

    threads = [threading.Thread(target=burst, args=(x,)) for x in routers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = Counter(results)
    assert counts[direct_queue_name(router.prefix, "a")] == 7
    assert counts[direct_queue_name(router.prefix, "b")] == 5
    assert counts[f"{router.prefix}.rt_slow"] == 28


def test_offline_workers_are_skipped_and_swept_exactly_once(make_cluster) -> None:
    rt, router = producer(make_cluster, routing_cache="0s")
    fake(router, "alive")
    fake(router, "dying", ttl=0.3)
    router.invalidate()
    assert {w.id for w in router.registry.online()} == {"alive", "dying"}
    deadline = time.monotonic() + 10
    while "dying" in {w.id for w in router.registry.online()}:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert {route(router) for _ in range(20)} == {direct_queue_name(router.prefix, "alive")}
    seen: list[str] = []
    # Four schedulers' registries sweep at once, each told whom to call for a worker gone offline.
    sweepers = [WorkerRegistry(router.registry.client, router.prefix, lambda w: seen.append(w.id)) for _ in range(4)]
    results: list[list[WorkerInfo]] = []
    threads = [threading.Thread(target=lambda r=r: results.append(r.sweep_offline())) for r in sweepers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    swept = [w for batch in results for w in batch]
    assert [w.id for w in swept] == ["dying"] and seen == ["dying"]
    assert swept[0].queue == direct_queue_name(router.prefix, "dying") and not swept[0].online
    assert {w.id for w in router.registry.all()} == {"alive"}


def test_entries_with_a_foreign_queue_are_never_routed_to(make_cluster) -> None:
    rt, router = producer(make_cluster)
    info = WorkerInfo(id="evil", queue="celery", capacity=100, supported_types=("rt_slow",))
    router.registry.heartbeat(info, 30, 0)
    assert route(router) == f"{router.prefix}.rt_slow"


def test_heartbeat_corrects_a_lasting_in_flight_difference(make_cluster) -> None:
    rt, router = producer(make_cluster)
    info = fake(router, "a", capacity=10)
    for _ in range(6):
        router.registry.reserve("a", 10)  # six reservations, but the worker holds 1 and 2 wait
    keys = queue_keys(info.queue, rt.celery.conf.broker_transport_options)
    r().rpush(keys[0], "m1")
    r().rpush(keys[5], "m2")
    # 6 counted, 3 true: a one-off difference is left alone (a task between two steps) ...
    assert router.registry.heartbeat(info, 30, 1, keys) == (6, -3)
    assert router.registry.heartbeat(info, 30, 1, keys, last_delta=0) == (6, -3)
    # ... the same difference at two beats in a row is a leak, and is corrected.
    assert router.registry.heartbeat(info, 30, 1, keys, last_delta=-3) == (3, 0)
    assert router.registry.online()[0].in_flight == 3
    assert router.registry.adjust("a", -5) == 0  # never below zero
    r().delete(*keys)


def test_unreachable_registry_falls_back_to_the_shared_queue(make_cluster) -> None:
    rt, router = producer(make_cluster, registry_url="redis://127.0.0.1:1/0")
    assert route(router) == f"{router.prefix}.rt_slow"
    task = rt.manager.submit("rt_slow", {"key": "k"})
    assert task.status.value == "queued"
    keys = queue_keys(f"{router.prefix}.rt_slow", rt.celery.conf.broker_transport_options)
    assert sum(r().llen(k) for k in keys) == 1


def test_stranded_messages_move_to_their_shared_queues_in_order_without_loss(make_cluster) -> None:
    rt, router = producer(make_cluster)
    info = fake(router, "dead", types=("rt_slow", "rt_other"))
    # Real kombu messages on the dead worker's direct queue, several types and priorities.
    sent = []
    for i in range(30):
        task_type = "rt_slow" if i % 3 else "rt_other"
        rt.celery.send_task(task_type, kwargs={"i": i}, queue=info.queue, priority=i % 4, task_id=f"t{i}")
        sent.append((f"t{i}", task_type, i % 4))
    opts = rt.celery.conf.broker_transport_options
    assert sum(r().llen(k) for k in queue_keys(info.queue, opts)) == 30
    movers = [
        threading.Thread(
            target=lambda: moved.append(move_stranded(r(), info.queue, router.prefix, opts, rt.executors.task_types))
        )
        for _ in range(3)
    ]
    moved: list[int] = []
    for t in movers:
        t.start()
    for t in movers:
        t.join()
    assert sum(moved) == 30
    assert sum(r().llen(k) for k in queue_keys(info.queue, opts)) == 0
    import json

    for task_type in ("rt_slow", "rt_other"):
        for pri in range(4):
            key = queue_keys(f"{router.prefix}.{task_type}", opts)[pri]
            # kombu pops from the right: read in consumption order.
            got = [json.loads(m)["headers"]["id"] for m in reversed(r().lrange(key, 0, -1))]
            want = [tid for tid, tt, p in sent if tt == task_type and p == pri]
            assert got == want, (task_type, pri)


def test_unacked_messages_of_a_dead_worker_are_returned(make_cluster) -> None:
    import json

    rt, router = producer(make_cluster)
    info = fake(router, "dead")
    opts = rt.celery.conf.broker_transport_options
    message = {"body": "e30=", "headers": {"task": "rt_slow", "id": "u1"}, "properties": {"priority": 2}}
    other = {"body": "e30=", "headers": {"task": "rt_slow", "id": "u2"}, "properties": {"priority": 0}}
    tag, tag2 = f"{router.prefix}-tag1", f"{router.prefix}-tag2"
    r().hset("unacked", tag, json.dumps([message, info.queue, info.queue]))
    r().zadd("unacked_index", {tag: time.time()})
    r().hset("unacked", tag2, json.dumps([other, "", f"{router.prefix}.rt_slow"]))  # a live worker's
    try:
        assert move_stranded(r(), info.queue, router.prefix, opts, ["rt_slow"]) == 1
        assert not r().hexists("unacked", tag) and r().zscore("unacked_index", tag) is None
        assert r().hexists("unacked", tag2)
        restored = r().lrange(f"{router.prefix}.rt_slow:2", 0, -1)
        assert [json.loads(m)["headers"]["id"] for m in restored] == ["u1"]
    finally:
        r().hdel("unacked", tag, tag2)
        r().zrem("unacked_index", tag)


def test_readers_see_changed_entries_and_cheap_refreshes_keep_loads_current(make_cluster) -> None:
    rt, router = producer(make_cluster)
    reg = router.registry
    info = fake(router, "a", capacity=4, weight=1)
    assert [(w.id, w.weight, w.in_flight) for w in reg.online()] == [("a", 1, 0)]
    reg.reserve("a", 4)
    assert reg.online()[0].in_flight == 1  # loads are read on every refresh
    info.weight = 5  # e.g. a config reload on the worker: the next heartbeat publishes it
    reg.heartbeat(info, 30, 1)
    assert reg.online()[0].weight == 5
    fake(router, "b")
    assert sorted(w.id for w in reg.online()) == ["a", "b"]
    listed = {w.id: w for w in reg.all()}
    assert listed["a"].heartbeat_at == pytest.approx(time.time(), abs=5) and listed["a"].online


def test_a_warm_leave_returns_unacked_messages_to_their_type_never_to_celery(make_cluster) -> None:
    """A worker that leaves warm hands back its direct queue without a list of types (``seat``):
    the types are read from the messages, the unacked ones included (a previous incarnation's
    under the same name), and a type it cannot tell goes to this app's default queue, never to
    Celery's shared ``celery``, which other apps' workers on the broker consume."""
    import json

    rt, router = producer(make_cluster)
    info = fake(router, "leaving")
    opts = rt.celery.conf.broker_transport_options
    message = {"body": "e30=", "headers": {"task": "rt_slow", "id": "w1"}, "properties": {}}
    nameless = {"body": "e30=", "headers": {"id": "w2"}, "properties": {}}
    tag, tag2 = f"{router.prefix}-wtag1", f"{router.prefix}-wtag2"
    r().hset("unacked", tag, json.dumps([message, info.queue, info.queue]))
    r().hset("unacked", tag2, json.dumps([nameless, info.queue, info.queue]))
    r().zadd("unacked_index", {tag: time.time(), tag2: time.time()})
    before = r().llen("celery")
    try:
        assert move_stranded(r(), info.queue, router.prefix, opts) == 2
        typed = r().lrange(f"{router.prefix}.rt_slow", 0, -1)
        assert [json.loads(m)["headers"]["id"] for m in typed] == ["w1"]
        default = r().lrange(f"{router.prefix}.default", 0, -1)
        assert [json.loads(m)["headers"]["id"] for m in default] == ["w2"]
        assert r().llen("celery") == before
    finally:
        r().hdel("unacked", tag, tag2)
        r().zrem("unacked_index", tag, tag2)
        r().delete(f"{router.prefix}.rt_slow", f"{router.prefix}.default")
