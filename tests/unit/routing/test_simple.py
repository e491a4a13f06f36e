"""RoundRobinBalancer and RandomBalancer."""

from __future__ import annotations

from celery_ext.routing.base import RoutedTask
from celery_ext.routing.simple import RandomBalancer, RoundRobinBalancer
from tests.support.balancers import T, w


def test_round_robin_cycles_in_id_order_across_set_changes() -> None:
    b = RoundRobinBalancer()
    workers = [w("c"), w("a"), w("b")]
    assert [b.select(workers, T).id for _ in range(4)] == ["a", "b", "c", "a"]
    assert b.select([w("a"), w("c")], T).id == "c"  # "b" left: the cycle goes on after "a"
    assert b.select(workers, T).id == "a"


def test_random_picks_only_candidates() -> None:
    b = RandomBalancer()
    workers = [w("a"), w("b")]
    assert {b.select(workers, T).id for _ in range(100)} == {"a", "b"}


def test_round_robin_keeps_one_cycle_per_task_type() -> None:
    b = RoundRobinBalancer()
    workers = [w("a"), w("b")]
    other = RoutedTask("u", "id2", {})
    picks = [(b.select(workers, T).id, b.select(workers, other).id) for _ in range(2)]
    assert picks == [("a", "a"), ("b", "b")]
