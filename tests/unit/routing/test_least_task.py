"""LeastTaskBalancer: the fewest tasks in flight."""

from __future__ import annotations

from collections import Counter

from celery_ext.routing.least_task import LeastTaskBalancer
from tests.support.balancers import T, w


def test_least_task_picks_fewest_in_flight_and_breaks_ties_at_random() -> None:
    b = LeastTaskBalancer()
    assert b.select([w("a", 3), w("b", 1), w("c", 2)], T).id == "b"
    picks = Counter(b.select([w("a", 1), w("b", 1), w("c", 5)], T).id for _ in range(300))
    assert set(picks) == {"a", "b"} and min(picks.values()) > 90
