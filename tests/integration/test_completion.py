"""Pushed completion through real worker processes: the waiter takes the outcome from the message
and reads the record only when the message is missing, too large, or of another run."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis

from celery_ext.completion import WAKE, Completion, merged
from celery_ext.errors import TaskFailed
from celery_ext.model import TaskStatus
from tests.conftest import TEST_TASKS


def subscribed(cluster: Any) -> Any:
    """A subscription of our own to every completion channel of the cluster, made before the
    task is submitted (so before it can end)."""
    completion = cluster.runtime.lifecycle.completion
    pubsub = redis.Redis.from_url(completion.url).pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe(completion.channel("*"))
    return pubsub


def message(cluster: Any, pubsub: Any, task_id: str, timeout: float = 30.0) -> bytes:
    """The completion message of ``task_id``."""
    channel = cluster.runtime.lifecycle.completion.channel(task_id).encode()
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pubsub.get_message(timeout=1.0)
        if got is not None and got["channel"] == channel:
            pubsub.close()
            return bytes(got["data"])
    raise AssertionError("no completion message")


def test_the_pushed_outcome_is_the_committed_record(make_cluster, storage_kind) -> None:
    """Laid over the record read before the task ran, the message gives exactly the record that
    storage holds afterwards, for a success and for a failure, on every SQL backend."""
    c = make_cluster(storage=storage_kind, executors=TEST_TASKS)
    c.worker()
    m = c.manager
    m.wait(m.submit("echo", {}).task_id, 30)  # the worker is up and warm
    laid = 0
    for task_type, payload, status in (
        ("echo", {"n": [1, 2.5, None], "s": "é"}, TaskStatus.SUCCEEDED),
        ("reject", {"reason": "bad input"}, TaskStatus.FAILED),
        ("stubborn", {"seconds": 0.3}, TaskStatus.SUCCEEDED),  # read while it runs, surely
    ):
        pubsub = subscribed(c)
        task = m.submit(task_type, payload)
        before = m.get(task.task_id)
        data = message(c, pubsub, task.task_id)
        stored = m.get(task.task_id)
        assert stored.status is status
        if before.status.terminal:  # the worker beat our read: nothing to lay over
            continue
        assert json.loads(data)["status"] == status.value
        assert merged(before, data) == stored
        laid += 1
    assert laid >= 1


def test_wait_and_get_give_the_outcome_success_and_failure(make_cluster) -> None:
    c = make_cluster(executors=TEST_TASKS)
    c.worker()
    m, app = c.manager, c.runtime.celery
    ok = m.submit("echo", {"hello": "world"})
    assert app.AsyncResult(ok.task_id).get(timeout=30) == {"hello": "world"}
    done = m.wait(ok.task_id, 30)
    assert done.status is TaskStatus.SUCCEEDED and done.result == {"hello": "world"}

    bad = m.submit("reject", {"reason": "bad input"})
    failed = m.wait(bad.task_id, 30)
    assert failed.status is TaskStatus.FAILED
    assert failed.error is not None and failed.error.reason == "rejected" and failed.error.message == "bad input"
    with pytest.raises(TaskFailed) as caught:
        app.AsyncResult(m.submit("reject", {"reason": "again"}).task_id).get(timeout=30)
    assert caught.value.reason == "rejected" and "again" in str(caught.value)


def test_a_waiter_after_the_end_reads_the_record(make_cluster) -> None:
    c = make_cluster(executors=TEST_TASKS)
    c.worker()
    m = c.manager
    task = m.submit("echo", {"late": True})
    record = c.runtime.storage.tasks
    deadline = time.monotonic() + 30
    while record.get(task.task_id).status is not TaskStatus.SUCCEEDED:  # the push is long gone
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert m.wait(task.task_id, 5).result == {"late": True}
    assert c.runtime.celery.AsyncResult(task.task_id).get(timeout=5) == {"late": True}


def test_a_result_too_large_to_push_is_read_from_the_record(make_cluster) -> None:
    c = make_cluster(executors=TEST_TASKS)
    c.worker()
    m = c.manager
    big = {"blob": "x" * 100_000}
    pubsub = subscribed(c)
    task = m.submit("echo", big)
    assert m.wait(task.task_id, 30).result == big
    assert message(c, pubsub, task.task_id) == WAKE  # a bare wake-up: the waiter read the record
    assert c.runtime.celery.AsyncResult(task.task_id).get(timeout=5) == big


def test_lost_push_or_channel_down_falls_back_to_the_record(make_cluster) -> None:
    """A waiter that never hears the worker (its channel is not the one the worker publishes on,
    or its Redis is unreachable) still gets the outcome, from the record."""
    c = make_cluster(executors=TEST_TASKS)
    c.worker()
    m = c.manager
    m.wait(m.submit("echo", {}).task_id, 30)
    lifecycle = c.runtime.lifecycle
    real = lifecycle.completion
    try:
        for completion in (
            Completion(real.url, f"{real.prefix}-elsewhere", fallback=0.2),  # the push is lost
            Completion("redis://127.0.0.1:1/0", real.prefix, fallback=0.2),  # no channel at all
        ):
            lifecycle.completion = completion
            task = m.submit("add", {"x": 2, "y": 3})
            assert m.wait(task.task_id, 30).result == 5
            bad = m.submit("reject", {"reason": "lost"})
            failed = m.wait(bad.task_id, 30)
            assert failed.status is TaskStatus.FAILED and failed.error is not None
            assert failed.error.reason == "rejected"
    finally:
        lifecycle.completion = real
