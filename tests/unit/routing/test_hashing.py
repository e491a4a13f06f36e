"""ConsistentHashBalancer: keys stay on their worker."""

from __future__ import annotations

from collections import Counter

from celery_ext.routing.base import RoutedTask
from celery_ext.routing.hashing import ConsistentHashBalancer, ConsistentHashSettings
from celery_ext.routing.workers import WorkerInfo
from tests.support.balancers import w


def test_consistent_hash_keeps_keys_on_their_worker() -> None:
    b = ConsistentHashBalancer(ConsistentHashSettings(field="user"))
    workers = [w(f"w{i}") for i in range(5)]

    def owner(user: str, ws: list[WorkerInfo] = workers) -> str:
        return b.select(ws, RoutedTask("t", f"id-{user}-{len(ws)}", {"user": user})).id

    owners = {u: owner(u) for u in map(str, range(300))}
    assert all(owner(u) == o for u, o in owners.items())  # stable
    assert len(set(owners.values())) == 5 and min(Counter(owners.values()).values()) > 20
    # A fresh balancer (another producer) agrees.
    b2 = ConsistentHashBalancer(ConsistentHashSettings(field="user"))
    assert all(b2.select(workers, RoutedTask("t", None, {"user": u})).id == o for u, o in owners.items())
    # Removing one worker moves only its own keys.
    survivors = [x for x in workers if x.id != "w2"]
    moved = [u for u, o in owners.items() if owner(u, survivors) != o]
    assert moved and all(owners[u] == "w2" for u in moved)


def test_consistent_hash_falls_back_to_idempotency_key_then_task_id() -> None:
    b = ConsistentHashBalancer()
    workers = [w(f"w{i}") for i in range(4)]
    by_key = {b.select(workers, RoutedTask("t", f"id{i}", {}, idempotency_key="order-7")).id for i in range(20)}
    assert len(by_key) == 1
    by_id = {b.select(workers, RoutedTask("t", f"id{i}", {})).id for i in range(40)}
    assert len(by_id) > 1
