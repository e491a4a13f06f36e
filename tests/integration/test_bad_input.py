"""Bad input gets a clear error, nothing half-written, and the worker keeps running."""

from __future__ import annotations

import json

import pytest
import redis

from celery_ext.config import parse_config
from celery_ext.errors import InvalidPayloadError, StorageError, UnknownTaskTypeError
from celery_ext.factory import create_app
from celery_ext.model import TaskFilter, TaskStatus
from celery_ext.runtime import runtime_of
from tests.conftest import TEST_TASKS
from tests.support.services import unique


def queue_depth(client: redis.Redis, queue: str) -> int:
    # kombu keeps one list per priority step: "<queue>" and "<queue>:<n>"
    return sum(int(client.llen(k)) for k in [queue, *client.keys(f"{queue}:*")])


def test_unknown_type_is_refused_with_known_types_and_nothing_written(make_cluster) -> None:
    c = make_cluster(executors=TEST_TASKS)
    with pytest.raises(UnknownTaskTypeError) as info:
        c.manager.submit("send_emial", {"to": "a@b"})
    assert info.value.task_type == "send_emial"
    # Every type this process knows, sorted (other test modules may have registered more).
    known = str(info.value).split("known types: ", 1)[1].split(", ")
    assert known == sorted(known) and {"add", "chatty", "crash", "echo"} <= set(known)
    c.runtime.storage.migrate()
    assert c.manager.list(TaskFilter()).items == []


def test_payload_must_be_a_json_object_within_the_cap(make_cluster) -> None:
    c = make_cluster(app={"max_payload_bytes": 1024})
    m = c.manager
    with pytest.raises(InvalidPayloadError, match="must be a JSON object"):
        m.submit("echo", ["not", "an", "object"])  # type: ignore[arg-type]
    with pytest.raises(InvalidPayloadError, match="not JSON-serializable"):
        m.submit("echo", {"when": object()})
    with pytest.raises(InvalidPayloadError, match=r"bytes exceeds app.max_payload_bytes \(1024\)"):
        m.submit("echo", {"blob": "x" * 2000})
    with pytest.raises(InvalidPayloadError, match="priority"):
        m.submit("echo", {}, priority=42)
    with pytest.raises(InvalidPayloadError, match="unknown keys"):
        m.submit_many([{"task_type": "echo", "payload": {}, "prority": 1}])
    c.runtime.storage.migrate()
    assert m.list(TaskFilter()).items == []


def test_storage_down_at_submit_writes_and_publishes_nothing(tmp_path, redis_url) -> None:
    name = unique("ce")
    config = parse_config(
        {
            "app": {"name": name},
            "broker": {"url": redis_url},
            "storage": {
                "type": "postgresql",
                "config": {"url": "postgresql://postgres:s3cret@127.0.0.1:1/none", "connect_timeout": 1},
            },
        },
        source=str(tmp_path / "config.yaml"),
    )
    manager = runtime_of(create_app(config)).manager
    with pytest.raises(StorageError) as info:
        manager.submit("echo", {"a": 1})
    assert "127.0.0.1:1" in str(info.value) and "s3cret" not in str(info.value)
    assert queue_depth(redis.Redis(), f"{name}.echo") == 0


def test_malformed_messages_are_dropped_and_worker_keeps_running(make_cluster) -> None:
    c = make_cluster(executors=TEST_TASKS)
    w = c.worker()
    app = c.runtime.celery
    queue = f"{c.data['app']['name']}.echo"
    client = redis.Redis()
    client.lpush(queue, b"this is not json")
    client.lpush(queue, json.dumps({"body": "not base64", "headers": {}, "properties": {}}))
    # A plain Celery message is run and recorded; echo takes no positional arguments.
    positional = app.send_task("echo", args=[1, 2], queue=queue)
    app.send_task("no_such_type", kwargs={}, queue=queue)
    # A celery_ext header that does not hold what it must: rejected, naming the field.
    app.send_task("echo", kwargs={}, queue=queue, headers={"celery_ext": {"v": 1, "token": 7, "attempt": 0}})
    # A well-formed header for a record that does not exist: dropped.
    app.send_task(
        "echo", kwargs={}, task_id="nope", queue=queue, headers={"celery_ext": {"v": 1, "token": "x", "attempt": 1}}
    )
    task = c.manager.submit("echo", {"after": "garbage"})
    assert c.manager.wait(task.task_id, 30).status is TaskStatus.SUCCEEDED
    failed = c.manager.wait(positional.id, 30)
    assert failed.status is TaskStatus.FAILED and failed.error.reason == "invalid_payload", failed
    w.wait_for_log("message for unknown task nope dropped", 10)
    log = w.log()
    assert "malformed message" in log and "token: expected a non-empty string (got int)" in log
    assert "attempt: expected an integer >= 1 (got 0)" in log
    assert "no_such_type" in log
    assert w.alive()
    assert queue_depth(client, queue) == 0
