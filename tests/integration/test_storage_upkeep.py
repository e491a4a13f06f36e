"""A PostgreSQL store whose dead rows are never reclaimed (autovacuum off, on the server or for a
table of records) is named at a worker's start and by ``celery-ext storage migrate``: every task
leaves dead row versions behind its claim and its outcome, so such a store grows without bound.
On a private server, whose settings the test may change."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from celery_ext.cli import main
from celery_ext.config import StorageConfig
from celery_ext.storage import Storage, open_storage
from celery_ext.storage.sql import _autovacuum_disabled
from tests.support.private import PrivatePostgres, private_postgres  # noqa: F401 - a fixture
from tests.support.workers import WorkerProcess, write_config


def reloaded(storage: Storage, count: int) -> list[str]:
    """The store's warnings once there are ``count`` of them: ``pg_reload_conf()`` only signals
    the server, and each backend reads the new configuration when it gets to it."""
    deadline = time.monotonic() + 10
    while len(warnings := storage.upkeep_warnings()) != count and time.monotonic() < deadline:
        time.sleep(0.05)
    return warnings


def test_reloptions_that_turn_autovacuum_off() -> None:
    assert _autovacuum_disabled(["fillfactor=80", "autovacuum_enabled=false"])
    assert _autovacuum_disabled(["autovacuum_enabled=OFF"])
    assert _autovacuum_disabled(["autovacuum_enabled = 0"])
    assert not _autovacuum_disabled(["autovacuum_enabled=true"])
    assert not _autovacuum_disabled(["autovacuum_vacuum_scale_factor=0.01"])
    assert not _autovacuum_disabled([])


def test_autovacuum_off_is_named_by_migrate_and_at_a_workers_start(
    private_postgres: PrivatePostgres,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    storage_section = {"type": "postgresql", "config": {"url": private_postgres.url()}}
    storage = open_storage(StorageConfig(**storage_section), tmp_path)
    try:
        storage.migrate()
        assert storage.upkeep_warnings() == []  # initdb's defaults: autovacuum on

        private_postgres.execute("ALTER TABLE tasks SET (autovacuum_enabled = off)")
        (warning,) = storage.upkeep_warnings()
        assert "table tasks has autovacuum_enabled = false" in warning

        private_postgres.execute("ALTER SYSTEM SET autovacuum = off", "SELECT pg_reload_conf()")
        server, table = reloaded(storage, 2)
        assert "the server runs with autovacuum = off" in server and "VACUUM ANALYZE" in server
        assert "table tasks" in table
    finally:
        storage.close()

    config = write_config(tmp_path, {"app": {"data_dir": str(tmp_path)}, "storage": storage_section})
    assert main(["--config", str(config), "storage", "migrate", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert len(out["warnings"]) == 2 and "autovacuum = off" in out["warnings"][0]
    assert captured.err.count("warning: ") == 2

    worker = WorkerProcess(config, concurrency=1).start()
    try:
        log = worker.log()
        assert "the server runs with autovacuum = off" in log and "table tasks has autovacuum_enabled" in log
        assert worker.alive()  # a warning, not a refusal
    finally:
        worker.stop()

    private_postgres.execute("ALTER SYSTEM RESET autovacuum", "SELECT pg_reload_conf()")
    private_postgres.execute("ALTER TABLE tasks RESET (autovacuum_enabled)")
    storage = open_storage(StorageConfig(**storage_section), tmp_path)
    try:
        assert reloaded(storage, 0) == []
    finally:
        storage.close()
    assert main(["--config", str(config), "storage", "migrate", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == []
