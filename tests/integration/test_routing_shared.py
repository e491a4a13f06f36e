"""Balancer state shared by the cluster (routing/shared.py) against a real Redis.

Each decision here may come from a fresh ``TaskRouter``, as from a short-lived producer process
(``celery-ext submit``, a cron job): the split must still follow the strategy.  Workers are
registry entries written through a worker's own heartbeat call; tests/e2e/test_shared_routing.py
runs the same with real worker and CLI processes.
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from celery_ext.config import parse_config
from celery_ext.routing.router import TaskRouter, build_balancer
from celery_ext.routing.shared import SharedPlan
from celery_ext.routing.stranded import queue_keys
from celery_ext.routing.workers import WorkerInfo, WorkerRegistry, direct_queue_name
from tests.integration.test_routing_registry import ROUTING_TASKS, fake, r, route


def cluster(make_cluster, strategy: str, **scheduler):
    c = make_cluster(executors=ROUTING_TASKS, scheduler={"load_balance_strategy": strategy, **scheduler})
    return c, c.runtime.router


def fresh(router: TaskRouter, strategy: str, state: str = "shared") -> TaskRouter:
    """A new producer process's router on the same registry."""
    config = parse_config({"scheduler": {"load_balance_strategy": strategy, "load_balance_state": state}})
    other = TaskRouter(
        router.prefix,
        router.task_types,
        WorkerRegistry(router.registry.client, router.prefix),
        build_balancer(config),
        shared_state=state == "shared",
    )
    other.backlog_keys = router.backlog_keys
    return other


def queue_of(router: TaskRouter, wid: str) -> str:
    return direct_queue_name(router.prefix, wid)


@pytest.mark.parametrize(
    "strategy,weights,expected",
    [
        ("weighted_round_robin", {"a": 1, "b": 2, "c": 3}, {"a": 100, "b": 200, "c": 300}),
        ("round_robin", {"a": 1, "b": 2, "c": 3}, {"a": 200, "b": 200, "c": 200}),
    ],
)
def test_short_lived_producers_together_give_the_configured_split(make_cluster, strategy, weights, expected) -> None:
    _, router = cluster(make_cluster, strategy)
    for wid, weight in weights.items():
        fake(router, wid, weight=weight)
    counts = Counter(route(fresh(router, strategy)) for _ in range(600))
    assert counts == {queue_of(router, wid): n for wid, n in expected.items()}


def test_local_state_is_per_process(make_cluster) -> None:
    # The fallback (load_balance_state: local): every new process starts its own rotation, so
    # one decision per process always lands on the same worker: what issue 11 saw.
    _, router = cluster(make_cluster, "weighted_round_robin", load_balance_state="local")
    assert router.state is None
    for wid, weight in {"a": 1, "b": 2, "c": 3}.items():
        fake(router, wid, weight=weight)
    assert {route(fresh(router, "weighted_round_robin", "local")) for _ in range(30)} == {queue_of(router, "c")}
    # One long-lived process still follows the weights with its own state.
    assert Counter(route(router) for _ in range(60)) == {
        queue_of(router, "a"): 10,
        queue_of(router, "b"): 20,
        queue_of(router, "c"): 30,
    }


def test_concurrent_producers_take_each_turn_exactly_once(make_cluster) -> None:
    _, router = cluster(make_cluster, "weighted_round_robin")
    for wid, weight in {"a": 1, "b": 2, "c": 3}.items():
        fake(router, wid, weight=weight)
    results: list[str] = []
    lock = threading.Lock()

    def producer() -> None:
        own = fresh(router, "weighted_round_robin")
        for i in range(150):
            q = route(own if i % 10 else fresh(router, "weighted_round_robin"))
            with lock:
                results.append(q)

    threads = [threading.Thread(target=producer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # The Lua script is atomic: 1200 tickets over a cycle of 6 turns, no turn lost or doubled.
    assert Counter(results) == {queue_of(router, "a"): 200, queue_of(router, "b"): 400, queue_of(router, "c"): 600}
    inflight = {k.decode(): int(v) for k, v in r().hgetall(router.registry.keys[2]).items()}
    assert inflight == {"a": 200, "b": 400, "c": 600}


def test_a_full_worker_passes_its_turn_and_capacity_holds(make_cluster) -> None:
    _, router = cluster(make_cluster, "weighted_round_robin")
    fake(router, "a", weight=1, capacity=100)
    fake(router, "b", weight=3, capacity=2)
    queues = [route(fresh(router, "weighted_round_robin")) for _ in range(12)]
    counts = Counter(queues)
    assert counts[queue_of(router, "b")] == 2 and counts[queue_of(router, "a")] == 10
    # Every worker full by the server's count: the shared queue, and no slot taken.
    fake(router, "a", weight=1, capacity=10)
    assert route(fresh(router, "weighted_round_robin")) == f"{router.prefix}.rt_slow"
    inflight = {k.decode(): int(v) for k, v in r().hgetall(router.registry.keys[2]).items()}
    assert inflight == {"a": 10, "b": 2}


def test_affinity_is_one_assignment_for_the_cluster(make_cluster) -> None:
    _, router = cluster(make_cluster, "affinity")
    for wid in "abcd":
        fake(router, wid, capacity=3)
    first = {route(fresh(router, "affinity")) for _ in range(3)}
    assert len(first) == 1  # three producers, one worker
    stuck = first.pop().rsplit(".", 1)[1]
    # Full: the least loaded worker takes the type, and every producer follows it there.
    others = sorted(set("abcd") - {stuck})
    r().hset(router.registry.keys[2], mapping={others[0]: 2, others[1]: 1, others[2]: 2})
    moved = route(fresh(router, "affinity"))
    assert moved == queue_of(router, others[1])
    assert route(fresh(router, "affinity")) == queue_of(router, others[1])
    # The assignment is per type.
    state = r().hgetall(f"{router.prefix}.balance.state")
    assert state == {b"affinity|rt_slow": others[1].encode()}


def test_work_waiting_in_the_shared_queue_takes_no_turn(make_cluster) -> None:
    c, router = cluster(make_cluster, "round_robin")
    fake(router, "a")
    fake(router, "b")
    shared = queue_keys(f"{router.prefix}.rt_slow", c.runtime.celery.conf.broker_transport_options)
    r().rpush(shared[3], "waiting")
    assert route(fresh(router, "round_robin")) == f"{router.prefix}.rt_slow"
    r().delete(shared[3])
    assert [route(fresh(router, "round_robin")) for _ in range(2)] == [queue_of(router, "a"), queue_of(router, "b")]


def test_one_round_trip_per_decision_and_the_plan_is_uploaded_once(make_cluster) -> None:
    _, router = cluster(make_cluster, "weighted_round_robin")
    for wid in "abc":
        fake(router, wid)
    calls = Counter[str]()

    def counting(rtr: TaskRouter) -> TaskRouter:
        assert rtr.state is not None
        inner = rtr.state._decide

        def decide(keys, args):
            calls["upload" if len(args) > 4 else "decide"] += 1
            return inner(keys=keys, args=args)

        rtr.state._decide = decide  # type: ignore[method-assign]
        return rtr

    for _ in range(5):
        route(counting(fresh(router, "weighted_round_robin")))
    # The first producer found no plan (one more call, with the upload); the others found it.
    assert calls == {"decide": 5, "upload": 1}
    plans = [k for k in r().scan_iter(f"{router.prefix}.balance.plan.*")]
    assert len(plans) == 1 and 0 < r().pttl(plans[0]) <= 3600 * 1000
    # A worker joining is a new pool, so a new plan: uploaded once again.
    fake(router, "d")
    calls.clear()
    for _ in range(4):
        route(counting(fresh(router, "weighted_round_robin")))
    assert calls == {"decide": 4, "upload": 1}


def test_a_changing_pool_keeps_the_rotation_going(make_cluster) -> None:
    _, router = cluster(make_cluster, "round_robin", routing_cache="0s")
    for wid in "abc":
        fake(router, wid)
    seen = [route(router) for _ in range(3)]
    assert seen == [queue_of(router, x) for x in "abc"]
    fake(router, "d")
    assert Counter(route(router) for _ in range(8)) == {queue_of(router, x): 2 for x in "abcd"}


def test_plan_digest_ignores_pool_order_and_follows_capacity() -> None:
    def w(wid: str, capacity: int = 1, weight: int = 1) -> WorkerInfo:
        return WorkerInfo(id=wid, queue=f"p.worker.{wid}", capacity=capacity, weight=weight)

    one = SharedPlan.sticky("a", [w("a"), w("b")])
    assert one.digest == SharedPlan.sticky("a", [w("b"), w("a")]).digest
    assert one.digest != SharedPlan.sticky("a", [w("a"), w("b", capacity=2)]).digest
    assert one.digest != SharedPlan.sticky("b", [w("a"), w("b")]).digest


def test_the_initial_balancer_is_started(make_cluster) -> None:
    # Review bug (issue 11): only a balancer set by set_balancer got startup().
    _, router = cluster(make_cluster, "tests.support.balancers:CountingBalancer")
    assert router.balancer.started == 1 and router.balancer.stopped == 0  # type: ignore[attr-defined]
    old = router.balancer
    router.set_balancer(
        build_balancer(
            parse_config({"scheduler": {"load_balance_strategy": "tests.support.balancers:CountingBalancer"}})
        )
    )
    assert old.stopped == 1 and router.balancer.started == 1  # type: ignore[attr-defined]
    router.close()
    assert router.balancer.stopped == 1  # type: ignore[attr-defined]


def test_a_running_producer_follows_the_strategy_the_cluster_publishes(make_cluster, caplog) -> None:
    _, router = cluster(make_cluster, "least_task", routing_cache="0s")
    for wid, weight in {"a": 1, "b": 2, "c": 3}.items():
        fake(router, wid, weight=weight)
    route(router)  # the first registry read: the baseline (nothing published yet)
    # A worker's config.yaml changes the strategy: its reload publishes it (set_balancer).
    worker = fresh(router, "least_task")
    worker.set_balancer(build_balancer(parse_config({"scheduler": {"load_balance_strategy": "weighted_round_robin"}})))
    counts = Counter(route(router) for _ in range(60))
    assert type(router.balancer).__name__ == "WeightedRoundRobinBalancer"
    assert counts == {queue_of(router, "a"): 10, queue_of(router, "b"): 20, queue_of(router, "c"): 30}
    # A producer that starts after the publication keeps its own configured strategy: only
    # changes made while it runs are followed.
    late = fresh(router, "round_robin")
    route(late)
    assert type(late.balancer).__name__ == "RoundRobinBalancer"
    # A strategy this process cannot load is not adopted (warned once), routing goes on.
    r().set(router.registry.strategy_key, '{"strategy": "nowhere:Nope", "config": {}, "version": "x1"}')
    assert route(router).startswith(f"{router.prefix}.worker.")
    assert type(router.balancer).__name__ == "WeightedRoundRobinBalancer"
    assert "cannot use it" in caplog.text


def test_the_published_strategy_lives_as_long_as_the_workers(make_cluster) -> None:
    _, router = cluster(make_cluster, "affinity")
    router.publish_strategy()
    assert r().pttl(router.registry.strategy_key) > 23 * 3600 * 1000
    r().pexpire(router.registry.strategy_key, 5000)
    fake(router, "a")  # a heartbeat keeps it with the rest of the registry
    assert r().pttl(router.registry.strategy_key) > 23 * 3600 * 1000
