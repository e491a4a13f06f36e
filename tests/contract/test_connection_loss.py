"""A kept per-thread connection killed by the server costs one failed statement, not the store.

The per-task claim and outcome writes run on a connection each thread keeps (``single()``) and,
on PostgreSQL and SQLite, straight on its DBAPI cursor.  When the server drops it (restart,
idle timeout, an administrator's kill), that statement fails with a clear ``StorageError``
(which the runner's write retry absorbs) and the next one runs on a fresh connection.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from celery_ext.errors import StorageError
from celery_ext.model import Task, TaskStatus
from celery_ext.storage import Storage, open_storage
from celery_ext.storage.sql import SqlSettings, build_url
from tests.support.storage import storage_config

S = TaskStatus


@pytest.fixture(params=["postgresql", "mysql"])
def server_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Storage, str]]:
    kind = str(request.param)
    config, cleanup = storage_config(kind, tmp_path, request)
    storage = open_storage(config, tmp_path)
    storage.migrate()
    yield kind, storage, str(config.config["url"])
    storage.close()
    for fn in cleanup:
        fn()


def kill_other_sessions(kind: str, url: str) -> int:
    """Terminate every other session on the test database, from an admin connection."""
    admin = create_engine(build_url(kind, SqlSettings(url=url), Path(".")))
    try:
        with admin.connect() as conn:
            if kind == "postgresql":
                return len(
                    conn.execute(
                        text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                        )
                    ).all()
                )
            ids = (
                conn.execute(
                    text(
                        "SELECT id FROM information_schema.processlist WHERE db = DATABASE() AND id <> CONNECTION_ID()"
                    )
                )
                .scalars()
                .all()
            )
            for pid in ids:
                conn.execute(text(f"KILL {int(pid)}"))
            return len(ids)
    finally:
        admin.dispose()


def test_update_after_the_server_dropped_the_connection(server_storage: tuple[str, Storage, str]) -> None:
    kind, storage, url = server_storage
    storage.tasks.create(Task(task_id="t1", task_type="echo", payload={}, status=S.QUEUED, dispatch_token="a"))
    assert storage.tasks.update("t1", [S.QUEUED], token="a", status=S.RUNNING, worker_id="w1")
    assert kill_other_sessions(kind, url) >= 1

    outcomes = []
    for _ in range(2):  # the first statement may fail on the dead connection; the second must not
        try:
            outcomes.append(storage.tasks.update("t1", [S.RUNNING], token="a", status=S.SUCCEEDED, result={"n": 1}))
        except StorageError as exc:
            assert "task store" in str(exc) and "failed" in str(exc)
            outcomes.append(None)
    assert outcomes in ([True, False], [None, True])
    got = storage.tasks.get("t1")
    assert got is not None and (got.status, got.result) == (S.SUCCEEDED, {"n": 1})
