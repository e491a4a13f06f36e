"""Firing schedules on a real store (PostgreSQL) and broker (Redis): a due schedule fires once,
two leaders firing together create one task per fire, a deposed leader's fence is refused, a
fire lost between advance and submit is resubmitted, catch-up skip vs once; config sync."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from celery_ext.config import parse_config
from celery_ext.errors import InvalidScheduleError, ScheduleNotFoundError, UnknownTaskTypeError
from celery_ext.model import TaskFilter, utcnow
from celery_ext.schedules import FiredSchedule, Schedule, fire_due, fire_key, resubmit_last, sync_config_schedules
from celery_ext.storage.base import Fence
from tests.conftest import Cluster, cluster_data
from tests.support.services import create_database, drop_database, unique

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    url = create_database("postgresql")
    yield url
    drop_database("postgresql", url)


@pytest.fixture
def leaders(tmp_path: Path, redis_url: str, pg_url: str) -> Iterator[tuple[Cluster, Cluster]]:
    """Two producers (two would-be scheduler leaders) on one fresh store."""
    storage = {"type": "postgresql", "config": {"url": pg_url}}
    clusters = []
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        clusters.append(Cluster(tmp_path / label, cluster_data(unique("ce"), redis_url, storage, {})))
    a, b = clusters
    a.manager.ensure_schema()
    yield a, b
    for s in a.runtime.storage.schedules.list():
        a.runtime.storage.schedules.delete(s.name)
    for cluster in clusters:
        cluster.close()


def hour(now: datetime) -> datetime:
    return now.replace(minute=0, second=0, microsecond=0)


def tasks_of(cluster: Cluster, name: str) -> list[str]:
    page = cluster.manager.list(TaskFilter(limit=1000))
    return [t.task_id for t in page.items if (t.idempotency_key or "").startswith(f"schedule:{name}:")]


def test_a_due_schedule_fires_once(leaders: tuple[Cluster, Cluster]) -> None:
    a, _ = leaders
    storage, fence = a.runtime.storage, Fence("scheduler", 1)
    storage.fences.advance(fence)
    added = a.manager.add_schedule("hourly", "echo", {"n": 1}, cron="0 * * * *", priority=3, max_retries=1)
    now = utcnow()
    assert added.next_fire_at == hour(now) + timedelta(hours=1) and added.source == "api"
    assert fire_due(storage, a.manager, fence, now) == []  # not due yet

    due_at = added.next_fire_at
    later = due_at + timedelta(seconds=2)
    fired = fire_due(storage, a.manager, fence, later)
    assert [(f.schedule, f.fire_at, f.created, f.error) for f in fired] == [("hourly", due_at, True, None)]
    task = a.manager.get(fired[0].task_id or "")
    assert (task.task_type, task.payload, task.priority, task.max_retries) == ("echo", {"n": 1}, 3, 1)
    assert task.idempotency_key == fire_key("hourly", due_at)
    assert fire_due(storage, a.manager, fence, later) == []  # advanced: fired once
    stored = a.manager.get_schedule("hourly")
    assert (stored.next_fire_at, stored.last_fire_at, stored.last_task_id) == (
        due_at + timedelta(hours=1),
        due_at,
        task.task_id,
    )
    assert tasks_of(a, "hourly") == [task.task_id]


def test_two_leaders_firing_together_create_one_task_per_fire(leaders: tuple[Cluster, Cluster]) -> None:
    a, b = leaders
    now = utcnow()
    names = [f"s{i}" for i in range(20)]
    for name in names:
        a.runtime.storage.schedules.save(Schedule(name, "echo", every=3600, next_fire_at=now - timedelta(seconds=1)))
    fence = Fence("scheduler", 5)  # two leaders with the same token: only the conditional advance separates them
    a.runtime.storage.fences.advance(fence)
    results: dict[str, list[FiredSchedule]] = {}
    start = threading.Barrier(2)

    def lead(label: str, cluster: Cluster) -> None:
        start.wait()
        results[label] = fire_due(cluster.runtime.storage, cluster.manager, fence, now)

    threads = [threading.Thread(target=lead, args=(label, c)) for label, c in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    fired = results["a"] + results["b"]
    assert sorted(f.schedule for f in fired) == sorted(names) and all(f.created for f in fired)
    assert all(len(tasks_of(a, name)) == 1 for name in names)


def test_a_fire_lost_between_advance_and_submit_is_resubmitted_once(leaders: tuple[Cluster, Cluster]) -> None:
    a, b = leaders
    now = utcnow()
    due_at = now - timedelta(seconds=1)
    a.runtime.storage.schedules.save(Schedule("lost", "echo", every=60, next_fire_at=due_at))
    old, new = Fence("scheduler", 10), Fence("scheduler", 11)
    a.runtime.storage.fences.advance(old)
    # Leader a advances the schedule and dies before submitting.
    assert a.runtime.storage.schedules.advance("lost", due_at, due_at + timedelta(seconds=60), due_at, old)
    assert tasks_of(a, "lost") == []
    # Leader b takes over: its resubmit creates the fire's task.
    b.runtime.storage.fences.advance(new)
    [again] = resubmit_last(b.runtime.storage, b.manager, new)
    assert (again.schedule, again.fire_at, again.created) == ("lost", due_at, True)
    assert resubmit_last(b.runtime.storage, b.manager, new) == []  # its task is recorded now
    # Leader a resumes and submits that fire after all: the same task, no second one.
    fired_late = a.manager.submit("echo", {}, idempotency_key=fire_key("lost", due_at))
    assert fired_late.task_id == again.task_id and tasks_of(a, "lost") == [again.task_id]


def test_a_deposed_leader_is_refused(leaders: tuple[Cluster, Cluster]) -> None:
    a, b = leaders
    now = utcnow()
    a.runtime.storage.schedules.save(Schedule("fenced", "echo", every=60, next_fire_at=now - timedelta(seconds=1)))
    old, new = Fence("scheduler", 20), Fence("scheduler", 21)
    a.runtime.storage.fences.advance(old)
    b.runtime.storage.fences.advance(new)
    assert fire_due(a.runtime.storage, a.manager, old, now) == []
    assert a.manager.get_schedule("fenced").next_fire_at == now - timedelta(seconds=1)  # untouched
    assert [f.schedule for f in fire_due(b.runtime.storage, b.manager, new, now)] == ["fenced"]
    assert len(tasks_of(a, "fenced")) == 1


def test_catch_up_skip_fires_nothing_and_once_fires_the_latest_missed_time(leaders: tuple[Cluster, Cluster]) -> None:
    a, _ = leaders
    storage, fence = a.runtime.storage, Fence("scheduler", 30)
    storage.fences.advance(fence)
    now = utcnow()
    missed = hour(now) - timedelta(hours=5)  # the scheduler was away for five hours
    for policy in ("skip", "once"):
        storage.schedules.save(Schedule(policy, "echo", cron="0 * * * *", catch_up=policy, next_fire_at=missed))
    fired = fire_due(storage, a.manager, fence, now)
    assert [(f.schedule, f.fire_at, f.created) for f in fired] == [("once", hour(now), True)]
    assert tasks_of(a, "skip") == [] and len(tasks_of(a, "once")) == 1
    for policy in ("skip", "once"):
        assert a.manager.get_schedule(policy).next_fire_at == hour(now) + timedelta(hours=1)
    assert a.manager.get_schedule("skip").last_fire_at is None


def test_a_failed_submit_stays_recorded_for_resubmit(leaders: tuple[Cluster, Cluster]) -> None:
    a, _ = leaders
    storage, fence = a.runtime.storage, Fence("scheduler", 40)
    storage.fences.advance(fence)
    now = utcnow()
    storage.schedules.save(Schedule("ghost", "no_such_type", every=60, next_fire_at=now - timedelta(seconds=1)))
    [failed] = fire_due(storage, a.manager, fence, now)
    assert failed.task_id is None and not failed.created and "UnknownTaskTypeError" in (failed.error or "")
    assert a.manager.get_schedule("ghost").last_task_id is None
    [retried] = resubmit_last(storage, a.manager, fence)
    assert retried.schedule == "ghost" and retried.error is not None


def test_manager_schedule_methods(leaders: tuple[Cluster, Cluster]) -> None:
    a, _ = leaders
    m = a.manager
    s = m.add_schedule("weekday", "echo", cron="0 9 * * 1-5", timezone="Europe/Berlin", catch_up="once")
    assert (s.timezone, s.catch_up, s.paused) == ("Europe/Berlin", "once", False)
    assert m.pause_schedule("weekday").paused and not m.resume_schedule("weekday").paused
    replaced = m.add_schedule("weekday", "echo", {"x": 1}, cron="0 9 * * 1-5", timezone="Europe/Berlin")
    assert replaced.next_fire_at == s.next_fire_at and replaced.payload == {"x": 1}
    assert [x.name for x in m.list_schedules()] == ["weekday"]
    with pytest.raises(UnknownTaskTypeError):
        m.add_schedule("typo", "ecoh", every=60)
    with pytest.raises(InvalidScheduleError, match="timezone"):
        m.add_schedule("tz", "echo", cron="0 9 * * *", timezone="Berlin")
    m.remove_schedule("weekday")
    with pytest.raises(ScheduleNotFoundError):
        m.remove_schedule("weekday")
    with pytest.raises(ScheduleNotFoundError):
        m.pause_schedule("weekday")


def test_sync_config_schedules_leaves_api_schedules_alone(leaders: tuple[Cluster, Cluster]) -> None:
    a, _ = leaders
    storage = a.runtime.storage
    a.manager.add_schedule("from-api", "echo", every=60)

    def config(*entries: dict[str, object]) -> object:
        return parse_config({"schedules": [{"task_type": "echo", **e} for e in entries]})

    first = config({"name": "nightly", "cron": "0 3 * * *"}, {"name": "often", "every": "30s"})
    report = sync_config_schedules(storage, first)  # type: ignore[arg-type]
    assert (sorted(report.saved), report.removed) == (["nightly", "often"], [])
    nightly = a.manager.get_schedule("nightly")
    assert nightly.source == "config" and nightly.cron == "0 3 * * *"
    assert sync_config_schedules(storage, first).saved == []  # type: ignore[arg-type]  # unchanged: nothing written
    with pytest.raises(InvalidScheduleError, match="defined in config.yaml"):
        a.manager.remove_schedule("nightly")

    second = config({"name": "nightly", "cron": "0 3 * * *", "payload": {"v": 2}})
    report = sync_config_schedules(storage, second)  # type: ignore[arg-type]
    assert (report.saved, report.removed) == (["nightly"], ["often"])
    changed = a.manager.get_schedule("nightly")
    assert changed.payload == {"v": 2} and changed.next_fire_at == nightly.next_fire_at  # same timing
    assert sorted(s.name for s in a.manager.list_schedules()) == ["from-api", "nightly"]
