"""Leases that mean something (issue 12, item 3): the worker renews the lease of every task it
runs, recovery keys on the lease alone, and a stalled worker's superseded run stops."""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis

from celery_ext.model import TaskStatus
from celery_ext.recovery import recover_expired_leases
from tests.conftest import TEST_TASKS
from tests.support.scrape import poll
from tests.support.services import unique

FAST = {"task_lease": 1.5, "heartbeat_interval": 0.5}


def spans(key: str) -> list[str]:
    return [e.decode().split()[0] for e in redis.Redis().lrange(key, 0, -1)]


def running(m, task_id: str) -> bool:
    return m.get(task_id).status is TaskStatus.RUNNING


def test_a_task_longer_than_its_lease_is_renewed_not_recovered(make_cluster) -> None:
    c = make_cluster(executors=TEST_TASKS, worker=FAST)
    c.worker()
    m = c.manager
    key = unique("span:")
    task = m.submit("span", {"key": key, "seconds": 5})
    poll(lambda: running(m, task.task_id), 20, "the task to start")
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:  # the scheduler's recovery, every 0.25 s, finds nothing
        assert recover_expired_leases(c.runtime) == []
        time.sleep(0.25)
    done = m.wait(task.task_id, 30)
    assert done.status is TaskStatus.SUCCEEDED and done.attempt == 1
    assert spans(key) == ["start", "end"]


def test_a_worker_restarted_under_the_same_name_does_not_shield_its_old_tasks(make_cluster) -> None:
    c = make_cluster(executors=TEST_TASKS, worker=FAST)
    name = f"{unique('same')}@%h"
    w = c.worker(hostname=name)
    m = c.manager
    tasks = [m.submit("span", {"key": unique("span:"), "seconds": 30}, max_retries=2) for _ in range(2)]
    for t in tasks:
        poll(lambda t=t: running(m, t.task_id), 20, "the tasks to start")
    w.kill()
    c.worker(hostname=name)  # the same name is online again at once
    recovered: list[str] = []  # the scheduler's recovery, run until the old leases have expired
    poll(
        lambda: bool(recovered.extend(recover_expired_leases(c.runtime))) or len(recovered) >= 2,
        10,
        "the old incarnation's leases to be recovered",
    )
    assert sorted(recovered) == sorted(t.task_id for t in tasks)
    for t in tasks:
        poll(lambda t=t: m.get(t.task_id).attempt == 2 and running(m, t.task_id), 20, "the second attempt")
        m.cancel(t.task_id, terminate=True)


@pytest.mark.slow
def test_a_stalled_worker_stops_its_superseded_run(make_cluster) -> None:
    """SIGSTOP the worker's main process past its lease: recovery re-dispatches the task to
    another worker; on SIGCONT the first worker sees that its run was superseded and stops it."""
    c = make_cluster(executors=TEST_TASKS, worker=FAST)
    stalled = c.worker(concurrency=1)
    m = c.manager
    key = unique("span:")
    # Longer than the second worker takes to start on a busy machine (7 s seen): the run must
    # still be going when the main process is stopped.
    task = m.submit("span", {"key": key, "seconds": 20}, max_retries=2)
    poll(lambda: running(m, task.task_id), 60, "the task to start")
    other = c.worker(concurrency=1)
    assert spans(key) == ["start"], "the run ended before the stall: nothing to supersede"
    os.kill(stalled.pid, signal.SIGSTOP)  # the main process only: its pool child runs on
    try:
        recovered: list[str] = []
        poll(
            lambda: bool(recovered.extend(recover_expired_leases(c.runtime))) or bool(recovered),
            10,
            "the stalled worker's lease to be recovered",
        )
        assert recovered == [task.task_id]
        poll(lambda: m.get(task.task_id).attempt == 2 and running(m, task.task_id), 20, "the second attempt")
    finally:
        os.kill(stalled.pid, signal.SIGCONT)
    stalled.wait_for_log("stopping this run", 10)
    done = m.wait(task.task_id, 60)
    assert done.status is TaskStatus.SUCCEEDED and done.attempt == 2
    assert other.hostname.split("@")[0] in (done.worker_id or "")
    # Run 2 started after run 1 and sleeps as long: had run 1 gone on, its end would be written.
    assert spans(key) == ["start", "start", "end"], "the superseded run must not finish"
