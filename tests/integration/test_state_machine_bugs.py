"""Three bugs of the old message design, each with a test that failed before the fix (issue 10)."""

from __future__ import annotations

import time

import redis

from celery_ext.model import TaskStatus
from tests.conftest import TEST_TASKS
from tests.support.services import unique


def spans(key: str) -> list[tuple[float, float]]:
    """(start, end) of each run recorded by the ``span`` task, in order of start."""
    events = [e.decode().split() for e in redis.Redis().lrange(key, 0, -1)]
    starts = [float(t) for kind, t in events if kind == "start"]
    ends = [float(t) for kind, t in events if kind == "end"]
    return list(zip(starts, ends, strict=False))


def test_retry_of_a_task_cancelled_while_running_waits_for_that_run(make_cluster) -> None:
    """Cancel without terminate lets the run go on; a retry must not start a second run beside
    it: the new run is published when the old one ends."""
    c = make_cluster(executors=TEST_TASKS)
    c.worker(concurrency=2)
    m = c.manager
    key = unique("span:")
    task = m.submit("span", {"key": key, "seconds": 1.5})
    deadline = time.monotonic() + 20
    while m.get(task.task_id).status is not TaskStatus.RUNNING:
        assert time.monotonic() < deadline, "never started"
        time.sleep(0.02)
    assert m.cancel(task.task_id).status is TaskStatus.CANCELLED
    reopened = m.retry(task.task_id)
    assert reopened.status is TaskStatus.PENDING and reopened.run == 2
    done = m.wait(task.task_id, 30)
    assert done.status is TaskStatus.SUCCEEDED and done.run == 2 and done.attempt == 1
    (s1, e1), (s2, e2) = spans(key)
    assert s2 >= e1, f"the retried run started at {s2} while the cancelled one ran until {e1}"


def test_retry_of_a_task_cancelled_while_queued_is_published_at_once(make_cluster) -> None:
    c = make_cluster(executors=TEST_TASKS)
    c.worker()
    m = c.manager
    task = m.submit("echo", {"n": 1}, delay=60)
    m.cancel(task.task_id)
    assert m.retry(task.task_id).status in (TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.SUCCEEDED)
    done = m.wait(task.task_id, 30)
    assert done.status is TaskStatus.SUCCEEDED and done.run == 2


def test_queued_at_is_always_set(make_cluster) -> None:
    """The message carries the publish time (on a Redis broker the record's own, written with it),
    so a fast worker's claim records it, also before the producer marks the record queued."""
    c = make_cluster(executors=TEST_TASKS)
    c.worker(concurrency=2)
    m = c.manager
    tasks = [m.submit("echo", {"i": i}) for i in range(60)]
    for t in tasks:
        done = m.wait(t.task_id, 30)
        assert done.queued_at is not None, done
        assert done.created_at <= done.queued_at <= done.started_at <= done.finished_at


def test_logs_of_a_manual_retry_are_a_new_run(make_cluster) -> None:
    c = make_cluster(executors=TEST_TASKS)
    c.worker()
    m = c.manager
    key = unique("flaky:")
    task = m.submit("flaky", {"key": key, "fail_times": 2}, max_retries=1)
    first = m.wait(task.task_id, 30)
    assert first.status is TaskStatus.FAILED and first.run == 1 and first.attempt == 2
    m.retry(task.task_id)
    second = m.wait(task.task_id, 30)
    assert second.status is TaskStatus.SUCCEEDED and second.run == 2 and second.attempt == 1
    runs = [(ln.run, ln.attempt) for ln in m.logs(task.task_id) if "flaky run" in ln.message]
    assert runs == [(1, 1), (1, 2), (2, 1)]
    assert [ln.attempt for ln in m.logs(task.task_id, run=2) if "flaky run" in ln.message] == [1]
