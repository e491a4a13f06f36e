"""The shared plans of the stateful balancers (routing/shared.py)."""

from __future__ import annotations

from collections import Counter

from celery_ext.routing.affinity import AffinityBalancer
from celery_ext.routing.hashing import ConsistentHashBalancer
from celery_ext.routing.least_task import LeastTaskBalancer
from celery_ext.routing.simple import RoundRobinBalancer
from tests.support.balancers import T, w


def test_shared_plans_of_the_stateful_balancers() -> None:
    from celery_ext.routing.shared import weighted_turns

    pool = [w("c", weight=1), w("a", weight=5), w("b", weight=1)]
    assert "".join(weighted_turns(pool)) == "aaabcaa"  # each worker's turns evenly spread
    assert weighted_turns([w("a", weight=4), w("b", weight=2)]) == ["a", "b", "a"]  # over the gcd
    big = weighted_turns([w(f"w{i}", weight=1000 + i) for i in range(50)])
    assert len(big) <= 10_000 + 50 and Counter(big)["w49"] >= Counter(big)["w0"]
    rr = RoundRobinBalancer().shared_plan(pool, "t")
    assert rr is not None and rr.mode == "cycle" and rr.turns == ("a", "b", "c")
    aff = AffinityBalancer().shared_plan(pool, "t")
    assert aff is not None and aff.mode == "sticky" and aff.first == AffinityBalancer().select(pool, T).id
    assert LeastTaskBalancer().shared_plan(pool, "t") is None  # no state beyond the registry's loads
    assert ConsistentHashBalancer().shared_plan(pool, "t") is None
