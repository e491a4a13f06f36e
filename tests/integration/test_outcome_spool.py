"""Outcomes that cannot reach storage are spooled and applied when it returns (issue 12, item
3): a private PostgreSQL server, started by the test on a free port, is stopped for longer than
the task lease while tasks finish; every task ends with its real outcome and ran once.  And a
spooled outcome stays fenced by its run's dispatch token (a real SQLite store)."""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from celery_ext.errors import StorageError
from celery_ext.model import Task, TaskErrorInfo, TaskLog, TaskStatus, utcnow
from celery_ext.storage.spool import Spool
from tests.conftest import TEST_TASKS
from tests.support.schedulers import SchedulerProcess
from tests.support.scrape import poll

MARK = [{"type": "python", "config": {"modules": ["tests.support.storage_tasks"]}}]


def runs(path: Path) -> collections.Counter[str]:
    """How many times each key started, from the tasks' own side-effect file."""
    if not path.exists():
        return collections.Counter()
    return collections.Counter(ln.split()[1] for ln in path.read_text().splitlines() if ln.startswith("start "))


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_outcomes_finished_during_a_postgresql_outage_are_applied_once_it_returns(
    make_cluster: Any, private_postgres: Any
) -> None:
    c = make_cluster(
        storage={"type": "postgresql", "config": {"url": private_postgres.url(), "connect_timeout": 2}},
        executors=MARK,
        # A short lease, so that the outage outlasts it many times over; a scheduler that
        # recovers every second.
        worker={"task_lease": 6.0, "heartbeat_interval": 0.5},
        scheduler={"interval": 1.0},
    )
    m = c.manager
    c.runtime.storage.migrate()
    worker = c.worker(concurrency=4)
    scheduler = SchedulerProcess(c).start()
    side = c.tmp_path / "runs.txt"
    try:
        scheduler.wait_for_log("is the leader", 60)
        # Four that run across the start of the outage and finish during it, four that wait.
        running = [m.submit("mark_file", {"path": str(side), "key": f"r{i}", "seconds": 6}) for i in range(4)]
        poll(lambda: all(m.get(t.task_id).status is TaskStatus.RUNNING for t in running), 60, "four tasks running")
        waiting = [m.submit("mark_file", {"path": str(side), "key": f"w{i}", "seconds": 0.5}) for i in range(4)]
        c.runtime.storage.close()  # the test's own pooled connections must not outlive the server
        private_postgres.stop()
        time.sleep(50)  # > 8 leases: every outcome of the running four is spooled meanwhile
        assert sum(runs(side).values()) == 4, runs(side)  # the waiting ones could not be claimed
        private_postgres.start()

        tasks = running + waiting
        poll(lambda: all(m.get(t.task_id).status.terminal for t in tasks), 180, "every task to end")
        for t in tasks:
            done = m.get(t.task_id)
            assert done.status is TaskStatus.SUCCEEDED and done.attempt == 1, done
            assert done.result == t.payload["key"]
        time.sleep(3)  # a duplicate run, if recovery had re-dispatched one, would start by now
        assert runs(side) == {t.payload["key"]: 1 for t in tasks}, runs(side)
        # Celery's view agrees once applied (AsyncResult reads the record).
        assert c.runtime.celery.AsyncResult(running[0].task_id).state == "SUCCESS"
        log = worker.log()
        assert "spooled until it returns" in log, log[-4000:]
        assert "held in the registry" in log, log[-4000:]
        assert "refused: the record moved on" not in log, log[-4000:]
        assert "whose worker was lost" not in scheduler.log(), scheduler.log()[-4000:]
        assert worker.alive()
        after = m.submit("mark_file", {"path": str(side), "key": "after", "seconds": 0})
        assert m.wait(after.task_id, 60).status is TaskStatus.SUCCEEDED
    finally:
        scheduler.stop()


class Gate:
    """A log writer that fails, as a store that is away would, until it is opened: it keeps the
    spool busy, so the outcomes behind it wait."""

    def __init__(self) -> None:
        self.open = threading.Event()

    def __call__(self, lines: Any) -> None:
        if not self.open.is_set():
            raise StorageError("closed")


def running_record(c: Any) -> Task:
    task = c.manager.submit("echo", {"x": 1})  # no worker: the test claims it, as one would
    record = c.runtime.lifecycle.claim(task, task.dispatch_token, "w@test", 30.0, None)
    assert record is not None and record.status is TaskStatus.RUNNING
    return record


def test_a_spooled_outcome_is_applied_in_order_and_fenced_by_its_token(make_cluster: Any) -> None:
    c = make_cluster(executors=TEST_TASKS)
    lifecycle = c.runtime.lifecycle
    gate = Gate()
    lifecycle.spool = Spool(gate)
    lifecycle.spool.submit([TaskLog("x", 1, utcnow(), "INFO", "a line first")])
    assert lifecycle.spool.busy

    kept, superseded = running_record(c), running_record(c)
    seen: dict[str, bool] = {}
    assert lifecycle.succeed(kept, 42, spool=True, then=lambda ok: seen.__setitem__("kept", ok)) is None
    assert (
        lifecycle.fail(
            superseded, TaskErrorInfo("boom", "x"), spool=True, then=lambda ok: seen.__setitem__("superseded", ok)
        )
        is None
    )
    assert lifecycle.spool.pending_outcomes == 2
    assert c.runtime.storage.tasks.get(kept.task_id).status is TaskStatus.RUNNING  # not yet
    # Meanwhile recovery re-dispatched the second under a new token: its late outcome is refused.
    changed, token = lifecycle.lost(superseded, TaskErrorInfo("worker_lost", "x"), 0.0)
    assert changed and token

    gate.open.set()
    assert lifecycle.spool.flush(30)
    assert seen == {"kept": True, "superseded": False}
    done = c.runtime.storage.tasks.get(kept.task_id)
    assert done.status is TaskStatus.SUCCEEDED and done.result == 42
    other = c.runtime.storage.tasks.get(superseded.task_id)
    assert other.status is TaskStatus.RETRYING and other.dispatch_token == token  # the newer dispatch stands
