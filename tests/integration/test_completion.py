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
from tests.support.redis_monitor import commands_of


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


def counting(read: Any) -> tuple[Any, list[int]]:
    calls: list[int] = []

    def counted() -> Any:
        calls.append(1)
        return read()

    return counted, calls


def test_a_thread_that_waits_is_subscribed_before_the_publish_and_reads_no_record(make_cluster) -> None:
    """After a first wait, ``submit`` in the same thread subscribes to the task's channel before
    publishing it: its wait (``manager.wait``, ``AsyncResult.get``) takes the outcome from the
    message laid over the record as submitted, without reading the record, also when the task
    ended before the wait began, or while the thread waited for another task."""
    from celery_ext.completion import MAX_EXPECTED

    c = make_cluster(executors=TEST_TASKS)
    c.worker()
    m, completion, records = c.manager, c.runtime.lifecycle.completion, c.runtime.storage.tasks
    m.wait(m.submit("echo", {}).task_id, 30)  # the first wait: this thread waits

    task = m.submit("echo", {"i": 1})
    read, calls = counting(lambda: records.get(task.task_id))
    done = completion.wait(task.task_id, read, 30)
    assert (done.status, done.result, calls) == (TaskStatus.SUCCEEDED, {"i": 1}, [])
    assert done == records.get(task.task_id)  # the message laid over the submitted record

    first, second = m.submit("add", {"x": 1, "y": 2}), m.submit("reject", {"reason": "no"})
    deadline = time.monotonic() + 30
    while not records.get(first.task_id).status.terminal or not records.get(second.task_id).status.terminal:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    read, calls = counting(lambda: records.get(second.task_id))
    failed = completion.wait(second.task_id, read, 30)  # reads past the first one's message, keeps it
    assert failed.status is TaskStatus.FAILED and failed.error is not None and failed.error.reason == "rejected"
    read, calls2 = counting(lambda: records.get(first.task_id))
    assert completion.wait(first.task_id, read, 30).result == 3
    assert calls == calls2 == []
    assert c.runtime.celery.AsyncResult(m.submit("echo", {"via": "celery"}).task_id).get(timeout=30) == {
        "via": "celery"
    }

    # A thread that then submits without waiting stops subscribing, and never holds more than
    # MAX_EXPECTED subscriptions; a later wait, on any of them, still gets its outcome.
    rds = redis.Redis.from_url(completion.url)
    many = [m.submit("echo", {"n": i}) for i in range(MAX_EXPECTED + 20)]
    channels = [completion.channel(t.task_id) for t in many]
    deadline = time.monotonic() + 5  # the evicted one's UNSUBSCRIBE went out without waiting for its reply
    while sum(n for _, n in rds.pubsub_numsub(*channels)) > MAX_EXPECTED:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not any(n for _, n in rds.pubsub_numsub(*channels[MAX_EXPECTED + 1 :]))
    for t in (many[0], many[MAX_EXPECTED - 1], many[-1]):
        assert m.wait(t.task_id, 30).result == t.payload
    assert m.get(many[-1].task_id).status is TaskStatus.SUCCEEDED


def test_a_thread_that_never_waits_subscribes_to_nothing(make_cluster) -> None:
    import threading

    c = make_cluster(executors=TEST_TASKS)
    m, completion = c.manager, c.runtime.lifecycle.completion
    submitted: list[Any] = []
    thread = threading.Thread(target=lambda: submitted.extend(m.submit("echo", {"n": i}) for i in range(5)))
    thread.start()
    thread.join(30)
    rds = redis.Redis.from_url(completion.url)
    assert len(submitted) == 5
    assert not any(n for _, n in rds.pubsub_numsub(*(completion.channel(t.task_id) for t in submitted)))


def test_the_workers_slot_is_released_in_the_write_that_pushes_the_outcome(make_cluster) -> None:
    """A pool process writes a run's pushed outcome and the release of its worker's routing slot
    together (one send a task); each run releases its slot exactly once, a retried run too (its
    release after the task, as before), and the count ends at zero."""
    c = make_cluster(executors=TEST_TASKS)
    c.worker()
    m = c.manager
    m.wait(m.submit("echo", {}).task_id, 30)  # the worker is up and warm
    registry = c.runtime.registry
    (worker,) = registry.online()
    client = redis.Redis.from_url(c.runtime.lifecycle.completion.url)
    key = f"flaky-{time.monotonic_ns()}"
    runs: list[Any] = []

    def work() -> None:
        for task_type, payload in (("echo", {"i": 1}), ("reject", {}), ("flaky", {"key": key, "fail_times": 1})):
            task = m.submit(task_type, payload)
            runs.append(m.wait(task.task_id, 30))

    ran = commands_of(client, work)
    assert [t.status for t in runs] == [TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.SUCCEEDED]
    release = f"{registry.keys[2]} {worker.id} -1"
    releases = [cmd for cmd in ran if cmd["command"].startswith("EVAL ") and cmd["command"].endswith(release)]
    assert len(releases) == 4, releases  # echo, reject, flaky's two attempts
    for task in runs:
        channel = c.runtime.lifecycle.completion.channel(task.task_id)
        (push,) = [cmd for cmd in ran if cmd["command"].startswith(f"PUBLISH {channel} ")]
        conn = (push["client_address"], push["client_port"])
        after = next(cmd for cmd in ran[ran.index(push) + 1 :] if (cmd["client_address"], cmd["client_port"]) == conn)
        assert after in releases, (push, after)  # the pool process's next command on that connection
    deadline = time.monotonic() + 10
    while int(client.hget(registry.keys[2], worker.id) or 0) != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert int(client.hget(registry.keys[2], worker.id) or 0) == 0
    client.close()
