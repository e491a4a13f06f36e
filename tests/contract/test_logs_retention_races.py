"""TaskLogRepository contract, retention purges and cross-process races, on every backend."""

from __future__ import annotations

import multiprocessing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from celery_ext.config import RetentionConfig, StorageConfig
from celery_ext.model import Task, TaskLog, TaskStatus
from celery_ext.storage import Storage, open_storage
from celery_ext.storage.retention import purge
from tests.support.storage import Backend

S = TaskStatus
T0 = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


def line(task_id: str, n: int, attempt: int = 1, time: datetime | None = None) -> TaskLog:
    return TaskLog(task_id, attempt, time or T0 + timedelta(milliseconds=n), "INFO", f"line {n}")


def test_logs_keep_write_order_across_batches(storage: Storage) -> None:
    # Same timestamps and times going backwards: the order is the order of writing.
    storage.logs.append([line("a", i, time=T0) for i in range(5)])
    storage.logs.append([line("b", 99)])
    storage.logs.append([line("a", i, time=T0 - timedelta(seconds=i)) for i in range(5, 300)])
    storage.logs.append([line("a", i, attempt=2) for i in range(300, 310)])
    storage.logs.append([])
    got = storage.logs.list("a")
    assert [l.message for l in got] == [f"line {i}" for i in range(310)]
    assert got[0] == line("a", 0, time=T0)
    assert [l.message for l in storage.logs.list("a", attempt=2)] == [f"line {i}" for i in range(300, 310)]
    assert [l.message for l in storage.logs.list("a", limit=3, offset=4)] == ["line 4", "line 5", "line 6"]
    assert [l.message for l in storage.logs.list("b")] == ["line 99"]
    assert storage.logs.list("nobody") == []


def test_logs_filter_by_run_and_attempt(storage: Storage) -> None:
    """A manual retry starts run 2, whose attempts count from 1 again."""
    storage.logs.append([line("r", 0), line("r", 1, attempt=2)])  # run 1 (the default)
    storage.logs.append(
        [TaskLog("r", 1, T0, "INFO", "run 2 a1", run=2), TaskLog("r", 2, T0, "ERROR", "run 2 a2", run=2)]
    )
    storage.logs.append([TaskLog("r", 1, T0, "INFO", "run 3 a1", run=3)])
    got = storage.logs.list("r")
    assert [(l.run, l.attempt, l.message) for l in got] == [
        (1, 1, "line 0"),
        (1, 2, "line 1"),
        (2, 1, "run 2 a1"),
        (2, 2, "run 2 a2"),
        (3, 1, "run 3 a1"),
    ]
    assert got[2] == TaskLog("r", 1, T0, "INFO", "run 2 a1", run=2)
    assert got[2].to_dict() == {
        "task_id": "r",
        "attempt": 1,
        "time": T0.isoformat(),
        "level": "INFO",
        "message": "run 2 a1",
        "run": 2,
    }
    assert [l.message for l in storage.logs.list("r", run=1)] == ["line 0", "line 1"]
    assert [l.message for l in storage.logs.list("r", run=2)] == ["run 2 a1", "run 2 a2"]
    assert [l.message for l in storage.logs.list("r", run=2, attempt=2)] == ["run 2 a2"]
    assert [l.message for l in storage.logs.list("r", attempt=1)] == ["line 0", "run 2 a1", "run 3 a1"]
    assert [l.message for l in storage.logs.list("r", run=2, limit=1, offset=1)] == ["run 2 a2"]
    assert storage.logs.list("r", run=4) == []


def test_log_messages_keep_unicode_and_size(storage: Storage) -> None:
    text = "é ✓ 日本 " + "x" * 70_000
    storage.logs.append([TaskLog("u", 1, T0, "WARNING", text)])
    assert storage.logs.list("u")[0].message == text


def _finished(i: int, status: S, age_days: float, now: datetime) -> Task:
    when = now - timedelta(days=age_days)
    return Task(
        task_id=f"p{i:04d}",
        task_type="echo",
        payload={},
        status=status,
        created_at=when,
        finished_at=when if status.terminal else None,
    )


def test_purge_removes_only_old_terminal_tasks_with_their_logs(storage: Storage) -> None:
    now = datetime.now(UTC)
    tasks = [_finished(i, S.SUCCEEDED, 10, now) for i in range(25)]
    tasks += [
        _finished(100, S.SUCCEEDED, 1, now),
        _finished(101, S.FAILED, 10, now),
        _finished(102, S.FAILED, 40, now),
        _finished(103, S.CANCELLED, 10, now),
        _finished(104, S.DEAD, 40, now),
    ]
    # Old but not finished: never touched, whatever the retention says.
    tasks += [
        Task(
            task_id=f"n{s.value}",
            task_type="echo",
            payload={},
            status=s,
            created_at=now - timedelta(days=90),
            updated_at=now - timedelta(days=90),
        )
        for s in (S.PENDING, S.SCHEDULED, S.QUEUED, S.RUNNING, S.RETRYING)
    ]
    storage.tasks.create_many(tasks)
    storage.logs.append([line(t.task_id, 1, time=now) for t in tasks])
    storage.logs.append([line("orphan", 1, time=now - timedelta(days=20)), line("orphan", 2, time=now)])
    with pytest.raises(ValueError, match="terminal"):
        storage.tasks.purge(S.RUNNING, now, 10)

    assert storage.tasks.purge(S.SUCCEEDED, now - timedelta(days=7), limit=10) == 10
    retention = RetentionConfig(
        succeeded=7 * 86400, failed=30 * 86400, cancelled=7 * 86400, dead=30 * 86400, logs=14 * 86400, batch_size=4
    )
    report = purge(storage, retention, now=now)
    assert report.tasks == {"succeeded": 15, "failed": 1, "cancelled": 1, "dead": 1}
    assert report.logs == 1
    left = {t.task_id for t in storage.tasks.scan(list(S), limit=1000)}
    assert left == {
        "p0100",
        "p0101",
        *(f"n{s.value}" for s in (S.PENDING, S.SCHEDULED, S.QUEUED, S.RUNNING, S.RETRYING)),
    }
    assert storage.logs.list("p0000") == [] and storage.logs.list("p0102") == []
    assert len(storage.logs.list("p0101")) == 1 and len(storage.logs.list("nrunning")) == 1
    assert [l.message for l in storage.logs.list("orphan")] == ["line 2"]
    assert purge(storage, retention, now=now).total_tasks == 0


# --- races: two processes, the same transition, the same 1,000 tasks --------------------------

N_RACE = 1000


def _race(config: dict[str, Any], data_dir: str, name: str, start: Any, out: Any) -> None:
    storage = open_storage(StorageConfig.model_validate(config), Path(data_dir))
    ids = [f"r{i:05d}" for i in range(N_RACE)]
    start.wait(30)
    won = [tid for tid in ids if storage.tasks.update(tid, [S.QUEUED], token="tok", status=S.RUNNING, worker_id=name)]
    storage.close()
    out.put((name, won))


def test_two_processes_race_for_the_same_transition_exactly_one_wins(backend: Backend) -> None:
    backend.clear()
    backend.storage.tasks.create_many(
        [
            Task(task_id=f"r{i:05d}", task_type="echo", payload={}, status=S.QUEUED, dispatch_token="tok")
            for i in range(N_RACE)
        ]
    )
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_race, args=(backend.config.model_dump(), str(backend.data_dir), f"w{i}", start, out))
        for i in range(2)
    ]
    for p in procs:
        p.start()
    start.set()
    results = dict(out.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    a, b = set(results["w0"]), set(results["w1"])
    assert not a & b, f"{len(a & b)} tasks were claimed twice"
    assert len(a | b) == N_RACE
    assert len(results["w0"]) == len(a) and len(results["w1"]) == len(b)
    for t in backend.storage.tasks.scan([S.RUNNING, S.QUEUED], limit=N_RACE + 1):
        assert t.status == S.RUNNING
        assert t.task_id in (a if t.worker_id == "w0" else b)
