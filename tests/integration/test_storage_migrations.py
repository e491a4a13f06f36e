"""SQL schema versions: a database made by schema version 1 is upgraded in place and keeps its data;
``celery-ext storage migrate | status | purge`` on real databases."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import MetaData, create_engine, insert, inspect, text

from celery_ext.cli import main
from celery_ext.config import StorageConfig
from celery_ext.model import Task, TaskLog, TaskStatus
from celery_ext.storage import open_storage
from celery_ext.storage.sql import SqlStorage
from celery_ext.storage.sql_schema import SCHEMA_VERSION, metadata
from tests.support.services import create_database, drop_database
from tests.support.workers import write_config

V2_INDEXES = {"tasks": "ix_tasks_status_finished", "task_logs": "ix_task_logs_time"}


def v1_metadata(with_version_table: bool) -> MetaData:
    """The first schema: today's tables without what later versions added."""
    v1 = MetaData()
    for table in metadata.tables.values():
        if table.name == "celery_ext_schema" and not with_version_table:
            continue
        copy = table.to_metadata(v1)
        for index in list(copy.indexes):
            if index.name in V2_INDEXES.values():
                copy.indexes.remove(index)
    return v1


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def sql_config(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StorageConfig]:
    kind = str(request.param)
    if kind == "sqlite":
        yield StorageConfig(type="sqlite", config={"path": str(tmp_path / "v1.db")})
        return
    url = create_database(kind)
    yield StorageConfig(type=kind, config={"url": url})
    drop_database(kind, url)


def make_v1(storage: SqlStorage, with_version_table: bool) -> None:
    engine = create_engine(storage.url)
    v1 = v1_metadata(with_version_table)
    with engine.begin() as conn:
        v1.create_all(conn)
        if with_version_table:
            conn.execute(insert(v1.tables["celery_ext_schema"]).values(version=1, applied_at=datetime.now(UTC)))
    engine.dispose()


def index_names(storage: SqlStorage, table: str) -> set[str]:
    with storage.begin() as conn:
        return {i["name"] for i in inspect(conn).get_indexes(table)}


@pytest.mark.parametrize("with_version_table", [True, False], ids=["v1", "unversioned"])
def test_v1_database_is_migrated_in_place_and_keeps_its_tasks(
    sql_config: StorageConfig, tmp_path: Path, with_version_table: bool
) -> None:
    storage = open_storage(sql_config, tmp_path)
    assert isinstance(storage, SqlStorage)
    make_v1(storage, with_version_table)
    assert storage.schema_version() == (1, SCHEMA_VERSION)
    old = [Task(task_id=f"old{i}", task_type="echo", payload={"i": i}, status=TaskStatus.SUCCEEDED,
                finished_at=datetime.now(UTC) - timedelta(days=1)) for i in range(20)]
    storage.tasks.create_many(old)
    storage.logs.append([TaskLog("old1", 1, datetime.now(UTC), "INFO", "kept")])
    assert V2_INDEXES["tasks"] not in index_names(storage, "tasks")

    applied = storage.migrate()
    assert applied == ["2: indexes for retention purges: tasks(status, finished_at), task_logs(time)"]
    assert storage.schema_version() == (SCHEMA_VERSION, SCHEMA_VERSION)
    for table, index in V2_INDEXES.items():
        assert index in index_names(storage, table)
    assert storage.tasks.get("old7") == old[7].replace(updated_at=old[7].created_at)
    assert [l.message for l in storage.logs.list("old1")] == ["kept"]
    assert storage.migrate() == []  # already current
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
    config = write_config(tmp_path, {"storage": {
        "type": "sqlite", "config": {"path": str(db)},
        "retention": {"succeeded": "7d", "failed": "30d", "logs": "14d", "batch_size": 2}}})
    code, status = run_cli(capsys, config, "status")
    assert code == 0 and status["state"] == "empty" and status["schema_version"] is None

    storage = open_storage(StorageConfig(type="sqlite", config={"path": str(db)}), tmp_path)
    assert isinstance(storage, SqlStorage)
    make_v1(storage, True)
    code, status = run_cli(capsys, config, "status")
    assert (status["schema_version"], status["state"]) == (1, "migration needed")
    code, out = run_cli(capsys, config, "migrate")
    assert code == 0 and (out["from"], out["to"]) == (1, SCHEMA_VERSION) and len(out["applied"]) == 1

    now = datetime.now(UTC)
    storage.tasks.create_many(
        [Task(task_id=f"s{i}", task_type="echo", payload={}, status=TaskStatus.SUCCEEDED,
              finished_at=now - timedelta(days=8)) for i in range(5)]
        + [Task(task_id="f1", task_type="echo", payload={}, status=TaskStatus.FAILED,
                finished_at=now - timedelta(days=8)),
           Task(task_id="r1", task_type="echo", payload={}, status=TaskStatus.RUNNING,
                created_at=now - timedelta(days=100))])
    storage.logs.append([TaskLog("r1", 1, now - timedelta(days=20), "INFO", "old"),
                         TaskLog("r1", 1, now, "INFO", "new")])
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
    config = write_config(tmp_path, {"storage": {"type": "postgresql", "config": {
        "url": "postgresql://bob:s3cret@127.0.0.1:1/nowhere", "connect_timeout": 2}}})
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
    procs = [ctx.Process(target=_migrate, args=(sql_config.model_dump(), str(tmp_path), start, out))
             for _ in range(3)]
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
