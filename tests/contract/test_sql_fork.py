"""PostgreSQL storage in a forked child (a prefork pool process): the child keeps the parent's
engine (its dialect and compiled statements stay shared with the parent) but never its
connections.

The child opens connections of its own, both the kept autocommit one (``single``) and a pooled
one (``begin``); the parent's connections, opened before the fork and used again after the
child wrote through the store, gone and exited, are the same server sessions as before.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_ext.model import Task, TaskStatus
from celery_ext.storage import open_storage
from celery_ext.storage.sql import SqlStorage
from tests.support.storage import storage_config


@pytest.fixture
def pg(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlStorage]:
    config, cleanup = storage_config("postgresql", tmp_path, request)
    storage = open_storage(config, tmp_path)
    assert isinstance(storage, SqlStorage)
    storage.migrate()
    yield storage
    storage.close()
    for fn in cleanup:
        fn()


def sessions(storage: SqlStorage) -> dict[str, int]:
    """The server session (backend pid) of this process's kept connection and of a pooled one."""
    with storage.single() as conn:
        kept = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    with storage.begin() as conn:
        pooled = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    return {"kept": int(kept), "pooled": int(pooled)}


def in_child(storage: SqlStorage, explicit: bool) -> dict[str, Any]:
    """Run in the forked child: use the store as a pool process does, report what it used."""
    engine = storage._engine
    if explicit:  # the worker's worker_process_init; else the first use notices the new pid
        storage.after_fork()
    task = Task(task_id="child-1", task_type="echo", payload={})
    storage.tasks.create(task)
    claimed = storage.tasks.update("child-1", (TaskStatus.PENDING,), durable=False, status=TaskStatus.RUNNING)
    record = storage.tasks.get("child-1")
    used = sessions(storage)
    same_engine = storage.engine is engine
    storage.close()  # as a pool process's shutdown may: closes only the child's own connections
    gc.collect()  # and the parent's, forgotten by the child, are collected here
    return {
        "sessions": used,
        "same_engine": same_engine,
        "claimed": claimed,
        "status": record.status.value if record else None,
    }


@pytest.mark.parametrize("explicit", [True, False], ids=["after_fork", "first_use"])
def test_forked_child_keeps_the_engine_never_the_connections(pg: SqlStorage, explicit: bool) -> None:
    pg.tasks.create(Task(task_id="parent-1", task_type="echo", payload={}))
    pg.tasks.get("parent-1")  # the compiled read and insert are made before the fork, as in a worker
    before = sessions(pg)
    engine = pg.engine

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            os.close(read)
            out = json.dumps(in_child(pg, explicit)).encode()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            out, code = json.dumps({"error": repr(exc)}).encode(), 1
        with os.fdopen(write, "wb") as f:
            f.write(out)
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        child = json.loads(f.read())
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, child

    assert child["same_engine"], "the child rebuilt the engine instead of keeping the parent's"
    assert child["claimed"] and child["status"] == "running"
    # The child had sessions of its own: none is one of the parent's.
    assert not set(child["sessions"].values()) & set(before.values()), (child, before)
    # The parent's connections outlived the child's use of the store, its close and its exit:
    # the same server sessions, still answering.
    assert pg.engine is engine
    assert sessions(pg) == before
    record = pg.tasks.get("child-1")
    assert record is not None and record.status is TaskStatus.RUNNING
    assert pg.tasks.update("child-1", (TaskStatus.RUNNING,), status=TaskStatus.SUCCEEDED)
