"""``Lifecycle``: each method is an arrow of ``model.TRANSITIONS``, taken only from the statuses
it starts from and, for a run's moves, only with the run's dispatch token; what each arrow writes.
Storage is SQLite in a temp dir."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from celery_ext.config import StorageConfig
from celery_ext.lifecycle import Lifecycle
from celery_ext.model import STARTABLE, TERMINAL, Task, TaskErrorInfo, TaskStatus, can_transition, new_id, utcnow
from celery_ext.observer import TaskObserver
from celery_ext.storage import Storage, open_storage

ERROR = TaskErrorInfo("boom", "it broke")
ALL = list(TaskStatus)


@pytest.fixture
def lc(sqlite_storage: Storage) -> Lifecycle:
    return Lifecycle(sqlite_storage)


def record(lc: Lifecycle, status: TaskStatus, **fields: Any) -> Task:
    task = Task(new_id(), "echo", {"a": 1}, status=status, dispatch_token=new_id(), max_retries=2, **fields)
    lc.storage.tasks.create(task)
    return task


def stored(lc: Lifecycle, task: Task) -> Task:
    found = lc.storage.tasks.get(task.task_id)
    assert found is not None
    return found


# Each method of a run (or of the scheduler's recovery) with the status it moves a RUNNING record to.
RUN_OUTCOMES: dict[str, tuple[Callable[[Lifecycle, Task], object], TaskStatus]] = {
    "succeed": (lambda lc, t: lc.succeed(t, {"r": 1}), TaskStatus.SUCCEEDED),
    "fail": (lambda lc, t: lc.fail(t, ERROR), TaskStatus.FAILED),
    "fail dead": (lambda lc, t: lc.fail(t, ERROR, dead=True), TaskStatus.DEAD),
    "retry_later": (lambda lc, t: lc.retry_later(t, ERROR, 5.0), TaskStatus.RETRYING),
}


@pytest.mark.parametrize("status", ALL)
def test_claim_starts_only_a_startable_record(lc: Lifecycle, status: TaskStatus) -> None:
    task = record(lc, status)
    claimed = lc.claim(task.replace(attempt=1), task.dispatch_token or "", "w1", 30.0, None)
    assert (claimed is not None) is (status in STARTABLE)
    assert stored(lc, task).status is (TaskStatus.RUNNING if status in STARTABLE else status)


def test_claim_writes_the_run_and_needs_the_token(lc: Lifecycle) -> None:
    task = record(lc, TaskStatus.QUEUED)
    assert lc.claim(task.replace(attempt=1), new_id(), "w1", 30.0, None) is None  # a stale message
    assert stored(lc, task).status is TaskStatus.QUEUED
    queued_at = utcnow() - timedelta(seconds=3)
    running = lc.claim(task.replace(attempt=2, args=[7]), task.dispatch_token or "", "w1", 30.0, queued_at)
    assert running is not None
    got = stored(lc, task)
    assert (got.status, got.attempt, got.worker_id, got.args, got.dispatch_token) == (
        TaskStatus.RUNNING,
        2,
        "w1",
        [7],
        task.dispatch_token,
    )
    assert got.queued_at == queued_at and got.started_at is not None and got.finished_at is None
    assert got.lease_until is not None and timedelta(seconds=29) < got.lease_until - got.started_at <= timedelta(
        seconds=30
    )
    # A second copy of the same message cannot start it again: at most one run at a time.
    assert lc.claim(task.replace(attempt=2), task.dispatch_token or "", "w2", 30.0, None) is None


def test_claim_with_a_new_token_hands_the_run_that_token(lc: Lifecycle) -> None:
    task = record(lc, TaskStatus.RETRYING)
    mine = new_id()
    running = lc.claim(task.replace(attempt=2), task.dispatch_token or "", "w1", 30.0, None, new_token=mine)
    assert running is not None and running.dispatch_token == mine == stored(lc, task).dispatch_token


@pytest.mark.parametrize("status", ALL)
@pytest.mark.parametrize("method", sorted(RUN_OUTCOMES))
def test_a_run_outcome_moves_only_a_running_record(lc: Lifecycle, method: str, status: TaskStatus) -> None:
    apply, target = RUN_OUTCOMES[method]
    task = record(lc, status)
    changed = apply(lc, task)
    assert bool(changed) is (status is TaskStatus.RUNNING)
    assert stored(lc, task).status is (target if status is TaskStatus.RUNNING else status)


@pytest.mark.parametrize("method", sorted(RUN_OUTCOMES))
def test_a_run_outcome_needs_the_runs_token(lc: Lifecycle, method: str) -> None:
    apply, _ = RUN_OUTCOMES[method]
    task = record(lc, TaskStatus.RUNNING)
    assert not apply(lc, task.replace(dispatch_token=new_id()))  # a run the record no longer knows
    assert stored(lc, task).status is TaskStatus.RUNNING


def test_what_success_and_failure_write(lc: Lifecycle) -> None:
    lease = utcnow() + timedelta(seconds=30)
    ok = record(lc, TaskStatus.RUNNING, error=ERROR, lease_until=lease)
    assert lc.succeed(ok, {"r": 1})
    got = stored(lc, ok)
    assert (got.result, got.error, got.lease_until, got.dispatch_token) == ({"r": 1}, None, None, ok.dispatch_token)
    assert got.finished_at is not None
    bad = record(lc, TaskStatus.RUNNING, lease_until=lease)
    assert lc.fail(bad, ERROR, {"partial": True})
    got = stored(lc, bad)
    assert (got.status, got.error, got.result, got.lease_until) == (TaskStatus.FAILED, ERROR, {"partial": True}, None)
    assert got.finished_at is not None


@pytest.mark.parametrize("hold", [False, True])
def test_what_a_retry_writes(lc: Lifecycle, hold: bool) -> None:
    task = record(lc, TaskStatus.RUNNING, lease_until=utcnow() + timedelta(seconds=30))
    token = lc.retry_later(task, ERROR, 60.0, hold=hold)
    got = stored(lc, task)
    assert token is not None and token != task.dispatch_token and got.dispatch_token == token
    assert (got.status, got.error, got.lease_until) == (TaskStatus.RETRYING, ERROR, None)
    # Held: the scheduler publishes it when due; else the caller publishes it now with a countdown.
    if hold:
        assert got.run_at is not None and timedelta(seconds=58) < got.run_at - utcnow() <= timedelta(seconds=60)
    else:
        assert got.run_at is None
    assert lc.retry_later(task, ERROR, 1.0) is None  # the old run's token moves it no more


@pytest.mark.parametrize(
    ("attempt", "status"), [(1, TaskStatus.RETRYING), (2, TaskStatus.RETRYING), (3, TaskStatus.DEAD)]
)
def test_a_lost_worker_retries_while_attempts_are_left_else_the_task_is_dead(
    lc: Lifecycle, attempt: int, status: TaskStatus
) -> None:
    task = record(lc, TaskStatus.RUNNING, attempt=attempt)  # max_retries 2: attempts 1..3
    changed, token = lc.lost(task, ERROR, 1.0)
    got = stored(lc, task)
    assert changed and got.status is status and got.error == ERROR
    assert (token is not None) is (status is TaskStatus.RETRYING) and got.dispatch_token == (
        token or task.dispatch_token
    )


@pytest.mark.parametrize("status", [s for s in ALL if s not in TERMINAL])
def test_cancel_from_every_status_not_finished(lc: Lifecycle, status: TaskStatus) -> None:
    lease = utcnow() + timedelta(seconds=30)
    task = record(lc, status, lease_until=lease)
    assert lc.cancel(task)
    got = stored(lc, task)
    assert got.status is TaskStatus.CANCELLED and got.finished_at is not None
    # A running task keeps its lease until its run ends (release): a manual retry waits for it.
    assert got.lease_until == (lease if status is TaskStatus.RUNNING else None)
    assert not lc.cancel(task)  # it moved on: the conditional update on the old status fails


def test_cancel_loses_to_a_record_that_moved_on(lc: Lifecycle) -> None:
    task = record(lc, TaskStatus.QUEUED)
    assert lc.claim(task.replace(attempt=1), task.dispatch_token or "", "w1", 30.0, None)
    assert not lc.cancel(task)  # read as QUEUED, now RUNNING: the caller reads again
    assert stored(lc, task).status is TaskStatus.RUNNING


@pytest.mark.parametrize("status", [TaskStatus.FAILED, TaskStatus.DEAD, TaskStatus.CANCELLED])
def test_reopen_starts_a_new_run(lc: Lifecycle, status: TaskStatus) -> None:
    task = record(lc, status, attempt=3, error=ERROR, result={"r": 1}, worker_id="w1", finished_at=utcnow())
    fresh = lc.reopen(task)
    got = stored(lc, task)
    assert fresh is not None and got.status is TaskStatus.PENDING
    assert (got.attempt, got.run, got.error, got.result, got.worker_id, got.finished_at) == (
        0,
        2,
        None,
        None,
        None,
        None,
    )
    assert got.dispatch_token == fresh.dispatch_token != task.dispatch_token
    assert lc.reopen(task) is None  # once


def test_reopen_of_a_task_whose_cancelled_run_still_goes_waits_for_it(lc: Lifecycle) -> None:
    lease = utcnow() + timedelta(seconds=30)
    task = record(lc, TaskStatus.CANCELLED, lease_until=lease)
    fresh = lc.reopen(task)
    assert fresh is not None and fresh.dispatch_token == task.dispatch_token  # not publishable yet
    assert stored(lc, task).lease_until == lease
    # The old run ends: it gives up its lease and hands the new run a token to be published with.
    token = lc.release(task)
    got = stored(lc, task)
    assert token is not None and got.dispatch_token == token and got.lease_until is None
    assert got.status is TaskStatus.PENDING


def test_release_of_a_cancelled_run_gives_up_the_lease_only(lc: Lifecycle) -> None:
    task = record(lc, TaskStatus.CANCELLED, lease_until=utcnow() + timedelta(seconds=30))
    assert lc.release(task) is None
    got = stored(lc, task)
    assert (got.status, got.lease_until, got.dispatch_token) == (TaskStatus.CANCELLED, None, task.dispatch_token)


def test_due_takes_scheduled_and_retrying_records_under_one_token(lc: Lifecycle) -> None:
    due_at = utcnow() - timedelta(seconds=1)
    tasks = {s: record(lc, s, run_at=due_at) for s in ALL}
    later = record(lc, TaskStatus.SCHEDULED, run_at=utcnow() + timedelta(hours=1))
    token, taken = lc.due(utcnow(), 100)
    moved = [t for t, _ in taken]
    assert {t.task_id for t in moved} == {tasks[TaskStatus.SCHEDULED].task_id, tasks[TaskStatus.RETRYING].task_id}
    assert {t.task_id: s for t, s in taken} == {
        tasks[s].task_id: s for s in (TaskStatus.SCHEDULED, TaskStatus.RETRYING)
    }
    assert all(t.status is TaskStatus.PENDING and t.dispatch_token == token for t in moved)
    assert stored(lc, later).status is TaskStatus.SCHEDULED  # not due yet
    for status, task in tasks.items():
        got = stored(lc, task)
        if status in (TaskStatus.SCHEDULED, TaskStatus.RETRYING):
            assert (got.status, got.dispatch_token) == (TaskStatus.PENDING, token) and got.queued_at is not None
        else:
            assert (got.status, got.dispatch_token) == (status, task.dispatch_token)
    # The publish failed: they wait again where they were.
    lc.undue(taken)
    assert stored(lc, tasks[TaskStatus.SCHEDULED]).status is TaskStatus.SCHEDULED
    assert stored(lc, tasks[TaskStatus.RETRYING]).status is TaskStatus.RETRYING


class Announced(TaskObserver):
    def __init__(self) -> None:
        self.queued: list[str] = []

    def task_queued(self, task: Task) -> None:
        self.queued.append(task.task_id)


@pytest.fixture
def folded(tmp_path: Path) -> Iterator[Lifecycle]:
    """A Redis broker's: records published now are written QUEUED before the publish (storage of
    its own: the due scan sees no other test's records)."""
    storage = open_storage(StorageConfig(type="sqlite", config={"path": str(tmp_path / "tasks.db")}), tmp_path)
    storage.migrate()
    yield Lifecycle(storage, observer=Announced(), queued_before_publish=True)
    storage.close()


def test_due_takes_records_queued_at_once_and_puts_back_only_its_own(folded: Lifecycle) -> None:
    due_at = utcnow() - timedelta(seconds=1)
    waiting = [record(folded, s, run_at=due_at) for s in (TaskStatus.SCHEDULED, TaskStatus.RETRYING)]
    at = utcnow()
    token, taken = folded.due(utcnow(), 100, now=at)
    assert sorted((t.status, t.dispatch_token, t.queued_at) for t, _ in taken) == [(TaskStatus.QUEUED, token, at)] * 2
    assert all(stored(folded, t).status is TaskStatus.QUEUED for t in waiting)
    # No mark follows: only the announcement, once each.
    out = folded.mark_queued([t for t, _ in taken], utcnow())
    assert [t.queued_at for t in out] == [at, at] and all(stored(folded, t).queued_at == at for t in waiting)
    observer = folded.observer
    assert isinstance(observer, Announced) and sorted(observer.queued) == sorted(t.task_id for t in waiting)
    # The publish failed; meanwhile the first one's message went out after all and was claimed.
    first, _ = taken[0]
    assert folded.claim(first.replace(attempt=1), token, "w1", 30.0, at) is not None
    folded.undue(taken)
    assert stored(folded, first).status is TaskStatus.RUNNING
    (second, was), *_ = [(t, s) for t, s in taken if t.task_id != first.task_id]
    assert (stored(folded, second).status, stored(folded, second).queued_at) == (was, None)


def test_a_failed_publish_puts_records_written_queued_back_to_pending(folded: Lifecycle) -> None:
    at = utcnow()
    one = record(folded, TaskStatus.QUEUED, queued_at=at)
    folded.publish_failed([one])
    assert (stored(folded, one).status, stored(folded, one).queued_at) == (TaskStatus.PENDING, None)
    batch = [record(folded, TaskStatus.QUEUED, queued_at=at) for _ in range(3)]
    moved_on = batch[1]
    assert folded.fresh_token(moved_on) is not None  # republished under a new token meanwhile
    claimed = batch[2]
    assert folded.claim(claimed.replace(attempt=1), claimed.dispatch_token or "", "w1", 30.0, at) is not None
    pending = record(folded, TaskStatus.PENDING)  # written PENDING: the outbox finds it as it is
    folded.publish_failed([*batch, pending])
    assert [stored(folded, t).status for t in [*batch, pending]] == [
        TaskStatus.PENDING,
        TaskStatus.QUEUED,  # not the token the failed publish carried: its own message is out
        TaskStatus.RUNNING,
        TaskStatus.PENDING,
    ]


def test_mark_queued_moves_pending_records_only(lc: Lifecycle) -> None:
    pending = [record(lc, TaskStatus.PENDING) for _ in range(2)]
    running = record(lc, TaskStatus.RUNNING)
    at = utcnow()
    out = lc.mark_queued([*pending, running], at)  # a batch: written at once
    assert [t.status for t in out] == [TaskStatus.QUEUED, TaskStatus.QUEUED, TaskStatus.RUNNING]
    assert [stored(lc, t).status for t in pending] == [TaskStatus.QUEUED] * 2
    assert stored(lc, pending[0]).queued_at == at and stored(lc, running).status is TaskStatus.RUNNING
    one = record(lc, TaskStatus.PENDING)
    lc.mark_queued([one], at)  # one: written by a thread, flushed before reading
    lc.marks.flush()
    assert stored(lc, one).status is TaskStatus.QUEUED


def test_fresh_token_makes_the_old_message_stale(lc: Lifecycle) -> None:
    task = record(lc, TaskStatus.PENDING)
    token = lc.fresh_token(task)
    assert (
        token is not None and stored(lc, task).dispatch_token == token and stored(lc, task).status is TaskStatus.PENDING
    )
    assert lc.claim(task.replace(attempt=1), task.dispatch_token or "", "w1", 30.0, None) is None
    assert lc.claim(task.replace(attempt=1), token, "w1", 30.0, None) is not None


def test_waiting_chain_steps_fail_with_their_parent(lc: Lifecycle) -> None:
    parent = record(lc, TaskStatus.FAILED)
    waiting, started = record(lc, TaskStatus.SCHEDULED), record(lc, TaskStatus.RUNNING)
    lc.fail_waiting([waiting.task_id, started.task_id], parent, "failed")
    got = stored(lc, waiting)
    assert got.status is TaskStatus.FAILED and got.error is not None and got.error.reason == "parent_failed"
    assert stored(lc, started).status is TaskStatus.RUNNING


# What any method does to a record of any status: a move it makes is an arrow of TRANSITIONS.
METHODS: dict[str, Callable[[Lifecycle, Task], object]] = {
    "claim": lambda lc, t: lc.claim(t.replace(attempt=1), t.dispatch_token or "", "w1", 30.0, None),
    **{name: apply for name, (apply, _) in RUN_OUTCOMES.items()},
    "lost": lambda lc, t: lc.lost(t, ERROR, 1.0),
    "release": lambda lc, t: lc.release(t),
    "fresh_token": lambda lc, t: lc.fresh_token(t),
    "due": lambda lc, t: lc.due(utcnow() + timedelta(days=1), 10),
    "due queued": lambda lc, t: folded_twin(lc).due(utcnow() + timedelta(days=1), 10),
    "undue": lambda lc, t: lc.undue([(t, TaskStatus.SCHEDULED)]),
    "publish_failed": lambda lc, t: lc.publish_failed([t]),
    "mark_queued": lambda lc, t: lc.mark_queued([t, t], utcnow()),
    "cancel": lambda lc, t: lc.cancel(t),
    "reopen": lambda lc, t: lc.reopen(t),
}


def folded_twin(lc: Lifecycle) -> Lifecycle:
    return Lifecycle(lc.storage, queued_before_publish=True)


@pytest.mark.parametrize(
    ("method", "status"),
    [(m, s) for m in METHODS for s in ALL],
)
def test_every_move_is_an_arrow_of_the_state_machine(lc: Lifecycle, method: str, status: TaskStatus) -> None:
    task = record(lc, status)
    METHODS[method](lc, task)
    after = stored(lc, task).status
    assert after is status or can_transition(status, after), f"{method}: {status} -> {after}"
