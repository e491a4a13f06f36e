"""Poison messages and bad input (issue 12): nothing a client sends is half-written, and no
message stops or wedges a worker.  Real worker processes, a real API process, the real CLI.

Every worker case ends with ``assert_full_capacity``: the worker is alive and runs as many tasks
at once as its capacity, so a message that took a prefetch slot or a pool slot for good fails it.
"""

from __future__ import annotations

import base64
import json
import math
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from celery_ext.errors import InvalidPayloadError
from celery_ext.guard import dead_letter_list
from celery_ext.message import ExtHeader
from celery_ext.model import Task, TaskFilter, TaskStatus, utcnow
from celery_ext.validation import MAX_TIMEOUT
from tests.conftest import TEST_TASKS, Cluster
from tests.integration.test_api import TOKEN, ApiProcess
from tests.support.scrape import poll
from tests.support.workers import subprocess_env, write_config

pytestmark = pytest.mark.timeout(300)


def nested(depth: int) -> dict[str, Any]:
    """An object ``depth`` levels deep (``{}`` is one)."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


DEEP = nested(600)  # ~3.6 KB: far under app.max_payload_bytes, far over app.max_payload_depth


def assert_full_capacity(c: Cluster, w: Any, capacity: int = 2) -> None:
    """The worker is alive, takes new tasks, and runs ``capacity`` of them at the same time."""
    assert w.alive(), w.log()[-3000:]
    tasks = [c.manager.submit("sleep", {"seconds": 2.5}) for _ in range(capacity)]
    poll(
        lambda: all(c.manager.get(t.task_id).status is TaskStatus.RUNNING for t in tasks),
        30,
        f"{capacity} tasks running at once",
    )
    for t in tasks:
        assert c.manager.wait(t.task_id, 30).status is TaskStatus.SUCCEEDED
    assert w.alive()


def broker(c: Cluster) -> redis.Redis:
    """The cluster's broker (the shared Redis here; a private one in tests/chaos)."""
    return redis.Redis.from_url(c.data["broker"]["url"])


def dead_letters(c: Cluster) -> list[dict[str, Any]]:
    entries = broker(c).lrange(dead_letter_list(c.data["app"]["name"]), 0, -1)
    return [json.loads(e) for e in reversed(entries)]  # oldest first


def wait_dead_letters(c: Cluster, count: int) -> list[dict[str, Any]]:
    poll(lambda: len(dead_letters(c)) >= count, 30, f"{count} dead letters")
    letters = dead_letters(c)
    assert len(letters) == count, [e["reason"] for e in letters]
    return letters


def reason_of(letters: list[dict[str, Any]], task_id: str) -> str:
    return next(str(e["reason"]) for e in letters if e["id"] == task_id)


def failed_malformed(c: Cluster, task_id: str) -> Task:
    poll(
        lambda: c.runtime.storage.tasks.get(task_id) is not None and c.manager.get(task_id).status is TaskStatus.FAILED,
        30,
        f"record {task_id} failed",
    )
    task = c.manager.get(task_id)
    assert task.error is not None and task.error.reason == "malformed_message", task
    return task


def celery_headers(task_id: str, name: str = "echo", **changes: Any) -> dict[str, Any]:
    """The headers Celery's ``send_task`` writes (protocol 2)."""
    headers = {
        "lang": "py",
        "task": name,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "()",
        "kwargsrepr": "{}",
        "origin": "test",
        "ignore_result": False,
    }
    headers.update(changes)
    return headers


def publish_raw(
    c: Cluster, queue: str, body: str | bytes, headers: Any, content_type: str = "application/json"
) -> None:
    """Push a kombu envelope straight onto the Redis list of ``queue``: any body, any headers."""
    raw = body.encode() if isinstance(body, str) else body
    envelope = {
        "body": base64.b64encode(raw).decode(),
        "content-encoding": "utf-8",
        "content-type": content_type,
        "headers": headers,
        "properties": {
            "correlation_id": str(uuid.uuid4()),
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    broker(c).lpush(queue, json.dumps(envelope))


@pytest.fixture
def cleanup_dead_letters() -> Iterator[list[Cluster]]:
    clusters: list[Cluster] = []
    yield clusters
    for c in clusters:
        redis.Redis().delete(dead_letter_list(c.data["app"]["name"]))


# --- worker: poison messages ----------------------------------------------------------------


def test_a_deep_payload_is_refused_at_submit_and_dead_lettered_by_the_worker(
    make_cluster: Any, cleanup_dead_letters: list[Cluster]
) -> None:
    c = make_cluster(executors=TEST_TASKS)
    cleanup_dead_letters.append(c)
    # At the edge: refused naming the limit, and nothing is written or published.
    with pytest.raises(InvalidPayloadError, match=r"payload: nested deeper than 32 levels") as info:
        c.manager.submit("echo", DEEP)
    assert info.value.field == "payload"
    c.runtime.storage.migrate()
    assert c.manager.list(TaskFilter()).items == []

    w = c.worker()
    at_limit = c.manager.submit("echo", nested(32))
    assert c.manager.wait(at_limit.task_id, 30).result == nested(32)
    app, queue = c.runtime.celery, f"{c.data['app']['name']}.echo"
    # Sent while both pool processes are busy, and again once they are idle.
    busy = [c.manager.submit("sleep", {"seconds": 2}) for _ in range(2)]
    poll(lambda: all(c.manager.get(t.task_id).status is TaskStatus.RUNNING for t in busy), 30, "busy pool")
    plain = app.send_task("echo", kwargs=DEEP, queue=queue).id
    positional = app.send_task("echo", args=[DEEP], queue=queue).id
    in_header = app.send_task("echo", kwargs={}, queue=queue, headers={"extra": DEEP}).id
    # A task accepted before the edge refused such payloads: its record waits in QUEUED.
    submitted, token = uuid.uuid4().hex, uuid.uuid4().hex
    c.runtime.storage.tasks.create(
        Task(
            task_id=submitted,
            task_type="echo",
            payload={},
            status=TaskStatus.QUEUED,
            dispatch_token=token,
            max_retries=3,
        )
    )
    app.send_task(
        "echo",
        kwargs=DEEP,
        task_id=submitted,
        queue=queue,
        headers=ExtHeader(token, 1, 1, 3, utcnow(), None).to_header(),
    )
    for t in busy:
        assert c.manager.wait(t.task_id, 30).status is TaskStatus.SUCCEEDED
    again = app.send_task("echo", kwargs=DEEP, queue=queue).id

    letters = wait_dead_letters(c, 5)
    assert reason_of(letters, plain) == "kwargs: nested deeper than 32 levels"
    assert reason_of(letters, positional) == "args[0]: nested deeper than 32 levels"
    assert reason_of(letters, in_header) == "headers: nested deeper than 200 levels"
    assert reason_of(letters, again) == "kwargs: nested deeper than 32 levels"
    entry = next(e for e in letters if e["id"] == plain)
    assert entry["task"] == "echo" and entry["queue"] == queue
    assert entry["worker"].startswith(w.hostname.split("@")[0] + "@")
    assert json.loads(entry["message"]["body"])[1] == DEEP  # the raw message is kept
    # Records: a plain message gets a failed one (its unusable payload is not kept); the submitted
    # task's record fails instead of waiting forever.
    assert failed_malformed(c, plain).payload == {}
    assert "kwargs: nested deeper than 32 levels" in failed_malformed(c, submitted).error.message  # type: ignore[union-attr]
    failed_malformed(c, positional)
    assert "malformed message" in w.log() and "RecursionError" not in w.log()
    assert_full_capacity(c, w)


def test_bad_celery_fields_and_bodies_are_dead_lettered(make_cluster: Any, cleanup_dead_letters: list[Cluster]) -> None:
    c = make_cluster(executors=TEST_TASKS)
    cleanup_dead_letters.append(c)
    w = c.worker()
    queue = f"{c.data['app']['name']}.echo"
    ok_body = '[[], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'
    cases: list[tuple[str, str, Any, str]] = [  # (id, body, headers, the reason starts with)
        ("timelimit-text", ok_body, {"timelimit": ["abc", "def"]}, "timelimit: expected null or a number"),
        ("timelimit-huge", ok_body, {"timelimit": [1e300, None]}, "timelimit: expected null or a number"),
        ("timelimit-shape", ok_body, {"timelimit": 5}, "timelimit: expected [hard, soft]"),
        ("eta-text", ok_body, {"eta": "next tuesday"}, "eta: expected an ISO 8601 time"),
        ("expires-number", ok_body, {"expires": 12}, "expires: expected an ISO 8601 time"),
        ("retries-text", ok_body, {"retries": "abc"}, "retries: expected an integer"),
        ("parent-nul", ok_body, {"parent_id": "a\u0000b"}, "parent_id: expected null or a string"),
        (
            "header-v2",
            ok_body,
            {"celery_ext": {"v": 2, "token": "t", "attempt": 1}},
            "header celery_ext: v: expected 1",
        ),
        ("kwargs-nan", '[[], {"x": NaN}, {}]', {}, "kwargs.x: must be a finite number"),
        ("kwargs-surrogate", '[[], {"x": "\\ud800"}, {}]', {}, "kwargs.x: contains a lone surrogate"),
        ("kwargs-list", "[[], [1], {}]", {}, "kwargs: expected an object"),
        ("body-dict", '{"nope": 1}', {}, "body: expected [args, kwargs, embed]"),
        ("body-not-json", "this is not json", {}, "body: cannot be decoded"),
    ]
    cases += [(f"one-{i}", "[1]", {}, "body: expected [args, kwargs, embed]") for i in range(4)]
    for task_id, body, changes, _ in cases:
        publish_raw(c, queue, body, celery_headers(task_id, **changes))
    long_id = "x" * 65
    publish_raw(c, queue, ok_body, celery_headers(long_id))
    publish_raw(c, queue, ok_body, celery_headers("no-id", id=None))
    # Not even a kombu message: the transport drops it (celery_ext/transport.py).
    publish_raw(c, queue, ok_body, ["headers", "that", "are", "a", "list"])

    letters = wait_dead_letters(c, len(cases) + 2)
    for task_id, _, _, reason in cases:
        assert reason_of(letters, task_id).startswith(reason), (task_id, reason_of(letters, task_id))
    assert any(e["reason"].startswith("id: expected a string of 1..64 characters") for e in letters)
    assert any(e["reason"].startswith("id: expected a string") and "None" in e["reason"] for e in letters)
    # The raw message as it came: its body text, or base64 when it is not text.
    assert next(e for e in letters if e["id"] == "body-not-json")["message"]["body"] == "this is not json"
    # Usable ids of a celery_ext type get a failed record.
    assert failed_malformed(c, "one-0").error.message.startswith("body: expected")  # type: ignore[union-attr]
    assert failed_malformed(c, "timelimit-text").payload == {}
    assert failed_malformed(c, "parent-nul").parent_id is None  # not an id a record can hold
    log = w.log()
    assert "malformed message timelimit-text for echo dead-lettered" in log
    assert "Unrecoverable error" not in log
    w.wait_for_log("dropped a malformed message from the broker", 10)
    assert_full_capacity(c, w)


def test_a_message_that_breaks_the_pool_hand_off_is_caught_there(
    make_cluster: Any, cleanup_dead_letters: list[Cluster]
) -> None:
    """The second line: with the message checks switched off (tests/support/unguarded.py), a
    600-deep payload reaches billiard's pickling; the request is dropped there, its pool slot
    given back, and the message dead-lettered."""
    executors = [{"type": "python", "config": {"modules": ["tests.support.tasks", "tests.support.unguarded"]}}]
    c = make_cluster(executors=executors)
    cleanup_dead_letters.append(c)
    w = c.worker(env={"CELERY_EXT_TEST_UNGUARDED": "1"})
    app, queue = c.runtime.celery, f"{c.data['app']['name']}.echo"
    first = app.send_task("echo", kwargs=DEEP, queue=queue).id
    busy = [c.manager.submit("sleep", {"seconds": 2}) for _ in range(2)]
    poll(lambda: all(c.manager.get(t.task_id).status is TaskStatus.RUNNING for t in busy), 30, "busy pool")
    second = app.send_task("echo", kwargs=DEEP, queue=queue).id
    letters = wait_dead_letters(c, 2)
    for task_id in (first, second):
        assert reason_of(letters, task_id).startswith("the pool could not take it: RecursionError")
        failed_malformed(c, task_id)
    for t in busy:
        assert c.manager.wait(t.task_id, 30).status is TaskStatus.SUCCEEDED
    assert "Unrecoverable error" not in w.log()
    assert_full_capacity(c, w)


# --- the edge: TaskManager, the REST API, the CLI ----------------------------------------------


BAD_SUBMITS: list[tuple[dict[str, Any], str]] = [  # (submit's arguments, the field named)
    ({"timeout": math.inf}, "timeout"),
    ({"timeout": 1e300}, "timeout"),
    ({"timeout": math.nan}, "timeout"),
    ({"timeout": 0}, "timeout"),
    ({"timeout": MAX_TIMEOUT + 1}, "timeout"),
    ({"timeout": True}, "timeout"),
    ({"delay": 1e300}, "delay"),
    ({"delay": math.nan}, "delay"),
    ({"delay": -1}, "delay"),
    ({"max_retries": 10**11}, "max_retries"),
    ({"max_retries": -1}, "max_retries"),
    ({"max_retries": 1.5}, "max_retries"),
    ({"priority": 10}, "priority"),
    ({"idempotency_key": "k" * 256}, "idempotency_key"),
    ({"idempotency_key": ""}, "idempotency_key"),
    ({"idempotency_key": "a\x00b"}, "idempotency_key"),
    ({"idempotency_key": "\ud800"}, "idempotency_key"),
    ({"payload": {"x": math.nan}}, "payload.x"),
    ({"payload": {"x": [1, math.inf]}}, "payload.x[1]"),
    ({"payload": {"x": "a\x00"}}, "payload.x"),
    ({"payload": {"\udc80": 1}}, "payload"),
    ({"payload": {"x": 2**64}}, "payload.x"),
    ({"payload": nested(33)}, "payload"),
    ({"payload": [1]}, "payload"),
    ({"run_at": datetime(2030, 1, 1)}, "run_at"),
    ({"run_at": utcnow() + timedelta(days=3661)}, "run_at"),
]


def test_submit_arguments_are_checked_before_anything_is_written(make_cluster: Any) -> None:
    c = make_cluster(executors=TEST_TASKS)
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    for kwargs, field in [*BAD_SUBMITS, ({"payload": cyclic}, "payload")]:
        spec = {"payload": {}, **kwargs}
        with pytest.raises(InvalidPayloadError) as info:
            c.manager.submit("echo", spec.pop("payload"), **spec)
        assert info.value.field == field, (kwargs, info.value)
        with pytest.raises(InvalidPayloadError):
            c.manager.submit_many([{"task_type": "echo", **kwargs}])
    with pytest.raises(InvalidPayloadError) as info:
        c.manager.submit(["echo"], {})  # type: ignore[arg-type]
    assert info.value.field == "task_type"
    c.runtime.storage.migrate()
    assert c.manager.list(TaskFilter()).items == []
    assert redis.Redis().llen(f"{c.data['app']['name']}.echo") == 0
    # The bounds themselves are accepted.
    task = c.manager.submit("echo", nested(32), timeout=MAX_TIMEOUT, max_retries=10_000, idempotency_key="k" * 255)
    assert task.timeout == MAX_TIMEOUT and task.max_retries == 10_000


def store_bad_records(c: Cluster) -> tuple[str, str]:
    """Records as older versions could write them: a NaN, a 600-deep payload."""
    c.runtime.storage.migrate()
    nan_id, deep_id = uuid.uuid4().hex, uuid.uuid4().hex
    c.runtime.storage.tasks.create(
        Task(
            task_id=nan_id,
            task_type="echo",
            payload={"x": math.nan},
            status=TaskStatus.SUCCEEDED,
            result=[math.inf, "\ud800"],
        )
    )
    c.runtime.storage.tasks.create(Task(task_id=deep_id, task_type="echo", payload=DEEP, status=TaskStatus.FAILED))
    return nan_id, deep_id


def test_the_api_answers_400_naming_the_field_and_lists_any_record(
    make_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("API_TOKEN", TOKEN)
    c = make_cluster(executors=TEST_TASKS, api={"token": "${API_TOKEN}"})
    server = ApiProcess(c)
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as client:

            def post(body: str) -> httpx.Response:
                return client.post("/tasks", content=body.encode(), headers={"Content-Type": "application/json"})

            raw_cases = [  # JSON text, as a client may send it (Python's json reads NaN and Infinity)
                ('{"task_type": "echo", "timeout": NaN}', "timeout"),
                ('{"task_type": "echo", "timeout": Infinity}', "timeout"),
                ('{"task_type": "echo", "timeout": 1e300}', "timeout"),
                ('{"task_type": "echo", "delay": 1e300}', "delay"),
                ('{"task_type": "echo", "delay": NaN}', "delay"),
                ('{"task_type": "echo", "max_retries": 100000000000}', "max_retries"),
                ('{"task_type": "echo", "idempotency_key": "' + "k" * 300 + '"}', "idempotency_key"),
                ('{"task_type": "echo", "idempotency_key": "a\\u0000"}', "idempotency_key"),
                ('{"task_type": "echo", "idempotency_key": "\\ud800"}', "idempotency_key"),
                ('{"task_type": "echo", "payload": {"x": "\\u0000"}}', "payload.x"),
                ('{"task_type": "echo", "payload": {"x": "\\udc00"}}', "payload.x"),
                ('{"task_type": "echo", "payload": {"x": NaN}}', "payload.x"),
                ('{"task_type": "echo", "payload": ' + json.dumps(nested(33)) + "}", "payload"),
                ('{"task_type": "echo", "payload": ' + json.dumps(DEEP) + "}", "payload"),
            ]
            for body, field in raw_cases:
                r = post(body)
                assert r.status_code == 400, (body[:80], r.status_code, r.text[:300])
                assert r.json()["error"]["field"] == field, (body[:80], r.text[:300])
            r = client.get("/tasks", params={"cursor": "garbage"})
            assert r.status_code == 400 and r.json()["error"]["field"] == "cursor", r.text
            r = client.get("/tasks", params={"cursor": base64.urlsafe_b64encode(b"2024-01-01|x").decode()})
            assert r.status_code == 400 and r.json()["error"]["field"] == "cursor", r.text  # a time without zone
            assert client.get("/tasks").json()["items"] == []  # nothing was created

            nan_id, deep_id = store_bad_records(c)
            page = client.get("/tasks")
            assert page.status_code == 200, page.text
            shown = {t["task_id"]: t for t in page.json()["items"]}
            assert shown[nan_id]["payload"] == {"x": "NaN"} and shown[nan_id]["result"] == ["Infinity", "\ufffd"]
            assert "nested deeper than 64 levels" in json.dumps(shown[deep_id]["payload"])
            for task_id in (nan_id, deep_id):
                assert client.get(f"/tasks/{task_id}").status_code == 200
    finally:
        server.stop()


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery_ext.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=config.parent,
        env=subprocess_env(),
    )


def test_the_cli_exits_2_naming_the_field_and_lists_any_record(make_cluster: Any) -> None:
    c = make_cluster(executors=TEST_TASKS)
    cases = [
        (["--timeout", "1e300"], "timeout"),
        (["--delay", "1e300"], "delay"),
        (["--max-retries", "100000000000"], "max_retries"),
        (["--idempotency-key", "k" * 300], "idempotency_key"),
        (['{"x": "\\u0000"}'], "payload.x"),
        (['{"x": "\\ud800"}'], "payload.x"),
        (['{"x": NaN}'], "payload.x"),
        ([json.dumps(DEEP)], "payload"),
    ]
    for args, field in cases:
        done = cli(c.config_path, "submit", "echo", *args)
        assert done.returncode == 2, (args[:2], done.stderr[-500:])
        assert f"invalid payload: {field}: " in done.stderr and "Traceback" not in done.stderr, done.stderr[-500:]
    bad_cursor = cli(c.config_path, "list", "--cursor", "garbage")
    assert bad_cursor.returncode == 2 and "cursor" in bad_cursor.stderr, bad_cursor.stderr
    c.runtime.storage.migrate()
    assert c.manager.list(TaskFilter()).items == []

    nan_id, deep_id = store_bad_records(c)
    listed = cli(c.config_path, "list", "--json")
    assert listed.returncode == 0, listed.stderr[-800:]
    shown = {t["task_id"]: t for t in json.loads(listed.stdout)["items"]}
    assert shown[nan_id]["payload"] == {"x": "NaN"}
    got = cli(c.config_path, "get", deep_id, "--json")
    assert got.returncode == 0 and "nested deeper than 64 levels" in got.stdout, got.stderr[-800:]
    assert cli(c.config_path, "get", os.fsdecode(b"a\xffb")).returncode == 2  # a lone surrogate in argv


# --- the config watcher ------------------------------------------------------------------------


def test_a_binary_or_pathological_config_file_does_not_stop_live_reload(make_cluster: Any) -> None:
    c = make_cluster(executors=TEST_TASKS, worker={"heartbeat_interval": 0.5})
    w = c.worker()
    c.config_path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary \x80\x81")
    w.wait_for_log("not a UTF-8 text file", 30)
    c.config_path.write_text("worker: " + "[" * 20000 + "]" * 20000 + "\n")  # RecursionError in the YAML parser
    w.wait_for_log("could not be read (RecursionError", 30)
    c.data["worker"] = {**c.data["worker"], "capacity": 3}
    write_config(c.tmp_path, c.data)
    w.wait_for_log("reloaded: applied worker.capacity=3", 30)
    assert w.alive()
    assert_full_capacity(c, w, capacity=3)
