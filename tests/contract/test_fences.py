"""Leader fences: a write carrying a fencing token older than the stored one is refused, on every
backend (SQLite, PostgreSQL, MariaDB, MongoDB)."""

from __future__ import annotations

from datetime import UTC, datetime

from celery_ext.model import Task, TaskStatus
from celery_ext.storage import Storage
from celery_ext.storage.base import Fence

S = TaskStatus
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_advance_keeps_the_newest_token(storage: Storage) -> None:
    assert storage.fences.current("scheduler") == 0
    assert storage.fences.advance(Fence("scheduler", 5)) == 5
    assert storage.fences.advance(Fence("scheduler", 3)) == 5  # an older leader learns it is deposed
    assert storage.fences.advance(Fence("scheduler", 9)) == 9
    assert storage.fences.current("scheduler") == 9
    assert storage.fences.current("other") == 0


def test_a_deposed_leaders_writes_are_refused(storage: Storage) -> None:
    storage.tasks.create_many(
        [Task(task_id=f"f{i}", task_type="echo", payload={}, status=S.SCHEDULED, created_at=T0) for i in range(3)]
    )
    old, new = Fence("scheduler", 10), Fence("scheduler", 11)
    assert storage.fences.advance(old) == 10
    assert storage.tasks.update("f0", [S.SCHEDULED], fence=old, status=S.QUEUED)
    assert storage.fences.advance(new) == 11
    # The old leader, resumed after a pause, acts on what it read before it: refused.
    assert not storage.tasks.update("f1", [S.SCHEDULED], fence=old, status=S.QUEUED)
    assert storage.tasks.update_many(["f1", "f2"], [S.SCHEDULED], fence=old, status=S.QUEUED) == 0
    assert [storage.tasks.get(f"f{i}").status for i in range(3)] == [S.QUEUED, S.SCHEDULED, S.SCHEDULED]  # type: ignore[union-attr]
    # The new leader's writes, and unfenced writes (workers, producers), go through.
    assert storage.tasks.update_many(["f1"], [S.SCHEDULED], fence=new, status=S.QUEUED) == 1
    assert storage.tasks.update("f2", [S.SCHEDULED], status=S.CANCELLED)
