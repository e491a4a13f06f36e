"""SQL schema versions: databases made by schema versions 1 and 2 are upgraded in place and keep
their data, and code of the previous version keeps working on the upgraded schema;
``celery-ext storage migrate | status | purge`` on real databases."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    create_engine,
    insert,
    inspect,
    text,
)

from celery_ext.cli import main
from celery_ext.config import StorageConfig
from celery_ext.model import Task, TaskFilter, TaskLog, TaskStatus
from celery_ext.storage import open_storage
from celery_ext.storage.base import to_record
from celery_ext.storage.sql import SqlStorage
from celery_ext.storage.sql_migrations import STEPS
from celery_ext.storage.sql_schema import SCHEMA_VERSION, JsonDoc, LogId, LongText, UtcDateTime
from tests.support.services import create_database, drop_database
from tests.support.workers import write_config

V2_INDEXES = {"tasks": "ix_tasks_status_finished", "task_logs": "ix_task_logs_time"}
V3_TASK_COLUMNS = ("run", "args", "parent_id", "root_id", "group_id")
V3_INDEXES = ("ix_tasks_root", "ix_tasks_group")


def old_metadata(version: int, with_version_table: bool = True) -> MetaData:
    """The schema of ``version`` (1 or 2), frozen here as it was, whatever ``sql_schema`` says now."""
    assert version in (1, 2)
    md = MetaData()
    v2 = version >= 2
    Table(
        "tasks",
        md,
        Column("task_id", String(64), primary_key=True),
        Column("task_type", String(128), nullable=False),
        Column("payload", JsonDoc, nullable=False),
        Column("status", String(16), nullable=False),
        Column("priority", SmallInteger, nullable=False, default=0),
        Column("attempt", Integer, nullable=False, default=0),
        Column("max_retries", Integer, nullable=False, default=0),
        Column("timeout", Float, nullable=True),
        Column("run_at", UtcDateTime, nullable=True),
        Column("worker_id", String(255), nullable=True),
        Column("result", JsonDoc, nullable=True),
        Column("error_reason", String(64), nullable=True),
        Column("error_message", LongText, nullable=True),
        Column("idempotency_key", String(255), nullable=True, unique=True),
        Column("dispatch_token", String(64), nullable=True),
        Column("lease_until", UtcDateTime, nullable=True),
        Column("created_at", UtcDateTime, nullable=False),
        Column("queued_at", UtcDateTime, nullable=True),
        Column("started_at", UtcDateTime, nullable=True),
        Column("finished_at", UtcDateTime, nullable=True),
        Column("updated_at", UtcDateTime, nullable=True),
        Index("ix_tasks_created", "created_at", "task_id"),
        Index("ix_tasks_status_type_created", "status", "task_type", "created_at"),
        Index("ix_tasks_type_created", "task_type", "created_at"),
        Index("ix_tasks_worker_created", "worker_id", "created_at"),
        Index("ix_tasks_status_run_at", "status", "run_at"),
        Index("ix_tasks_status_lease", "status", "lease_until"),
        *([Index("ix_tasks_status_finished", "status", "finished_at")] if v2 else []),
    )
    Table(
        "task_logs",
        md,
        Column("id", LogId, primary_key=True, autoincrement=True),
        Column("task_id", String(64), nullable=False),
        Column("attempt", Integer, nullable=False),
        Column("time", UtcDateTime, nullable=False),
        Column("level", String(16), nullable=False),
        Column("message", LongText, nullable=False),
        Index("ix_task_logs_task", "task_id", "id"),
        *([Index("ix_task_logs_time", "time")] if v2 else []),
    )
    if with_version_table:
        Table(
            "celery_ext_schema",
            md,
            Column("version", Integer, primary_key=True),
            Column("applied_at", UtcDateTime, nullable=False),
        )
    return md


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def sql_config(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StorageConfig]:
    kind = str(request.param)
    if kind == "sqlite":
        yield StorageConfig(type="sqlite", config={"path": str(tmp_path / "old.db")})
        return
    url = create_database(kind)
    yield StorageConfig(type=kind, config={"url": url})
    drop_database(kind, url)


def make_old(storage: SqlStorage, version: int, with_version_table: bool = True) -> MetaData:
    """Create the tables of schema ``version`` as that version's code did; returns their metadata."""
    engine = create_engine(storage.url)
    md = old_metadata(version, with_version_table)
    with engine.begin() as conn:
        md.create_all(conn)
        if with_version_table:
            conn.execute(
                insert(md.tables["celery_ext_schema"]),
                [{"version": v, "applied_at": datetime.now(UTC)} for v in range(1, version + 1)],
            )
    engine.dispose()
    return md


def write_old(storage: SqlStorage, md: MetaData, tasks: Sequence[Task] = (), logs: Sequence[TaskLog] = ()) -> None:
    """Write tasks and log lines as code of an older schema does: only the columns it knows."""
    old_tasks, old_logs = md.tables["tasks"], md.tables["task_logs"]
    with storage.begin() as conn:
        if tasks:
            conn.execute(
                insert(old_tasks), [{k: v for k, v in to_record(t).items() if k in old_tasks.c} for t in tasks]
            )
        if logs:
            conn.execute(
                insert(old_logs),
                [
                    {"task_id": l.task_id, "attempt": l.attempt, "time": l.time, "level": l.level, "message": l.message}
                    for l in logs
                ],
            )


def column_names(storage: SqlStorage, table: str) -> set[str]:
    with storage.begin() as conn:
        return {c["name"] for c in inspect(conn).get_columns(table)}


def index_names(storage: SqlStorage, table: str) -> set[str]:
    with storage.begin() as conn:
        return {i["name"] for i in inspect(conn).get_indexes(table)}


def step_names(after: int) -> list[str]:
    return [f"{s.version}: {s.description}" for s in STEPS if s.version > after]


def old_tasks(prefix: str, n: int) -> list[Task]:
    return [
        Task(
            task_id=f"{prefix}{i}",
            task_type="echo",
            payload={"i": i},
            status=TaskStatus.SUCCEEDED,
            finished_at=datetime.now(UTC) - timedelta(days=1),
            attempt=2,
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("with_version_table", [True, False], ids=["v1", "unversioned"])
def test_v1_database_is_migrated_in_place_and_keeps_its_tasks(
    sql_config: StorageConfig, tmp_path: Path, with_version_table: bool
) -> None:
    storage = open_storage(sql_config, tmp_path)
    assert isinstance(storage, SqlStorage)
    v1 = make_old(storage, 1, with_version_table)
    assert storage.schema_version() == (1, SCHEMA_VERSION)
    old = old_tasks("old", 20)
    write_old(storage, v1, old, [TaskLog("old1", 1, datetime.now(UTC), "INFO", "kept")])
    assert V2_INDEXES["tasks"] not in index_names(storage, "tasks")

    applied = storage.migrate()
    assert applied == step_names(1)
    assert applied[0] == "2: indexes for retention purges: tasks(status, finished_at), task_logs(time)"
    assert storage.schema_version() == (SCHEMA_VERSION, SCHEMA_VERSION)
    for table, index in V2_INDEXES.items():
        assert index in index_names(storage, table)
    assert set(V3_INDEXES) <= index_names(storage, "tasks")
    assert storage.tasks.get("old7") == old[7].replace(updated_at=old[7].created_at)
    assert [(l.message, l.run) for l in storage.logs.list("old1")] == [("kept", 1)]
    assert storage.migrate() == []  # already current
    storage.close()


def test_v2_database_is_migrated_in_place_and_v2_code_keeps_working(sql_config: StorageConfig, tmp_path: Path) -> None:
    storage = open_storage(sql_config, tmp_path)
    assert isinstance(storage, SqlStorage)
    v2 = make_old(storage, 2)
    assert storage.schema_version() == (2, SCHEMA_VERSION)
    assert not set(V3_TASK_COLUMNS) & column_names(storage, "tasks")
    old = old_tasks("old", 30) + [
        Task(
            task_id="running",
            task_type="echo",
            payload={"x": [1]},
            status=TaskStatus.RUNNING,
            dispatch_token="tok",
            worker_id="w1",
        )
    ]
    write_old(
        storage,
        v2,
        old,
        [TaskLog("old1", 1, datetime.now(UTC), "INFO", "one"), TaskLog("old1", 2, datetime.now(UTC), "INFO", "two")],
    )

    applied = storage.migrate()
    assert applied == step_names(2) and applied[0].startswith("3: ")
    assert storage.schema_version() == (SCHEMA_VERSION, SCHEMA_VERSION)
    assert set(V3_TASK_COLUMNS) <= column_names(storage, "tasks")
    assert "run" in column_names(storage, "task_logs")
    assert set(V3_INDEXES) <= index_names(storage, "tasks")
    assert "ix_schedules_due" in index_names(storage, "celery_ext_schedules")  # v5
    # Every record kept, the new fields at their defaults.
    for task in old:
        got = storage.tasks.get(task.task_id)
        assert got == task.replace(updated_at=task.created_at)
        assert (got.run, got.args, got.parent_id, got.root_id, got.group_id) == (1, None, None, None, None)
    assert [(l.message, l.attempt, l.run) for l in storage.logs.list("old1", run=1)] == [("one", 1, 1), ("two", 2, 1)]
    # The new code writes and filters on the new fields...
    assert storage.tasks.update("running", [TaskStatus.RUNNING], token="tok", status=TaskStatus.SUCCEEDED, result=3)
    storage.tasks.create(
        Task(task_id="child", task_type="echo", payload={}, run=2, args=[3], parent_id="running", root_id="running")
    )
    got = storage.tasks.get("child")
    assert got is not None and (got.run, got.args, got.root_id) == (2, [3], "running")
    assert [t.task_id for t in storage.tasks.list(TaskFilter(root_id="running")).items] == ["child"]
    # ...while code of version 2 (a rolling upgrade) still inserts rows and lines it does not know
    # the new columns of: they read back as run 1 and None.
    late = Task(task_id="late", task_type="echo", payload={}, status=TaskStatus.QUEUED)
    write_old(storage, v2, [late], [TaskLog("late", 1, datetime.now(UTC), "INFO", "from v2")])
    assert storage.tasks.get("late") == late.replace(updated_at=late.created_at)
    assert [(l.message, l.run) for l in storage.logs.list("late", run=1)] == [("from v2", 1)]
    with storage.begin() as conn:  # and v2 code reads the rows it selects by its own columns
        rows = conn.execute(v2.tables["tasks"].select().where(v2.tables["tasks"].c.task_id == "child")).all()
    assert [r.task_id for r in rows] == ["child"]
    assert storage.migrate() == []
    storage.close()


def test_a_half_applied_v3_step_is_completed(sql_config: StorageConfig, tmp_path: Path) -> None:
    """MySQL commits each DDL statement, so a step can stop half-way: running it again finishes it."""
    storage = open_storage(sql_config, tmp_path)
    assert isinstance(storage, SqlStorage)
    v2 = make_old(storage, 2)
    write_old(storage, v2, old_tasks("old", 3))
    with storage.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE tasks ADD COLUMN parent_id VARCHAR(64)")
    assert storage.migrate() == step_names(2)
    assert set(V3_TASK_COLUMNS) <= column_names(storage, "tasks")
    got = storage.tasks.get("old1")
    assert got is not None and got.run == 1 and got.parent_id is None
    storage.close()


def test_fresh_database_records_every_version(sql_config: StorageConfig, tmp_path: Path) -> None:
    storage = open_storage(sql_config, tmp_path)
    assert storage.schema_version() == (None, SCHEMA_VERSION)
    assert storage.migrate() == []
    assert isinstance(storage, SqlStorage)
    with storage.begin() as conn:
        versions = sorted(conn.execute(text("SELECT version FROM celery_ext_schema")).scalars())
    assert versions == list(range(1, SCHEMA_VERSION + 1))
    storage.close()


def run_cli(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, Any]:
    code = main(["--config", str(config), "storage", *args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else None


def test_cli_migrate_status_and_purge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "cli.db"
    config = write_config(
        tmp_path,
        {
            "storage": {
                "type": "sqlite",
                "config": {"path": str(db)},
                "retention": {"succeeded": "7d", "failed": "30d", "logs": "14d", "batch_size": 2},
            }
        },
    )
    code, status = run_cli(capsys, config, "status")
    assert code == 0 and status["state"] == "empty" and status["schema_version"] is None

    storage = open_storage(StorageConfig(type="sqlite", config={"path": str(db)}), tmp_path)
    assert isinstance(storage, SqlStorage)
    make_old(storage, 1)
    code, status = run_cli(capsys, config, "status")
    assert (status["schema_version"], status["state"]) == (1, "migration needed")
    code, out = run_cli(capsys, config, "migrate")
    assert code == 0 and (out["from"], out["to"]) == (1, SCHEMA_VERSION) and out["applied"] == step_names(1)

    now = datetime.now(UTC)
    storage.tasks.create_many(
        [
            Task(
                task_id=f"s{i}",
                task_type="echo",
                payload={},
                status=TaskStatus.SUCCEEDED,
                finished_at=now - timedelta(days=8),
            )
            for i in range(5)
        ]
        + [
            Task(
                task_id="f1",
                task_type="echo",
                payload={},
                status=TaskStatus.FAILED,
                finished_at=now - timedelta(days=8),
            ),
            Task(
                task_id="r1",
                task_type="echo",
                payload={},
                status=TaskStatus.RUNNING,
                created_at=now - timedelta(days=100),
            ),
        ]
    )
    storage.logs.append(
        [TaskLog("r1", 1, now - timedelta(days=20), "INFO", "old"), TaskLog("r1", 1, now, "INFO", "new")]
    )
    code, status = run_cli(capsys, config, "status")
    assert status["counts"] == {"succeeded": 5, "failed": 1, "running": 1} and status["state"] == "up to date"

    code, report = run_cli(capsys, config, "purge")
    assert code == 0 and report["tasks"] == {"succeeded": 5, "failed": 0} and report["logs"] == 1
    assert storage.tasks.get("f1") is not None and storage.tasks.get("r1") is not None
    assert [l.message for l in storage.logs.list("r1")] == ["new"]

    assert main(["--config", str(config), "storage", "status"]) == 0
    assert "up to date" in capsys.readouterr().out
    storage.close()


def test_cli_reports_an_unreachable_store_with_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(
        tmp_path,
        {
            "storage": {
                "type": "postgresql",
                "config": {"url": "postgresql://bob:s3cret@127.0.0.1:1/nowhere", "connect_timeout": 2},
            }
        },
    )
    assert main(["--config", str(config), "storage", "status"]) == 3
    err = capsys.readouterr().err
    assert "127.0.0.1:1/nowhere" in err and "s3cret" not in err


def _migrate(config: dict[str, Any], data_dir: str, start: Any, out: Any) -> None:
    storage = open_storage(StorageConfig.model_validate(config), Path(data_dir))
    start.wait(30)
    try:
        storage.migrate()
        out.put("ok")
    except Exception as exc:  # reported to the test, which names it
        out.put(f"{type(exc).__name__}: {exc}")
    finally:
        storage.close()


def test_workers_starting_together_migrate_once(sql_config: StorageConfig, tmp_path: Path) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_migrate, args=(sql_config.model_dump(), str(tmp_path), start, out)) for _ in range(3)]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert results == ["ok"] * 3
    storage = open_storage(sql_config, tmp_path)
    assert isinstance(storage, SqlStorage)
    with storage.begin() as conn:
        versions = sorted(conn.execute(text("SELECT version FROM celery_ext_schema")).scalars())
    assert versions == list(range(1, SCHEMA_VERSION + 1))
    storage.close()


def test_v5_database_gets_the_chart_index(sql_config: StorageConfig, tmp_path: Path) -> None:
    """Version 6 only adds tasks(created_at, status, task_type); a v5 database keeps its tasks."""
    from celery_ext.storage.sql_schema import groups as groups_table
    from celery_ext.storage.sql_schema import tasks as tasks_table

    storage = open_storage(sql_config, tmp_path)
    assert isinstance(storage, SqlStorage)
    storage.migrate()
    old = old_tasks("v5-", 5)
    for task in old:
        storage.tasks.create(task)
    with storage.begin() as conn:  # back to version 5, as that version's code left the database
        next(i for i in tasks_table.indexes if i.name == "ix_tasks_created_status_type").drop(conn)
        groups_table.drop(conn)
        conn.execute(text("DELETE FROM celery_ext_schema WHERE version >= 6"))
    assert storage.schema_version() == (5, SCHEMA_VERSION)
    assert "ix_tasks_created_status_type" not in index_names(storage, "tasks")

    assert storage.migrate() == step_names(5)
    assert storage.schema_version() == (SCHEMA_VERSION, SCHEMA_VERSION)
    assert "ix_tasks_created_status_type" in index_names(storage, "tasks")
    assert [storage.tasks.get(t.task_id) for t in old] == [t.replace(updated_at=t.created_at) for t in old]
    assert storage.migrate() == []
    storage.close()


def test_v6_database_gets_progress_and_the_groups_table(sql_config: StorageConfig, tmp_path: Path) -> None:
    """Version 7 adds tasks.progress (Celery's update_state) and celery_ext_groups (Celery's
    GroupResult.save()); a v6 database keeps its tasks, and both work after the upgrade."""
    from celery_ext.storage.sql_schema import groups as groups_table

    storage = open_storage(sql_config, tmp_path)
    assert isinstance(storage, SqlStorage)
    storage.migrate()
    old = old_tasks("v6-", 3)
    for task in old:
        storage.tasks.create(task)
    with storage.begin() as conn:  # back to version 6
        groups_table.drop(conn)
        conn.execute(text("ALTER TABLE tasks DROP COLUMN progress"))
        conn.execute(text("DELETE FROM celery_ext_schema WHERE version = 7"))
    assert storage.schema_version() == (6, SCHEMA_VERSION)
    storage.close()  # SQLAlchemy's pool and the reader keep the old column list per connection
    storage = open_storage(sql_config, tmp_path)
    assert isinstance(storage, SqlStorage)

    assert storage.migrate() == step_names(6)
    assert storage.schema_version() == (SCHEMA_VERSION, SCHEMA_VERSION)
    assert "ix_groups_saved" in index_names(storage, "celery_ext_groups")
    assert [storage.tasks.get(t.task_id) for t in old] == [t.replace(updated_at=t.created_at) for t in old]
    report = {"state": "PROGRESS", "meta": {"done": 1}, "attempt": 0, "run": 1, "at": "2026-12-04T00:00:00+00:00"}
    assert storage.tasks.update(old[0].task_id, [old[0].status], progress=report)
    assert storage.tasks.get(old[0].task_id).progress == report  # type: ignore[union-attr]
    assert storage.groups is not None
    storage.groups.save("g-after-upgrade", [["g-after-upgrade", None], [[["m1", None], None]]])
    saved = storage.groups.get("g-after-upgrade")
    assert saved is not None and saved.result == [["g-after-upgrade", None], [[["m1", None], None]]]
    assert storage.migrate() == []
    storage.close()
