"""Unit fixtures: storage is SQLite in a temp dir (a real database, no server), one per test module:
tests count only the records they made."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from celery_ext.config import StorageConfig
from celery_ext.storage import Storage, open_storage


@pytest.fixture(scope="module")
def sqlite_storage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Storage]:
    tmp = tmp_path_factory.mktemp("sqlite")
    storage = open_storage(StorageConfig(type="sqlite", config={"path": str(tmp / "tasks.db")}), tmp)
    storage.migrate()
    yield storage
    storage.close()
