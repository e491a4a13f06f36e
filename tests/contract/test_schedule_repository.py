"""The schedule repository on every backend (SQLite, PostgreSQL, MariaDB, MongoDB): definitions
kept across processes, the due query, and ``advance`` / ``fired`` conditional and fenced."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from celery_ext.schedules import Schedule
from celery_ext.storage import Storage
from celery_ext.storage.base import Fence
from tests.support.storage import Backend

T0 = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
LEADER = Fence("scheduler", 7)


def nightly(**changes: object) -> Schedule:
    base = Schedule(
        "nightly",
        "echo",
        {"report": "daily", "n": [1, 2]},
        cron="30 2 * * *",
        timezone="Europe/Berlin",
        catch_up="once",
        priority=5,
        max_retries=2,
        timeout=12.5,
        source="config",
        next_fire_at=T0,
    )
    return base.replace(**changes)


def test_save_get_list_and_another_process_sees_them(storage: Storage, backend: Backend) -> None:
    saved = storage.schedules.save(nightly())
    storage.schedules.save(Schedule("a-every", "echo", every=1.25, next_fire_at=T0 + timedelta(seconds=1)))
    got = storage.schedules.get("nightly")
    assert got is not None and got.updated_at is not None
    assert got == saved and got.replace(updated_at=None) == nightly()
    other = backend.open()  # as a restarted process would: read from the store
    try:
        assert [s.name for s in other.schedules.list()] == ["a-every", "nightly"]
        every = other.schedules.get("a-every")
        assert every is not None and (every.every, every.cron, every.timezone) == (1.25, None, "UTC")
        assert (every.paused, every.source, every.next_fire_at) == (False, "api", T0 + timedelta(seconds=1))
    finally:
        other.close()
    assert storage.schedules.get("missing") is None


def test_replacing_keeps_the_next_fire_unless_the_timing_changed(storage: Storage) -> None:
    storage.schedules.save(nightly())
    assert storage.schedules.advance("nightly", T0, T0 + timedelta(days=1), T0, LEADER)
    assert storage.schedules.fired("nightly", T0, "task-1", LEADER)

    later = T0 + timedelta(days=30)
    kept = storage.schedules.save(nightly(payload={"report": "weekly"}, priority=1, next_fire_at=later))
    assert kept.next_fire_at == T0 + timedelta(days=1) and kept.payload == {"report": "weekly"}
    assert (kept.last_fire_at, kept.last_task_id) == (T0, "task-1")
    assert storage.schedules.get("nightly") == kept

    moved = storage.schedules.save(nightly(cron="0 3 * * *", next_fire_at=later))
    assert moved.next_fire_at == later and (moved.last_fire_at, moved.last_task_id) == (T0, "task-1")
    assert storage.schedules.save(nightly(cron="0 3 * * *", timezone="UTC", next_fire_at=T0)).next_fire_at == T0


def test_delete_and_pause(storage: Storage) -> None:
    storage.schedules.save(nightly())
    assert storage.schedules.set_paused("nightly", True)
    assert storage.schedules.set_paused("nightly", True)  # already paused: still there
    assert storage.schedules.get("nightly").paused  # type: ignore[union-attr]
    assert storage.schedules.due(T0 + timedelta(days=9)) == []
    assert storage.schedules.set_paused("nightly", False)
    assert [s.name for s in storage.schedules.due(T0)] == ["nightly"]
    assert not storage.schedules.set_paused("missing", True)
    assert storage.schedules.delete("nightly")
    assert not storage.schedules.delete("nightly")
    assert storage.schedules.get("nightly") is None


def test_due_is_not_paused_and_not_in_the_future_most_overdue_first(storage: Storage) -> None:
    for i, offset in enumerate([5, -3, 0, -10, 60]):
        storage.schedules.save(Schedule(f"s{i}", "echo", every=60, next_fire_at=T0 + timedelta(seconds=offset)))
    storage.schedules.save(Schedule("paused", "echo", every=60, paused=True, next_fire_at=T0 - timedelta(days=1)))
    storage.schedules.save(Schedule("never", "echo", every=60))  # no next fire time
    assert [s.name for s in storage.schedules.due(T0)] == ["s3", "s1", "s2"]
    assert [s.name for s in storage.schedules.due(T0, limit=2)] == ["s3", "s1"]
    assert [s.name for s in storage.schedules.due(T0 + timedelta(seconds=5))] == ["s3", "s1", "s2", "s0"]


def test_advance_is_conditional_on_the_expected_fire_time(storage: Storage) -> None:
    storage.schedules.save(nightly())
    nxt = T0 + timedelta(days=1)
    assert storage.schedules.advance("nightly", T0, nxt, T0, LEADER)
    # A second leader that read the same fire time: refused, nothing changes.
    assert not storage.schedules.advance("nightly", T0, nxt + timedelta(days=1), T0, LEADER)
    got = storage.schedules.get("nightly")
    assert got is not None and (got.next_fire_at, got.last_fire_at, got.last_task_id) == (nxt, T0, None)
    assert storage.schedules.fired("nightly", T0, "task-1", LEADER)
    assert not storage.schedules.fired("nightly", nxt, "task-2", LEADER)  # not the last fire
    # Missed times skipped (no fire): the last fire and its task stay.
    assert storage.schedules.advance("nightly", nxt, nxt + timedelta(days=5), None, LEADER)
    got = storage.schedules.get("nightly")
    assert got is not None and (got.next_fire_at, got.last_fire_at, got.last_task_id) == (
        nxt + timedelta(days=5),
        T0,
        "task-1",
    )
    assert not storage.schedules.advance("missing", T0, nxt, T0, LEADER)


def test_a_deposed_leaders_advance_and_fired_are_refused(storage: Storage) -> None:
    storage.schedules.save(nightly())
    old, new = Fence("scheduler", 10), Fence("scheduler", 11)
    assert storage.fences.advance(old) == 10
    assert storage.schedules.advance("nightly", T0, T0 + timedelta(days=1), T0, old)
    assert storage.fences.advance(new) == 11
    # The old leader, resumed after a pause, acts on what it read before: refused.
    assert not storage.schedules.fired("nightly", T0, "late", old)
    assert not storage.schedules.advance("nightly", T0 + timedelta(days=1), T0 + timedelta(days=2), T0, old)
    got = storage.schedules.get("nightly")
    assert got is not None and (got.next_fire_at, got.last_task_id) == (T0 + timedelta(days=1), None)
    assert storage.schedules.fired("nightly", T0, "task-1", new)
    assert storage.schedules.advance("nightly", T0 + timedelta(days=1), T0 + timedelta(days=2), None, new)
