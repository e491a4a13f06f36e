"""The built-in load balancers, as plain objects (no I/O)."""

from __future__ import annotations

from collections import Counter

import pytest

from celery_ext.config import parse_config
from celery_ext.errors import ConfigError
from celery_ext.registry import BALANCERS
from celery_ext.routing.affinity import AffinityBalancer
from celery_ext.routing.base import LoadBalancer, RoutedTask
from celery_ext.routing.hashing import ConsistentHashBalancer, ConsistentHashSettings
from celery_ext.routing.least_task import LeastTaskBalancer
from celery_ext.routing.router import build_balancer
from celery_ext.routing.simple import RandomBalancer, RoundRobinBalancer
from celery_ext.routing.weighted import WeightedRoundRobinBalancer
from celery_ext.routing.workers import WorkerInfo


def w(wid: str, in_flight: int = 0, capacity: int = 10, weight: int = 1) -> WorkerInfo:
    return WorkerInfo(
        id=wid, queue=f"p.worker.{wid}", weight=weight, capacity=capacity, supported_types=("t",), in_flight=in_flight
    )


T = RoutedTask("t", "id1", {})


def test_every_builtin_resolves_by_name() -> None:
    names = {"least_task", "weighted_round_robin", "affinity", "round_robin", "random", "consistent_hash"}
    assert names <= set(BALANCERS.known())
    for name in names:
        cls = BALANCERS.resolve(name)
        assert issubclass(cls, LoadBalancer) and cls.name == name


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


def test_least_task_picks_fewest_in_flight_and_breaks_ties_at_random() -> None:
    b = LeastTaskBalancer()
    assert b.select([w("a", 3), w("b", 1), w("c", 2)], T).id == "b"
    picks = Counter(b.select([w("a", 1), w("b", 1), w("c", 5)], T).id for _ in range(300))
    assert set(picks) == {"a", "b"} and min(picks.values()) > 90


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


def test_config_validate_reports_an_unknown_strategy(tmp_path, capsys) -> None:
    from celery_ext.cli import main

    path = tmp_path / "config.yaml"
    path.write_text("scheduler: {load_balance_strategy: weighted}\n")
    assert main(["config", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "scheduler.load_balance_strategy: no load balancer 'weighted'" in err and "least_task" in err


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


def test_round_robin_keeps_one_cycle_per_task_type() -> None:
    b = RoundRobinBalancer()
    workers = [w("a"), w("b")]
    other = RoutedTask("u", "id2", {})
    picks = [(b.select(workers, T).id, b.select(workers, other).id) for _ in range(2)]
    assert picks == [("a", "a"), ("b", "b")]
