"""SIGKILL of the scheduler leader among three schedulers, with delayed tasks that only a leader
publishes: another takes over (failover seconds measured), each task runs once."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.chaos.harness import Chaos
from tests.support.schedulers import leader_of, leading
from tests.support.scrape import poll

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.mark.parametrize("settings", ["defaults", "tuned"])
def test_scheduler_leader_sigkill(chaos: Callable[..., Chaos], settings: str) -> None:
    c = chaos("scheduler leader SIGKILL", settings=settings)
    c.worker()
    schedulers = [c.scheduler(lead=False) for _ in range(3)]
    leader = leader_of(schedulers, schedulers)
    c.submit(10, 0.5, delay=2)  # waiting in storage: the leader publishes them when due
    c.submit(10, 0.5, delay=5)
    assert leader.proc is not None
    c.fault(leader.proc.kill, set())  # SIGKILL
    rest = [s for s in schedulers if s is not leader]
    poll(lambda: len(leading(rest)) == 1, 60, "another scheduler to lead")
    assert c.fault_at is not None
    c.extra["failover_s"] = round(time.time() - c.fault_at, 2)
    assert c.settle(120), c.figures().line()
    records = [c.cluster.manager.get(tid) for tid in c.accepted]
    lags = [(t.started_at - t.run_at).total_seconds() for t in records if t.started_at and t.run_at]
    c.extra["max_start_lag_s"] = round(max(lags), 2)  # how late the latest delayed task started
    f = c.record()
    c.check(f)
    assert len(leading(rest)) == 1
