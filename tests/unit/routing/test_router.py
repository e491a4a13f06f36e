"""The router: its balancer built from config (``build_balancer``), started and stopped by ``TaskRouter``;
its choice given a registry snapshot (``index_by_type``, ``candidates``, then the balancer)."""

from __future__ import annotations

import pytest

from celery_ext.config import parse_config
from celery_ext.errors import ConfigError
from celery_ext.registry import BALANCERS
from celery_ext.routing.base import LoadBalancer, RoutedTask
from celery_ext.routing.hashing import ConsistentHashBalancer
from celery_ext.routing.least_task import LeastTaskBalancer
from celery_ext.routing.router import build_balancer, candidates, index_by_type
from celery_ext.routing.simple import RoundRobinBalancer
from celery_ext.routing.weighted import WeightedRoundRobinBalancer
from celery_ext.routing.workers import WorkerInfo
from tests.support.balancers import T, w


def test_unknown_strategy_lists_the_known_ones() -> None:
    config = parse_config({"scheduler": {"load_balance_strategy": "leastt"}})
    with pytest.raises(ConfigError) as err:
        build_balancer(config)
    text = str(err.value)
    assert "scheduler.load_balance_strategy" in text and "'leastt'" in text and "did you mean 'least_task'" in text
    assert "weighted_round_robin" in text and "consistent_hash" in text


def test_balancer_settings_are_validated_with_their_path() -> None:
    config = parse_config(
        {
            "scheduler": {
                "load_balance_strategy": "consistent_hash",
                "load_balance_config": {"replicas": 0, "colour": "red"},
            }
        }
    )
    with pytest.raises(ConfigError) as err:
        build_balancer(config)
    assert "scheduler.load_balance_config.replicas: must be >= 1" in str(err.value)
    assert "scheduler.load_balance_config.colour: unknown key" in str(err.value)


def test_the_router_starts_its_initial_balancer_and_stops_the_replaced_one() -> None:
    # Review bug (issue 11): only a balancer installed by set_balancer got startup().
    from celery_ext.routing.router import TaskRouter
    from tests.support.balancers import CountingBalancer

    first, second = CountingBalancer(), CountingBalancer()
    router = TaskRouter("p", ["t"], None, first)
    assert (first.started, first.stopped) == (1, 0)
    router.set_balancer(second)
    assert (first.stopped, second.started, second.stopped) == (1, 1, 0)
    router.close()
    assert second.stopped == 1


# --- the choice given a registry snapshot (TaskRouter.choose without Redis) ----------------------


def snapshot() -> list[WorkerInfo]:
    """Online workers of app ``p``: for type ``t`` only ``a`` and ``b`` may be chosen."""
    return [
        w("a", in_flight=3, capacity=4, weight=1),
        w("b", in_flight=2, capacity=4, weight=3),
        w("c", in_flight=1, capacity=1, weight=9),  # full
        w("d", in_flight=0, capacity=4, weight=9, types=("u",)),  # does not run t
        WorkerInfo(id="x", queue="other.queue", capacity=4, weight=9, supported_types=("t",)),  # not its direct queue
    ]


def choice(balancer: LoadBalancer, workers: list[WorkerInfo], task: RoutedTask = T) -> str | None:
    """The worker ``TaskRouter.choose`` picks from this snapshot (None: the type's shared queue)."""
    by_type, _ = index_by_type("p", ["t"], workers)
    free = candidates(by_type.get(task.task_type))
    chosen = balancer.select(free, task) if free else None
    return chosen.id if chosen else None


def test_the_snapshot_by_type_keeps_workers_on_their_direct_queue() -> None:
    by_type, misplaced = index_by_type("p", ["t", "v"], snapshot())
    assert {t: [x.id for x in ws] for t, ws in by_type.items()} == {
        "t": ["a", "b", "c"],
        "u": ["d"],  # advertised by a worker, though this process has no executor for it
        "v": [],  # ours, though no worker runs it
    }
    assert [x.id for x in misplaced] == ["x"]


def test_candidates_are_the_workers_with_a_free_slot() -> None:
    pool = [w("a", 3, 4), w("b", 4, 4), w("c", 5, 4), w("d", 0, 1)]
    assert [x.id for x in candidates(pool)] == ["a", "d"]
    assert [x.id for x in candidates(pool, {"d"})] == ["a"]  # found full when reserving
    assert candidates(None) == [] and candidates([w("b", 4, 4)]) == []


def test_least_task_chooses_the_least_loaded_free_worker_of_the_type() -> None:
    assert {choice(LeastTaskBalancer(), snapshot()) for _ in range(50)} == {"b"}


def test_weighted_round_robin_turns_over_the_free_workers_of_the_type() -> None:
    b = WeightedRoundRobinBalancer()
    assert [choice(b, snapshot()) for _ in range(8)] == ["b", "a", "b", "b"] * 2  # weights 1 and 3
    even = WeightedRoundRobinBalancer()
    tied = [w("a"), w("b"), w("c")]
    assert [choice(even, tied) for _ in range(6)] == ["a", "b", "c"] * 2  # equal weights: list order


def test_round_robin_turns_in_id_order_over_the_free_workers_of_the_type() -> None:
    b = RoundRobinBalancer()
    assert [choice(b, list(reversed(snapshot()))) for _ in range(4)] == ["a", "b", "a", "b"]


@pytest.mark.parametrize(
    "name", ["least_task", "weighted_round_robin", "affinity", "round_robin", "random", "consistent_hash"]
)
def test_no_builtin_balancer_chooses_a_full_or_foreign_worker(name: str) -> None:
    balancer = BALANCERS.resolve(name)()
    seen = {choice(balancer, snapshot(), RoutedTask("t", f"id{i}", {})) for i in range(200)}
    assert seen <= {"a", "b"} and seen
    full = [w("a", 4, 4), w("b", 1, 1)]
    assert choice(balancer, full) is None  # every worker full: the shared queue
    assert choice(balancer, [w("d", types=("u",))]) is None  # no worker runs the type
    assert choice(balancer, []) is None


def test_consistent_hash_spills_a_full_owners_keys_to_the_next_worker() -> None:
    b = ConsistentHashBalancer()
    workers = [w(f"w{i}") for i in range(4)]
    owners = {i: choice(b, workers, RoutedTask("t", f"id{i}", {})) for i in range(100)}
    full_id = owners[0]
    spilled = [w(x.id, 10, 10) if x.id == full_id else x for x in workers]
    again = {i: choice(b, spilled, RoutedTask("t", f"id{i}", {})) for i in range(100)}
    assert all(again[i] != full_id for i in again)
    assert all(again[i] == o for i, o in owners.items() if o != full_id)  # the others' keys stay
