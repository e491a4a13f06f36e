"""``storage.type`` resolution: built-in names, the ``celery_ext.storage`` entry-point group, then
``module:Class``; an unknown name lists the known ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from celery_ext.config import StorageConfig
from celery_ext.errors import ConfigError
from celery_ext.registry import STORAGE
from celery_ext.storage import open_storage
from celery_ext.storage.base import LogMaintenance, TaskLogRepository, TaskMaintenance, TaskRepository
from celery_ext.storage.mongo import MongoStorage, MongoTaskLogRepository, MongoTaskRepository
from celery_ext.storage.sql import SqlStorage, SqlTaskLogRepository, SqlTaskRepository


class RecordingStorage(SqlStorage):
    """A third-party backend: here, SQLite that remembers it was built through the registry."""

    built_as: str | None = None

    @classmethod
    def from_config(cls, type_name: str, config: dict[str, Any], data_dir: Path) -> RecordingStorage:
        storage = super().from_config("sqlite", config, data_dir)
        storage.built_as = type_name  # type: ignore[attr-defined]
        return storage  # type: ignore[return-value]


class NotAStorage:
    pass


def bare(repository: object, required: type) -> Any:
    """``repository`` behind only the ABC every backend must implement: no optional capability."""

    def forward(name: str) -> Any:
        return lambda self, *args, **kwargs: getattr(repository, name)(*args, **kwargs)

    methods = {name: forward(name) for name in required.__abstractmethods__}  # type: ignore[attr-defined]
    return type(f"Bare{required.__name__}", (required,), methods)()


class BareStorage(SqlStorage):
    """A third-party backend with only what every backend must have (SQLite underneath)."""

    @classmethod
    def from_config(cls, type_name: str, config: dict[str, Any], data_dir: Path) -> SqlStorage:
        storage = super().from_config("sqlite", config, data_dir)
        storage.tasks = bare(storage.tasks, TaskRepository)
        storage.logs = bare(storage.logs, TaskLogRepository)
        storage.groups = None
        return storage


def install_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, target: str) -> None:
    """A real installed distribution (a .dist-info on sys.path) declaring one storage entry point."""
    dist = tmp_path / "site" / "ce_storage_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ce-storage-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[celery_ext.storage]\n{name} = {target}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))


@pytest.mark.parametrize(
    ("name", "cls"),
    [("sqlite", SqlStorage), ("postgresql", SqlStorage), ("mysql", SqlStorage), ("mongodb", MongoStorage)],
)
def test_builtin_names(name: str, cls: type) -> None:
    assert STORAGE.resolve(name, "storage.type") is cls


def test_entry_point_backend_is_found_and_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_entry_point(tmp_path, monkeypatch, "recording", f"{__name__}:RecordingStorage")
    assert "recording" in STORAGE.known()
    storage = open_storage(StorageConfig(type="recording", config={"path": str(tmp_path / "x.db")}), tmp_path)
    assert isinstance(storage, RecordingStorage) and storage.built_as == "recording"
    assert isinstance(storage.tasks, SqlTaskRepository) and isinstance(storage.logs, SqlTaskLogRepository)


def test_entry_point_reusing_a_builtin_name_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_entry_point(tmp_path, monkeypatch, "mongodb", f"{__name__}:RecordingStorage")
    with pytest.raises(ConfigError, match="reuses the built-in storage backend name 'mongodb'"):
        STORAGE.resolve("mongodb", "storage.type")


def test_entry_point_to_a_non_storage_class_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_entry_point(tmp_path, monkeypatch, "bogus", f"{__name__}:NotAStorage")
    with pytest.raises(ConfigError, match="storage.type: storage backend 'bogus' .* not a subclass of Storage"):
        STORAGE.resolve("bogus", "storage.type")


def test_module_class_path(tmp_path: Path) -> None:
    storage = open_storage(
        StorageConfig(type=f"{__name__}:RecordingStorage", config={"path": str(tmp_path / "y.db")}), tmp_path
    )
    assert isinstance(storage, RecordingStorage)
    with pytest.raises(ConfigError, match="cannot import 'no.such.module:Storage'"):
        STORAGE.resolve("no.such.module:Storage", "storage.type")


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        STORAGE.resolve("mongo", "storage.type")
    message = str(info.value)
    assert message.startswith("storage.type: no storage backend 'mongo'; did you mean 'mongodb'?")
    for name in ("mongodb", "mysql", "postgresql", "sqlite"):
        assert name in message


def test_a_backend_without_the_maintenance_capabilities_is_named_by_the_commands_that_need_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from celery_ext.cli import main

    for repository, capability in (
        (SqlTaskRepository, TaskMaintenance),
        (SqlTaskLogRepository, LogMaintenance),
        (MongoTaskRepository, TaskMaintenance),
        (MongoTaskLogRepository, LogMaintenance),
    ):
        assert issubclass(repository, capability)  # the built-in backends have both
    path = tmp_path / "config.yaml"
    path.write_text(
        f"app: {{data_dir: {tmp_path}}}\n"
        f"storage: {{type: '{__name__}:BareStorage', retention: {{succeeded: 1d, logs: 7d, groups: 1d}}}}\n"
    )
    assert main(["--config", str(path), "storage", "migrate"]) == 0
    capsys.readouterr()

    assert main(["--config", str(path), "storage", "status", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["counts"] is None and json.loads(out)["state"] == "up to date"
    assert (
        "BareTaskRepository does not implement celery_ext.storage.base.TaskMaintenance, needed for counting "
        "records by status (--no-counts skips it)"
    ) in err

    assert main(["--config", str(path), "storage", "purge"]) == 2  # a config problem, said before any delete
    err = capsys.readouterr().err
    assert (
        "BareTaskRepository does not implement celery_ext.storage.base.TaskMaintenance, needed for purging tasks" in err
    )
    assert "BareTaskLogRepository does not implement celery_ext.storage.base.LogMaintenance" in err
    assert (
        "BareStorage does not implement celery_ext.storage.base.GroupRepository, needed for purging saved groups"
    ) in err

    # Celery's GroupResult.save() through the result backend says the store cannot keep groups.
    from celery import Celery
    from celery.result import AsyncResult, GroupResult

    app = Celery("bare", backend=f"celery_ext://{path}")
    group = GroupResult("g1", [AsyncResult("m1", app=app)], app=app)
    with pytest.raises(NotImplementedError, match=r"keeps no saved groups, so GroupResult.save\(\)"):
        group.save()
    with pytest.raises(NotImplementedError, match="keeps no saved groups"):
        GroupResult.restore("g1", app=app)
