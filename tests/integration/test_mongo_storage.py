"""MongoDB backend specifics on a real wire-protocol server (nx-27017): config forms, collection
names, indexes, documents of older versions, fork safety, unreachable servers."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pymongo
import pytest

from celery_ext.config import StorageConfig
from celery_ext.errors import ConfigError, StorageError
from celery_ext.model import Task, TaskFilter, TaskLog, TaskStatus, utcnow
from celery_ext.runtime import runtime_of
from celery_ext.storage import open_storage
from celery_ext.storage.mongo import SCHEMA_VERSION, MongoStorage
from tests.support.mongo import MongoServer, mongo_server  # noqa: F401 - fixture
from tests.support.services import unique


def test_host_port_database_and_custom_collection_names(mongo_server: MongoServer, tmp_path: Path) -> None:  # noqa: F811
    db = unique("ce_")
    storage = open_storage(
        StorageConfig(
            type="mongodb",
            config={
                "host": "127.0.0.1",
                "port": mongo_server.port,
                "database": db,
                "tasks_collection": "jobs",
                "logs_collection": "job_lines",
            },
        ),
        tmp_path,
    )
    storage.migrate()
    storage.tasks.create(Task(task_id="x1", task_type="echo", payload={"a": 1}, idempotency_key="k"))
    storage.logs.append([TaskLog("x1", 1, utcnow(), "INFO", "hello")])

    client = pymongo.MongoClient(f"{mongo_server.url}/{db}")
    try:
        raw = client[db]
        assert raw["jobs"].find_one({"task_id": "x1"})["payload"] == {"a": 1}
        assert raw["job_lines"].find_one({"task_id": "x1"})["message"] == "hello"
        # By keys: wire-compatible servers may name indexes their own way.
        indexes = {tuple(i["key"]): i for i in raw["jobs"].list_indexes()}
        assert indexes[("task_id",)].get("unique") and indexes[("idempotency_key",)].get("unique")
        assert {
            ("status", "task_type", "created_at"),
            ("worker_id", "created_at"),
            ("created_at", "task_id"),
            ("status", "finished_at"),
            ("status", "run_at"),
            ("status", "lease_until"),
            ("root_id", "created_at"),
            ("group_id", "created_at"),
        } <= set(indexes)
        schedule_indexes = {tuple(i["key"]) for i in raw["celery_ext_schedules"].list_indexes()}
        assert ("paused", "next_fire_at") in schedule_indexes  # v3
        assert raw["celery_ext_schema"].find_one({"_id": "schema"})["version"] == SCHEMA_VERSION
    finally:
        client.close()
    assert storage.schema_version() == (SCHEMA_VERSION, SCHEMA_VERSION)
    storage.close()


def test_documents_written_before_runs_and_canvas_ids_read_with_defaults(
    mongo_server: MongoServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """An upgrade rewrites no document: fields a document lacks read as their defaults, and a
    version-1 store is brought to the latest version by ``migrate``."""
    db = unique("ce_")
    storage = open_storage(StorageConfig(type="mongodb", config={"uri": f"{mongo_server.url}/{db}"}), tmp_path)
    client = pymongo.MongoClient(f"{mongo_server.url}/{db}")
    try:
        raw = client[db]
        raw["celery_ext_schema"].insert_one({"_id": "schema", "version": 1, "applied_at": 0})
        assert storage.schema_version() == (1, SCHEMA_VERSION)
        # As version-1 code wrote them: no run, args, parent_id, root_id, group_id.
        raw["tasks"].insert_one(
            {
                "task_id": "old",
                "task_type": "echo",
                "payload": {"a": 1},
                "status": "failed",
                "attempt": 3,
                "created_at": 1_700_000_000_000_000,
                "updated_at": 1_700_000_000_000_000,
            }
        )
        raw["task_logs"].insert_one(
            {
                "task_id": "old",
                "attempt": 3,
                "seq": 1,
                "time": 1_700_000_000_000_000,
                "level": "INFO",
                "message": "before runs",
            }
        )
        storage.migrate()
        assert storage.schema_version() == (SCHEMA_VERSION, SCHEMA_VERSION)
        got = storage.tasks.get("old")
        assert got is not None and (got.attempt, got.run, got.args, got.parent_id, got.root_id, got.group_id) == (
            3,
            1,
            None,
            None,
            None,
            None,
        )
        storage.logs.append([TaskLog("old", 1, utcnow(), "INFO", "run 2", run=2)])
        assert [(ln.message, ln.run) for ln in storage.logs.list("old")] == [("before runs", 1), ("run 2", 2)]
        assert [ln.message for ln in storage.logs.list("old", run=1)] == ["before runs"]
        assert [ln.message for ln in storage.logs.list("old", run=2)] == ["run 2"]
        # A manual retry on the old document writes the new fields.
        assert storage.tasks.update(
            "old", [TaskStatus.FAILED], status=TaskStatus.PENDING, run=2, attempt=0, root_id="r"
        )
        assert raw["tasks"].find_one({"task_id": "old"})["run"] == 2
        assert [t.task_id for t in storage.tasks.list(TaskFilter(root_id="r")).items] == ["old"]
    finally:
        client.close()
        storage.close()


def test_uri_names_the_database_and_description_hides_the_password(tmp_path: Path) -> None:
    s = MongoStorage.from_config(
        "mongodb", {"uri": "mongodb://app:hunter2@db.example:27017/tm?authSource=admin"}, tmp_path
    )
    assert s.database == "tm"
    assert "hunter2" not in s.description and "app:***@db.example:27017/tm" in s.description
    s = MongoStorage.from_config("mongodb", {"host": "db", "user": "u", "password": "p@ss"}, tmp_path)
    assert s.database == "task_manager" and "p@ss" not in s.description and "p%40ss" not in s.description


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"uri": "http://x/y"}, "storage.config.uri"),
        ({"uri": "mongodb://h:notaport/db"}, "storage.config.uri: Port contains non-digit"),
        ({"uri": "mongodb://h/db?bogusOption=1"}, "storage.config.uri: Unknown option"),
        ({"tasks_collection": "my-tasks"}, "storage.config.tasks_collection"),
        ({"port": 0}, "storage.config.port"),
        ({"colour": "x"}, "storage.config.colour"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, config: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        MongoStorage.from_config("mongodb", config, tmp_path)


def test_unreachable_server_is_a_storage_error_naming_it(tmp_path: Path) -> None:
    s = MongoStorage.from_config(
        "mongodb", {"uri": "mongodb://bob:s3cret@127.0.0.1:1/tm", "server_selection_timeout": 0.3}, tmp_path
    )
    with pytest.raises(StorageError) as info:
        s.ping()
    assert "127.0.0.1:1/tm" in str(info.value) and "s3cret" not in str(info.value)
    with pytest.raises(StorageError):
        s.migrate()


def _child_writes(storage: MongoStorage, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    storage.tasks.create(Task(task_id="from-child", task_type="echo", payload={}))
    out.put(storage.tasks.update("from-parent", [TaskStatus.PENDING], status=TaskStatus.QUEUED))


def test_client_is_rebuilt_after_fork(mongo_server: MongoServer, tmp_path: Path) -> None:  # noqa: F811
    storage = MongoStorage.from_config("mongodb", {"uri": f"{mongo_server.url}/{unique('ce_')}"}, tmp_path)
    storage.migrate()
    storage.tasks.create(Task(task_id="from-parent", task_type="echo", payload={}))
    parent_client = storage._client
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_child_writes, args=(storage, out))
    child.start()
    assert out.get(timeout=30) is True
    child.join(10)
    assert child.exitcode == 0
    assert storage._client is parent_client  # the parent's client was left alone
    assert storage.tasks.get("from-child") is not None
    assert storage.tasks.get("from-parent").status == TaskStatus.QUEUED  # type: ignore[union-attr]
    storage.close()


def test_real_worker_records_tasks_and_logs_in_mongodb(
    mongo_server: MongoServer,  # noqa: F811
    tmp_path: Path,
    redis_url: str,
) -> None:
    from celery_ext.config import parse_config
    from celery_ext.factory import create_app
    from tests.support.workers import WorkerProcess, write_config

    data = {
        "app": {"name": unique("ce")},
        "broker": {"url": redis_url},
        "worker": {"capacity": 2, "retry_backoff": 0.1, "retry_jitter": False},
        "storage": {"type": "mongodb", "config": {"uri": f"{mongo_server.url}/{unique('ce_')}"}},
        "executors": [{"type": "python", "config": {"modules": ["tests.support.tasks"]}}],
    }
    config_path = write_config(tmp_path, data)
    runtime = runtime_of(create_app(parse_config(data, source=str(config_path))))
    worker = WorkerProcess(config_path, concurrency=2).start()  # prefork: each child builds its own client
    try:
        m = runtime.manager
        tasks = [m.submit("chatty", {"lines": 3}) for _ in range(4)]
        flaky = m.submit("flaky", {"key": unique("flaky:"), "fail_times": 1}, max_retries=2)
        for t in tasks:
            done = m.wait(t.task_id, 30)
            assert done.status is TaskStatus.SUCCEEDED and done.result == 3 and done.worker_id
            assert [ln.message for ln in m.logs(t.task_id)][-4:] == [
                "tests.tasks: line 0",
                "tests.tasks: line 1",
                "tests.tasks: line 2",
                "tests.tasks: done after 3 lines",
            ]
        done = m.wait(flaky.task_id, 30)
        assert done.status is TaskStatus.SUCCEEDED and done.attempt == 2
        assert [ln.attempt for ln in m.logs(flaky.task_id) if "flaky run" in ln.message] == [1, 2]
        page = m.list(status=(TaskStatus.SUCCEEDED,), limit=10)
        assert {t.task_id for t in page.items} == {t.task_id for t in tasks} | {flaky.task_id}
    finally:
        worker.stop()
        runtime.storage.close()
