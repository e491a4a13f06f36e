"""The worker's message guard (celery_ext/guard.py), without processes (the limits it shares with the
edge are in test_validation.py).  The real-process cases are in
tests/integration/test_poison.py."""

from __future__ import annotations

import base64
import json
import math
from types import SimpleNamespace
from typing import Any

import pytest
from kombu.asynchronous.semaphore import LaxBoundedSemaphore

from celery_ext.guard import GuardedConsumer, Reading, problem_of
from celery_ext.task import ExecutorTask


class Message:
    def __init__(self, headers: Any, body: Any) -> None:
        self.headers = headers
        self.body = json.dumps(body).encode()
        self._body = body
        self.content_type, self.content_encoding = "application/json", "utf-8"
        self.acknowledged = False

    def decode(self) -> Any:
        return self._body


ECHO = {"echo": ExecutorTask()}


def headers(**changes: Any) -> dict[str, Any]:
    return {
        "task": "echo",
        "id": "t1",
        "retries": 0,
        "timelimit": [None, None],
        "eta": None,
        "expires": None,
        "root_id": None,
        "parent_id": None,
        "group": None,
        **changes,
    }


def problem(message: Message, tasks: Any = ECHO) -> str | None:
    return problem_of(message, tasks, 32, Reading())


def nested(depth: int) -> Any:
    value: Any = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    ("changes", "body", "reason"),
    [
        ({}, [[], {"x": 1}, None], None),
        ({"timelimit": [30, 25.5]}, [[], {}, {}], None),
        ({"eta": "2030-01-01T00:00:00+00:00", "expires": "2030-01-01T00:00:00"}, [[], {}, {}], None),
        ({}, [[nested(32)], nested(32), {}], None),
        ({"timelimit": ["abc", "def"]}, [[], {}, {}], "timelimit: expected null or a number"),
        ({"timelimit": [math.inf, None]}, [[], {}, {}], "timelimit: expected null or a number"),
        ({"timelimit": [-1, None]}, [[], {}, {}], "timelimit: expected null or a number"),
        ({"eta": "soon"}, [[], {}, {}], "eta: expected an ISO 8601 time"),
        ({"expires": [1]}, [[], {}, {}], "expires: expected an ISO 8601 time"),
        ({"retries": -1}, [[], {}, {}], "retries: expected an integer"),
        ({"retries": True}, [[], {}, {}], "retries: expected an integer"),
        ({"id": 7}, [[], {}, {}], "id: expected a string"),
        ({"task": ["echo"]}, [[], {}, {}], "task: expected a task name"),
        ({"group": "g" * 65}, [[], {}, {}], "group: expected null or a string"),
        ({}, [1], "body: expected [args, kwargs, embed]"),
        ({}, [[], {}, {}, {}], "body: expected [args, kwargs, embed]"),
        ({}, "text", "body: expected [args, kwargs, embed] (got 'text')"),
        ({}, [{}, {}, {}], "args: expected a list"),
        ({}, [[], [], {}], "kwargs: expected an object"),
        ({}, [[], {}, []], "embed: expected an object or null"),
        ({}, [[], {}, {"chain": {}}], "embed.chain: expected a list or null"),
        ({}, [[], nested(33), {}], "kwargs: nested deeper than 32 levels"),
        ({}, [[1, nested(33)], {}, {}], "args[1]: nested deeper than 32 levels"),
        ({}, [[], {"x": math.nan}, {}], "kwargs.x: must be a finite number"),
        ({}, [[], {"x": "\x00"}, {}], "kwargs.x: contains a NUL character"),
        ({}, [[], {}, {"chord": nested(300)}], "embed: nested deeper than 200 levels"),
        ({"x": nested(300)}, [[], {}, {}], "headers: nested deeper than 200 levels"),
        ({"celery_ext": {"v": 1, "token": "", "attempt": 1}}, [[], {}, {}], "header celery_ext: token"),
    ],
)
def test_problem_of_a_protocol_2_message(changes: dict[str, Any], body: Any, reason: str | None) -> None:
    found = problem(Message(headers(**changes), body))
    assert (found is None) if reason is None else (found or "").startswith(reason), found


def test_protocol_1_messages_and_other_tasks() -> None:
    v1 = {"task": "echo", "id": "t1", "args": [], "kwargs": {"x": 1}}
    assert problem(Message({}, v1)) is None
    assert problem(Message({}, {**v1, "kwargs": {"x": math.inf}})) == "kwargs.x: must be a finite number (got inf)"
    assert problem(Message({}, {**v1, "args": 1})) == "args: expected a list (got int)"
    assert problem(Message({}, [1])).startswith("body: expected")  # type: ignore[union-attr]
    assert problem(Message([1], [[], {}, None])) == "headers: expected an object (got list)"
    # A task that is not a celery_ext type (celery.chord_unlock, a plain @app.task): not recorded,
    # so only its shape and depth matter, and its id may be longer.
    other = headers(task="celery.chord_unlock", id="i" * 100)
    assert problem(Message(other, [[], {"x": math.nan, "deep": nested(100)}, None]), {}) is None
    assert problem(Message(other, [[], nested(300), None]), {}) == "arguments: nested deeper than 200 levels"


def test_what_the_guard_reads_of_a_message_whose_body_is_bad() -> None:
    seen = Reading()
    problem_of(Message(headers(id="abc"), [1]), ECHO, 32, seen)
    assert (seen.name, seen.task_id, seen.ours, seen.kwargs) == ("echo", "abc", True, None)
    seen = Reading()
    assert problem_of(Message(headers(), [[1], {"a": 1}, None]), ECHO, 32, seen) is None
    assert (seen.args, seen.kwargs) == ([1], {"a": 1})


def test_a_request_the_pool_cannot_take_gives_its_slot_back() -> None:
    """Every pool process busy: the request waits on the worker's semaphore and is handed to the
    pool from the release of another task's slot.  If the pool refuses it there (billiard's
    pickling), the slot must come back, or the worker runs one task fewer for good."""
    rejected: list[str] = []
    cache = {1: SimpleNamespace(correlation_id="t1", _accepted=False), 2: SimpleNamespace(correlation_id="t2")}

    class Worker:
        semaphore = LaxBoundedSemaphore(1)
        pool = SimpleNamespace(_pool=SimpleNamespace(_cache=cache))

        def __init__(self) -> None:
            self._quick_acquire = self.semaphore.acquire
            self._quick_release = self.semaphore.release
            self.process_task = self._process_task_sem

        def _process_task_sem(self, req: Any) -> Any:
            return self._quick_acquire(self._process_task, req)

        def _process_task(self, req: Any) -> None:
            raise RecursionError("maximum recursion depth exceeded while pickling an object")

    worker = Worker()
    consumer: Any = SimpleNamespace(
        app=SimpleNamespace(tasks=ECHO),
        guard=SimpleNamespace(payload_depth=32, reject=lambda message, reason, seen, ack: rejected.append(reason)),
    )
    consumer._handoff_failed = lambda *args: GuardedConsumer._handoff_failed(consumer, *args)
    GuardedConsumer._guard_pool_handoff(consumer, worker)

    worker.semaphore.acquire(lambda: None)  # the only slot is busy
    req = SimpleNamespace(id="t1", name="echo", message=Message(headers(), [[], {}, None]), acknowledge=lambda: None)
    worker.process_task(req)  # waits for the slot
    assert rejected == [] and worker.semaphore.value == 0
    worker.semaphore.release()  # the busy task ends: the waiting request is handed to the pool, which refuses it
    assert rejected == [
        "the pool could not take it: RecursionError: "
        "RecursionError('maximum recursion depth exceeded while pickling an object')"
    ]
    assert worker.semaphore.value == 1  # the slot came back
    assert list(cache) == [2]  # the job that never reached a process is forgotten


def test_a_dead_letter_keeps_the_raw_message_within_bounds() -> None:
    from celery_ext.guard import DEAD_LETTER_BODY, _envelope

    text = _envelope(Message(headers(), [[], {"x": 1}, None]))
    assert json.loads(text["body"]) == [[], {"x": 1}, None] and text["body_encoding"] is None
    binary = Message({"x": math.nan, "deep": nested(2000)}, None)
    binary.body = b"\xff\xfe" + b"a" * (DEAD_LETTER_BODY + 10)
    entry = _envelope(binary)
    assert entry["body_encoding"] == "base64" and entry["truncated"] is True
    assert len(base64.b64decode(entry["body"])) == DEAD_LETTER_BODY
    assert set(entry["headers"]) == {"repr"}  # not strict JSON: kept as its bounded repr
    json.dumps(entry, allow_nan=False)
