"""The core task lifecycle through real worker processes, on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import time

import pytest
import redis

from celery_ext.model import TaskStatus
from tests.conftest import TEST_TASKS
from tests.support.services import unique


def r() -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=6379, db=0, decode_responses=True)


def test_success_retries_and_logs_on_each_backend(make_cluster, storage_kind) -> None:
    c = make_cluster(storage=storage_kind, executors=TEST_TASKS)
    c.worker()
    m = c.manager

    ok = m.submit("echo", {"hello": "world", "n": [1, 2]})
    assert ok.status is TaskStatus.QUEUED
    done = m.wait(ok.task_id, 30)
    assert done.status is TaskStatus.SUCCEEDED
    assert done.result == {"hello": "world", "n": [1, 2]}
    assert done.attempt == 1 and done.worker_id and done.error is None
    # queued_at stays empty when a fast worker claims the task before the producer marks it queued
    assert done.created_at <= (done.queued_at or done.started_at) <= done.started_at <= done.finished_at

    key = unique("flaky:")
    flaky = m.submit("flaky", {"key": key, "fail_times": 2}, max_retries=3)
    done = m.wait(flaky.task_id, 30)
    assert done.status is TaskStatus.SUCCEEDED, done
    assert done.attempt == 3 and done.result == {"runs": 3}
    logs = m.logs(flaky.task_id)
    assert [ln.attempt for ln in logs if "flaky run" in ln.message] == [1, 2, 3]
    assert any(ln.level == "WARNING" and "retrying in" in ln.message and ln.attempt == 1 for ln in logs)
    assert any("planned failure 1" in ln.message for ln in logs)


def test_exponential_backoff_between_attempts(shared_cluster) -> None:
    key = unique("flaky:")
    task = shared_cluster.manager.submit("flaky", {"key": key, "fail_times": 3}, max_retries=3)
    assert shared_cluster.manager.wait(task.task_id, 30).status is TaskStatus.SUCCEEDED
    times = [float(t) for t in r().lrange(f"{key}:times", 0, -1)]
    gaps = [b - a for a, b in zip(times, times[1:])]
    # retry_backoff 0.1s doubling, no jitter: at least 0.1, 0.2, 0.4 seconds apart
    assert len(gaps) == 3
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2 and gaps[2] >= 0.4


def test_retries_exhausted_ends_failed_with_reason(shared_cluster) -> None:
    m = shared_cluster.manager
    task = m.submit("flaky", {"key": unique("flaky:"), "fail_times": 10}, max_retries=1)
    done = m.wait(task.task_id, 30)
    assert done.status is TaskStatus.FAILED
    assert done.attempt == 2
    assert done.error.reason == "exception" and "planned failure 2" in done.error.message


def test_permanent_error_is_not_retried(shared_cluster) -> None:
    m = shared_cluster.manager
    done = m.wait(m.submit("reject", {"reason": "bad input"}, max_retries=5).task_id, 30)
    assert done.status is TaskStatus.FAILED and done.attempt == 1
    assert (done.error.reason, done.error.message) == ("rejected", "bad input")


def test_soft_timeout_is_recorded_as_timeout(shared_cluster) -> None:
    m = shared_cluster.manager
    done = m.wait(m.submit("sleep", {"seconds": 20}, timeout=0.5, max_retries=2).task_id, 30)
    assert done.status is TaskStatus.FAILED and done.attempt == 1
    assert done.error.reason == "timeout"


def test_hard_timeout_kills_and_records_timeout(make_cluster) -> None:
    c = make_cluster(executors=TEST_TASKS, worker={"hard_timeout_grace": 0.5})
    w = c.worker()
    m = c.manager
    done = m.wait(m.submit("stubborn", {"seconds": 30}, timeout=0.5).task_id, 30)
    assert done.status is TaskStatus.FAILED
    assert done.error.reason == "timeout" and "hard time limit" in done.error.message
    # the pool replaced its child and keeps working
    assert m.wait(m.submit("echo", {"after": "hard limit"}).task_id, 30).status is TaskStatus.SUCCEEDED
    assert w.alive()
    assert "applies no time limits" not in w.log()  # the prefork pool does


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_a_pool_without_time_limits_says_so_at_start(make_cluster, pool: str) -> None:
    """Celery's threads and solo pools apply no time limit: the worker warns once, and a task runs
    past its timeout to its end (as in Celery); the prefork worker above enforces it."""
    c = make_cluster(executors=TEST_TASKS, worker={"pool": pool})
    w = c.worker(pool=pool, concurrency=2 if pool == "threads" else 1)
    m = c.manager
    done = m.wait(m.submit("sleep", {"seconds": 1.0}, timeout=0.3).task_id, 30)
    assert done.status is TaskStatus.SUCCEEDED
    assert f"the {pool} pool applies no time limits" in w.log()


def test_cancel_before_start_never_runs(make_cluster) -> None:
    c = make_cluster(executors=TEST_TASKS)
    m = c.manager
    key = unique("cancelled:")
    queued = m.submit("record", {"key": key, "value": "ran"})
    # Up to scheduler.max_countdown (1 s) a delay is a Celery countdown on a published message.
    delayed = m.submit("record", {"key": key, "value": "ran-delayed"}, delay=1.0)
    assert delayed.status is TaskStatus.QUEUED and delayed.run_at is not None
    # Longer, the task waits in storage for the scheduler; no message exists yet.
    held = m.submit("record", {"key": key, "value": "ran-held"}, delay=5.0)
    assert held.status is TaskStatus.SCHEDULED
    for t in (queued, delayed, held):
        assert m.cancel(t.task_id).status is TaskStatus.CANCELLED
    c.worker()
    marker = m.submit("record", {"key": key, "value": "marker"}, delay=1.0)
    assert m.wait(marker.task_id, 30).status is TaskStatus.SUCCEEDED
    assert r().lrange(key, 0, -1) == ["marker"]
    for t in (queued, delayed, held):
        record = m.get(t.task_id)
        assert record.status is TaskStatus.CANCELLED and record.started_at is None


def test_log_capture_is_capped_per_task(make_cluster) -> None:
    c = make_cluster(executors=TEST_TASKS, worker={"max_log_lines_per_task": 5})
    c.worker()
    m = c.manager
    task = m.submit("chatty", {"lines": 50})
    assert m.wait(task.task_id, 30).status is TaskStatus.SUCCEEDED
    logs = m.logs(task.task_id)
    assert [ln.message for ln in logs[:5]] == [f"tests.tasks: line {i}" for i in range(5)]
    assert "46 more log lines dropped" in logs[-1].message
    assert all(ln.attempt == 1 for ln in logs)


def test_worker_lost_retries_then_dead(shared_cluster) -> None:
    m = shared_cluster.manager
    done = m.wait(m.submit("crash", {}, max_retries=1).task_id, 60)
    assert done.status is TaskStatus.DEAD
    assert done.error.reason == "worker_lost" and done.attempt == 2
    assert m.wait(m.submit("echo", {}).task_id, 30).status is TaskStatus.SUCCEEDED


def test_manual_retry_of_failed_task(shared_cluster) -> None:
    m = shared_cluster.manager
    key = unique("flaky:")
    failed = m.wait(m.submit("flaky", {"key": key, "fail_times": 1}, max_retries=0).task_id, 30)
    assert failed.status is TaskStatus.FAILED
    again = m.retry(failed.task_id)
    assert again.status is TaskStatus.QUEUED
    done = m.wait(failed.task_id, 30)
    assert done.status is TaskStatus.SUCCEEDED and done.result == {"runs": 2} and done.error is None


def test_submit_many_and_idempotency(shared_cluster) -> None:
    m = shared_cluster.manager
    key = unique("idem-")
    first = m.submit("echo", {"i": -1}, idempotency_key=key)
    again = m.submit("echo", {"i": -2}, idempotency_key=key)
    assert again.task_id == first.task_id and again.payload == {"i": -1}
    tasks = m.submit_many(
        [{"task_type": "echo", "payload": {"i": i}} for i in range(30)]
        + [{"task_type": "echo", "payload": {"i": 99}, "idempotency_key": key}]
    )
    assert len(tasks) == 31 and tasks[-1].task_id == first.task_id
    assert len({t.task_id for t in tasks[:30]}) == 30
    for t in tasks:
        assert m.wait(t.task_id, 60).status is TaskStatus.SUCCEEDED
    assert [m.get(t.task_id).result["i"] for t in tasks[:30]] == list(range(30))


def test_priority_orders_waiting_tasks(make_cluster) -> None:
    c = make_cluster(executors=TEST_TASKS)
    m = c.manager
    key = unique("prio:")
    low = [m.submit("record", {"key": key, "value": f"low{i}"}, priority=0) for i in range(4)]
    high = [m.submit("record", {"key": key, "value": f"high{i}"}, priority=9) for i in range(4)]
    c.worker(concurrency=1)
    for t in low + high:
        m.wait(t.task_id, 30)
    order = r().lrange(key, 0, -1)
    assert sorted(order[:4]) == [f"high{i}" for i in range(4)], order


def test_logs_of_a_running_task_can_be_read_while_it_runs(shared_cluster) -> None:
    m = shared_cluster.manager
    task = m.submit("talk_then_wait", {"seconds": 4})
    deadline = time.monotonic() + 3.5
    while not [ln for ln in m.logs(task.task_id) if "now waiting" in ln.message]:
        assert time.monotonic() < deadline, "the running task's log line never showed"
        time.sleep(0.1)
    assert m.get(task.task_id).status is TaskStatus.RUNNING  # read while it runs
    assert m.wait(task.task_id, 30).status is TaskStatus.SUCCEEDED
    assert len([ln for ln in m.logs(task.task_id) if "now waiting" in ln.message]) == 1
