"""AffinityBalancer: sticky per task type, rendezvous hashing for the first choice."""

from __future__ import annotations

from celery_ext.routing.affinity import AffinityBalancer
from celery_ext.routing.base import RoutedTask
from tests.support.balancers import T, w


def test_affinity_sticks_then_falls_back_to_least_task_and_resticks() -> None:
    b = AffinityBalancer()
    workers = [w("a", 0), w("b", 0), w("c", 0)]
    first = b.select(workers, T).id
    assert {b.select(workers, T).id for _ in range(20)} == {first}
    # Another balancer with the same workers agrees on the first choice (rendezvous hashing).
    assert AffinityBalancer().select(list(reversed(workers)), T).id == first
    rest = [x for x in workers if x.id != first]
    rest[0].in_flight, rest[1].in_flight = 4, 1
    moved = b.select(rest, T).id
    assert moved == rest[1].id  # the least loaded of the others
    assert {b.select(workers, T).id for _ in range(10)} == {moved}  # re-stuck, even with `first` back
    other = RoutedTask("u", "id2", {})
    assert b.select(workers, other) is not None
