"""Every storage backend on a real server, for the storage contract suite.

``backend`` (module-scoped, one per kind) gives a migrated ``Storage`` on a fresh database of its
own; ``storage`` empties it before each test.  Kinds: sqlite, postgresql, mysql (MariaDB),
mongodb (nx-27017).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete

from celery_ext.config import StorageConfig
from celery_ext.storage import Storage, open_storage
from tests.support.mongo import MongoServer, database_url
from tests.support.services import create_database, drop_database

KINDS = ["sqlite", "postgresql", "mysql", "mongodb"]


@dataclass
class Backend:
    kind: str
    config: StorageConfig
    data_dir: Path
    storage: Storage

    def open(self) -> Storage:
        """Another, independent ``Storage`` on the same database (as another process would have)."""
        return open_storage(self.config, self.data_dir)

    def clear(self) -> None:
        s: Any = self.storage
        if self.kind == "mongodb":
            s.collection("tasks").delete_many({})
            s.collection("logs").delete_many({})
            s.db["celery_ext_schedules"].delete_many({})
            s.db["celery_ext_fences"].delete_many({})
            s.db["celery_ext_groups"].delete_many({})
            return
        from celery_ext.storage.sql_schema import fences, groups, schedules, task_logs, tasks

        with s.begin() as conn:
            conn.execute(delete(task_logs))
            conn.execute(delete(tasks))
            conn.execute(delete(schedules))
            conn.execute(delete(fences))
            conn.execute(delete(groups))


def storage_config(kind: str, tmp: Path, request: pytest.FixtureRequest) -> tuple[StorageConfig, list[Any]]:
    """A config for a fresh database of ``kind``; returns it and what to clean up afterwards."""
    cleanup: list[Any] = []
    if kind == "sqlite":
        return StorageConfig(type="sqlite", config={"path": str(tmp / "tasks.db")}), cleanup
    if kind == "mongodb":
        server: MongoServer = request.getfixturevalue("mongo_server")
        return StorageConfig(type="mongodb", config={"uri": database_url(server)}), cleanup
    url = create_database(kind)
    cleanup.append(lambda: drop_database(kind, url))
    return StorageConfig(type=kind, config={"url": url}), cleanup


@pytest.fixture(scope="module", params=KINDS)
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    kind = str(request.param)
    tmp = tmp_path_factory.mktemp(f"store-{kind}")
    config, cleanup = storage_config(kind, tmp, request)
    storage = open_storage(config, tmp)
    storage.migrate()
    yield Backend(kind, config, tmp, storage)
    storage.close()
    for fn in cleanup:
        fn()


@pytest.fixture
def storage(backend: Backend) -> Storage:
    backend.clear()
    return backend.storage
