"""``TaskRepository.take_due``, the scheduler's due records taken and moved on, on every backend
(SQLite, PostgreSQL, MariaDB, MongoDB): PostgreSQL in one statement (``sql_due``), the others by
the fallback (scan, then a conditional update)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from celery_ext.model import Task, TaskStatus, new_id
from celery_ext.storage import Storage
from celery_ext.storage.base import Fence
from tests.support.storage import Backend

S = TaskStatus
DUE = (S.SCHEDULED, S.RETRYING)
T0 = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(milliseconds=int(seconds * 1000))


def waiting(i: int, run_at: float, status: TaskStatus = S.SCHEDULED) -> Task:
    # Created in the reverse order of run_at: the order taken must be run_at's, not creation's.
    return Task(
        f"d{i:05d}", "echo", {"i": i}, status=status, run_at=at(run_at), created_at=at(-i), dispatch_token="old"
    )


def take(storage: Storage, before: float, limit: int, fence: Fence | None = None) -> tuple[str, list[Any]]:
    token = new_id()
    taken = storage.tasks.take_due(
        DUE, at(before), limit, fence=fence, status=S.PENDING, dispatch_token=token, queued_at=at(before)
    )
    return token, taken


def test_takes_the_earliest_due_first_up_to_the_limit(storage: Storage) -> None:
    storage.tasks.create_many(
        [
            waiting(1, 2.0),
            waiting(2, 1.0, S.RETRYING),
            waiting(3, 3.0),
            waiting(4, 9.0),  # not due yet
            waiting(5, 0.5, S.CANCELLED),  # cancelled while it waited: never taken
            waiting(6, 0.5, S.RUNNING),
            waiting(7, 0.5, S.QUEUED),
        ]
    )
    token, taken = take(storage, 5.0, 2)
    assert [(t.task_id, was) for t, was in taken] == [("d00002", S.RETRYING), ("d00001", S.SCHEDULED)]
    for t, _ in taken:  # returned as stored after the move, every field read back
        assert t == storage.tasks.get(t.task_id)
        assert (t.status, t.dispatch_token, t.queued_at, t.payload) == (
            S.PENDING,
            token,
            at(5.0),
            {"i": int(t.task_id[1:])},
        )
    token2, taken = take(storage, 5.0, 10)
    assert [(t.task_id, was) for t, was in taken] == [("d00003", S.SCHEDULED)]
    assert take(storage, 5.0, 10)[1] == []
    assert [storage.tasks.get(f"d{i:05d}").status for i in range(4, 8)] == [  # type: ignore[union-attr]
        S.SCHEDULED,
        S.CANCELLED,
        S.RUNNING,
        S.QUEUED,
    ]
    assert storage.tasks.get("d00002").dispatch_token == token  # type: ignore[union-attr]


def test_a_deposed_leaders_take_is_refused(storage: Storage) -> None:
    storage.tasks.create_many([waiting(i, 1.0) for i in range(3)])
    old, new = Fence("scheduler", 10), Fence("scheduler", 11)
    assert storage.fences.advance(old) == 10
    assert len(take(storage, 2.0, 1, old)[1]) == 1
    assert storage.fences.advance(new) == 11
    assert take(storage, 2.0, 10, old)[1] == []  # the old leader, resumed: nothing moves
    assert sorted(t.status for t in (storage.tasks.get(f"d{i:05d}") for i in range(3)) if t) == [
        S.PENDING,
        S.SCHEDULED,
        S.SCHEDULED,
    ]
    assert len(take(storage, 2.0, 10, new)[1]) == 2


def test_two_takers_at_once_never_take_the_same_record(backend: Backend, storage: Storage) -> None:
    n = 600
    storage.tasks.create_many([waiting(i, i / 1000) for i in range(n)])
    stores = [backend.open(), backend.open()]
    got: list[list[str]] = [[], []]
    start = threading.Barrier(2)

    def taker(k: int) -> None:
        start.wait()
        while batch := take(stores[k], 10.0, 25)[1]:
            got[k].extend(t.task_id for t, _ in batch)

    threads = [threading.Thread(target=taker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for s in stores:
        s.close()
    assert not set(got[0]) & set(got[1])
    assert sorted(got[0] + got[1]) == [f"d{i:05d}" for i in range(n)]


def test_postgresql_skips_the_records_another_transaction_holds(backend: Backend, storage: Storage) -> None:
    """A record being cancelled (its row locked, not yet committed) is skipped, not waited for,
    and stays cancelled: ``FOR UPDATE SKIP LOCKED``."""
    if backend.kind != "postgresql":
        pytest.skip("SKIP LOCKED: PostgreSQL's one-statement take")
    storage.tasks.create_many([waiting(i, i) for i in range(4)])
    other: Any = backend.open()
    taken: list[Any] = []
    with other.begin() as conn:
        conn.exec_driver_sql("UPDATE tasks SET status = 'cancelled' WHERE task_id IN ('d00000', 'd00002')")
        thread = threading.Thread(target=lambda: taken.extend(take(storage, 10.0, 10)[1]))
        thread.start()
        thread.join(10)
        assert not thread.is_alive(), "take_due waited for the locked rows"
    other.close()
    assert [t.task_id for t, _ in taken] == ["d00001", "d00003"]
    assert [storage.tasks.get(f"d{i:05d}").status for i in range(4)] == [  # type: ignore[union-attr]
        S.CANCELLED,
        S.PENDING,
        S.CANCELLED,
        S.PENDING,
    ]
