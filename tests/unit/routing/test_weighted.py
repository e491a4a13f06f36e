"""WeightedRoundRobinBalancer: nginx's smooth weighted round robin."""

from __future__ import annotations

from collections import Counter

import pytest

from celery_ext.routing.weighted import WeightedRoundRobinBalancer
from tests.support.balancers import T, w


def test_smooth_weighted_round_robin_interleaves() -> None:
    b = WeightedRoundRobinBalancer()
    workers = [w("a", weight=5), w("b", weight=1), w("c", weight=1)]
    seq = "".join(b.select(workers, T).id for _ in range(7))
    assert seq == "aabacaa"  # nginx's smooth sequence, not "aaaaabc"
    counts = Counter(b.select(workers, T).id for _ in range(700))
    assert counts == {"a": 500, "b": 100, "c": 100}


def test_weighted_round_robin_follows_a_changing_set() -> None:
    b = WeightedRoundRobinBalancer()
    full = [w("a", weight=3), w("b", weight=1)]
    for _ in range(5):
        b.select(full, T)
    # "a" is full for a while: everything goes to "b", then the 3:1 ratio resumes.
    assert {b.select([full[1]], T).id for _ in range(4)} == {"b"}
    counts = Counter(b.select(full, T).id for _ in range(400))
    assert counts["a"] == pytest.approx(300, abs=4)
