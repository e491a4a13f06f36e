"""A periodic schedule across scheduler failover (real processes, PostgreSQL, Redis): three
schedulers fire a 2-second schedule; the leader is SIGKILLed, the next one is SIGSTOPped past its
lease and SIGCONTed.  No fire happens twice, at most one is missed, and the resumed leader makes
no write that counts."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from datetime import datetime

import pytest

from celery_ext.model import TaskFilter, utcnow
from tests.conftest import TEST_TASKS, Cluster
from tests.support.schedulers import SchedulerProcess, leader_of
from tests.support.scrape import poll

pytestmark = pytest.mark.timeout(240)

PERIOD = 2.0


def fires(c: Cluster) -> list[datetime]:
    """The fire times of the schedule's tasks (their idempotency keys), in order."""
    page = c.manager.list(TaskFilter(limit=1000))
    keys = [t.idempotency_key for t in page.items if (t.idempotency_key or "").startswith("schedule:beat:")]
    return sorted(datetime.fromisoformat(k.split(":", 2)[2]) for k in keys if k)


@pytest.mark.slow
def test_no_duplicate_and_at_most_one_missed_fire_across_kill_and_pause(make_cluster) -> None:
    c = make_cluster(
        "postgresql",
        executors=TEST_TASKS,
        scheduler={"interval": 0.25, "leader_lease": 1.5},
        schedules=[{"name": "beat", "task_type": "echo", "payload": {"beat": True}, "every": PERIOD}],
    )
    c.manager.ensure_schema()
    schedulers = [SchedulerProcess(c).start() for _ in range(3)]
    try:
        poll(lambda: len(fires(c)) >= 3, 60, "the schedule to fire")
        first = leader_of(schedulers, schedulers)
        assert first.proc is not None
        first.proc.send_signal(signal.SIGKILL)
        rest = [s for s in schedulers if s is not first]
        second = leader_of(schedulers, rest)
        before = len(fires(c))
        poll(lambda: len(fires(c)) >= before + 2, 30, "the new leader to fire")
        assert second.proc is not None
        second.proc.send_signal(signal.SIGSTOP)
        (third,) = [s for s in rest if s is not second]
        assert leader_of(schedulers, [third]) is third
        time.sleep(PERIOD)
        resumed_at = len(second.log())
        second.proc.send_signal(signal.SIGCONT)
        # The resumed one learns it no longer leads (its lease is gone), or its first write is
        # refused by storage (a newer fence): either way it fires nothing more.
        poll(
            lambda: "no longer the leader" in second.log()[resumed_at:] or "writes are refused" in second.log(),
            30,
            "the resumed leader to step down",
        )
        later = len(fires(c))
        poll(lambda: len(fires(c)) >= later + 3, 30, "fires after the pause")
        # Nothing fired between its step-down and the lease's next grant to it, if any (a loaded
        # machine can stall the third past its own lease: the resumed one may then lead again, by
        # a new fencing token, and fire as the leader it is).
        after = second.log()[resumed_at:]
        stepped_down = max(after.find("no longer the leader"), 0)
        until_led_again = after[stepped_down:].split("is the leader")[0]
        assert "fired for" not in until_led_again, after
    finally:
        for s in schedulers:
            if s.proc is not None and s.proc.poll() is None:
                s.proc.send_signal(signal.SIGCONT)
                s.stop()
    times = fires(c)
    assert len(times) == len(set(times)), "a fire happened twice"
    gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:], strict=False)]
    assert all(abs(g / PERIOD - round(g / PERIOD)) < 0.01 for g in gaps), gaps  # on the schedule's grid
    missed = sum(round(g / PERIOD) - 1 for g in gaps)
    assert missed <= 1, (missed, gaps)


def test_the_scheduler_publishes_its_events_and_serves_its_metrics(make_cluster) -> None:
    """task_scheduled (producer), schedule_fired and scheduler_leader_changed (scheduler process)
    on the Redis event bus; the scheduler's own /metrics: leader gauge, due lag, schedule fires."""
    from celery_ext.events import ALL
    from tests.integration.test_events import Collector, subscriber
    from tests.support.kafka import free_port

    port = free_port()
    c = make_cluster(
        executors=TEST_TASKS,
        events={"type": "redis"},
        plugins=[{"name": "metrics", "config": {"prometheus_port": free_port(), "scheduler_port": port}}],
        schedules=[{"name": "beat", "task_type": "echo", "payload": {}, "every": PERIOD}],
    )
    seen = Collector()
    bus = subscriber(c)
    bus.subscribe(ALL, seen)
    scheduler = SchedulerProcess(c).start()
    try:
        delayed = c.manager.submit("echo", {"later": True}, delay=2)
        poll(lambda: [e.task_id for e in seen.of_type("task_scheduled")] == [delayed.task_id], 20, "task_scheduled")
        assert seen.of_type("task_scheduled")[0].data["run_at"] == delayed.run_at.isoformat()  # type: ignore[union-attr]
        poll(lambda: len(seen.of_type("schedule_fired")) >= 2, 30, "schedule_fired events")
        fired = seen.of_type("schedule_fired")[0]
        assert fired.data["schedule"] == "beat" and fired.data["created"] is True and fired.task_id
        assert any(e.data.get("is_leader") for e in seen.of_type("scheduler_leader_changed"))
        poll(lambda: c.manager.get(delayed.task_id).status.value == "queued", 20, "the delayed task published")

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                return resp.read().decode()

        poll(lambda: "celery_ext_due_lag_seconds_count 1.0" in scrape(), 20, "the due lag observed")
        text = scrape()
        assert "celery_ext_scheduler_is_leader 1.0" in text
        assert f'celery_ext_app_info{{app="{c.data["app"]["name"]}",version=""}} 1.0' in text
        assert 'celery_ext_schedule_fired_total{outcome="fired",schedule="beat"}' in text
    finally:
        scheduler.stop()
        bus.close()


def test_a_schedule_added_by_the_cli_survives_a_restart_of_everything(make_cluster) -> None:
    from tests.e2e.test_cli import cli

    c = make_cluster("postgresql", executors=TEST_TASKS)
    started = utcnow()
    added = cli(c.config_path, "schedules", "add", "pulse", "echo", '{"pulse": 1}', "--every", "1", "--json")
    assert added.returncode == 0, added.stderr

    def pulses() -> int:  # the PostgreSQL database is shared with other tests: only this schedule's
        items = c.manager.list(TaskFilter(limit=1000, created_after=started)).items
        return sum(1 for t in items if (t.idempotency_key or "").startswith("schedule:pulse:"))

    for _round in range(2):  # the scheduler and the worker, started, stopped, and started again
        scheduler, worker = SchedulerProcess(c).start(), c.worker()
        before = pulses()
        try:
            poll(lambda before=before: pulses() >= before + 2, 30, "the schedule to fire")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{scheduler.log()[-3000:]}") from None
        finally:
            scheduler.stop()
            worker.stop()
    listed = cli(c.config_path, "schedules", "list", "--json")
    assert listed.returncode == 0 and [s["name"] for s in json.loads(listed.stdout)] == ["pulse"], listed.stdout
    done = [
        t
        for t in c.manager.list(TaskFilter(limit=1000, created_after=started)).items
        if (t.idempotency_key or "").startswith("schedule:pulse:")
    ]
    assert all(t.status.value == "succeeded" for t in done if t.started_at is not None)
