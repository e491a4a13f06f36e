"""``TaskRunner``'s decisions: what a delivered message does to its record, given the record's
status and token, the attempt and ``max_retries``, and what the executor did.  Storage is SQLite
in a temp dir; the executor is a real one whose payload says what it does; no worker, no broker."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from celery_ext.config import WorkerConfig
from celery_ext.dispatch import Dispatcher
from celery_ext.errors import PermanentError, TransientError
from celery_ext.executors.base import Executor
from celery_ext.executors.pool import ExecutorSet
from celery_ext.lifecycle import Lifecycle
from celery_ext.message import ExtHeader
from celery_ext.model import Task, TaskErrorInfo, TaskResult, TaskStatus, new_id
from celery_ext.runner import Delivery, TaskRunner, dropped, verdict
from celery_ext.storage import Storage

MAX_RETRIES = 2  # attempts 1..3
MAX_COUNTDOWN = 1.5  # backoff 1s, 2s, 4s...: the second retry waits in storage


class ScriptedExecutor(Executor):
    """Runs the type ``scripted``: the payload's ``do`` names what the run does."""

    type = "scripted"

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[str] = []
        self.during: Callable[[Task], None] | None = None  # called while the task runs

    @property
    def supported_task_types(self) -> list[str]:
        return ["scripted"]

    def execute(self, task: Task) -> TaskResult:
        self.runs.append(task.task_id)
        if self.during is not None:
            self.during(task)
        do = task.payload["do"]
        if do == "ok":
            return TaskResult.ok({"n": 1})
        if do == "retryable":
            return TaskResult.fail("busy", "try later", retryable=True)
        if do == "permanent":
            raise PermanentError("bad_input", "never works")
        if do == "transient":
            raise TransientError("http_503", "unavailable")
        if do == "timeout":
            raise SoftTimeLimitExceeded()  # what Celery raises in the task at its soft time limit
        if do == "crash":
            raise ZeroDivisionError("boom")
        if do == "not_json":
            return TaskResult.ok({1, 2})
        return {"not": "a TaskResult"}  # type: ignore[return-value]


class Setup:
    def __init__(self, storage: Storage, jitter: bool = False) -> None:
        self.storage = storage
        self.executor = ScriptedExecutor()
        self.lifecycle = Lifecycle(storage)
        app = Celery("unit-runner", broker="memory://", set_as_current=False)
        config = WorkerConfig(retry_backoff=1.0, retry_backoff_max=8.0, retry_jitter=jitter)
        self.runner = TaskRunner(
            self.lifecycle,
            ExecutorSet([self.executor]),
            Dispatcher(app, hard_timeout_grace=1.0, redis_priorities=False),
            config,
            default_max_retries=MAX_RETRIES,
            default_timeout=None,
            max_countdown=MAX_COUNTDOWN,
        )

    def record(self, do: str, status: TaskStatus = TaskStatus.QUEUED, task_type: str = "scripted") -> Task:
        task = Task(new_id(), task_type, {"do": do}, status=status, max_retries=MAX_RETRIES, dispatch_token=new_id())
        self.storage.tasks.create(task)
        return task

    def delivery(self, task: Task, attempt: int = 1, token: str | None = None) -> Delivery:
        header = ExtHeader(token or task.dispatch_token or "", attempt, max_retries=task.max_retries)
        return Delivery(task.task_id, task.task_type, [], dict(task.payload), header)

    def stored(self, task: Task) -> Task:
        record = self.storage.tasks.get(task.task_id)
        assert record is not None
        return record


@pytest.fixture
def s(sqlite_storage: Storage) -> Iterator[Setup]:
    setup = Setup(sqlite_storage)
    yield setup
    assert setup.lifecycle.spool.flush(5)  # the runs' log lines, before storage closes


# --- the pure decisions ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("result", "attempt", "max_retries", "expected"),
    [
        (TaskResult.ok(1), 1, 0, "succeed"),
        (TaskResult.ok(1), 9, 2, "succeed"),  # a success is recorded whatever the attempt
        (TaskResult.fail("x", "y", retryable=True), 1, 2, "retry"),
        (TaskResult.fail("x", "y", retryable=True), 3, 3, "retry"),  # the last retry
        (TaskResult.fail("x", "y", retryable=True), 3, 2, "fail"),  # attempts used up
        (TaskResult.fail("x", "y", retryable=True), 1, 0, "fail"),  # no retries at all
        (TaskResult.fail("x", "y"), 1, 5, "fail"),  # permanent: attempts left do not matter
    ],
)
def test_verdict(result: TaskResult, attempt: int, max_retries: int, expected: str) -> None:
    task = Task("t", "scripted", {}, attempt=attempt, max_retries=max_retries)
    assert verdict(task, result) == expected


def test_what_a_message_that_started_no_run_becomes() -> None:
    assert (dropped("t", None).kind, dropped("t", None).why) == ("dropped", "no such record")
    cancelled = Task("t", "x", {}, status=TaskStatus.CANCELLED)
    assert (dropped("t", cancelled).kind, dropped("t", cancelled).task) == ("revoked", cancelled)
    for status in (TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.DEAD):
        outcome = dropped("t", Task("t", "x", {}, status=status))
        assert (outcome.kind, outcome.why) == ("dropped", f"task is {status}")


# --- a run, record by record ---------------------------------------------------------------


def test_success_records_the_result_and_gives_up_the_lease(s: Setup) -> None:
    task = s.record("ok")
    outcome = s.runner.run(s.delivery(task), "w1")
    assert (outcome.kind, outcome.data) == ("succeeded", {"n": 1})
    record = s.stored(task)
    assert (record.status, record.result, record.error, record.worker_id) == (
        TaskStatus.SUCCEEDED,
        {"n": 1},
        None,
        "w1",
    )
    assert record.attempt == 1 and record.lease_until is None and record.finished_at is not None
    assert record.dispatch_token == task.dispatch_token


@pytest.mark.parametrize(("attempt", "delay", "held"), [(1, 1.0, False), (2, 2.0, True)])
def test_a_retryable_failure_with_attempts_left_retries_under_a_new_token(
    s: Setup, attempt: int, delay: float, held: bool
) -> None:
    task = s.record("retryable")
    outcome = s.runner.run(s.delivery(task, attempt), "w1")
    assert outcome.kind == "retry" and outcome.error == TaskErrorInfo("busy", "try later")
    assert (outcome.delay, outcome.held) == (delay, held)  # held: later than max_countdown, the scheduler publishes it
    record = s.stored(task)
    assert record.status is TaskStatus.RETRYING and record.error == outcome.error
    assert outcome.token not in (None, task.dispatch_token) and record.dispatch_token == outcome.token
    assert (record.run_at is not None) is held and record.lease_until is None


def test_the_last_attempt_fails(s: Setup) -> None:
    task = s.record("retryable")
    outcome = s.runner.run(s.delivery(task, attempt=MAX_RETRIES + 1), "w1")
    assert outcome.kind == "failed" and outcome.error == TaskErrorInfo("busy", "try later")
    record = s.stored(task)
    assert (record.status, record.attempt, record.dispatch_token) == (
        TaskStatus.FAILED,
        MAX_RETRIES + 1,
        task.dispatch_token,
    )


@pytest.mark.parametrize(
    ("do", "reason", "message"),
    [("transient", "http_503", "unavailable"), ("crash", "exception", "ZeroDivisionError: boom")],
)
def test_transient_errors_and_executor_bugs_are_retried(s: Setup, do: str, reason: str, message: str) -> None:
    task = s.record(do)
    outcome = s.runner.run(s.delivery(task), "w1")
    assert outcome.kind == "retry" and outcome.error == TaskErrorInfo(reason, message)
    assert s.stored(task).status is TaskStatus.RETRYING


@pytest.mark.parametrize(
    ("do", "reason", "text"),
    [
        ("permanent", "bad_input", "never works"),
        ("timeout", "timeout", "time limit of 0s exceeded"),
        ("not_json", "invalid_result", "result is not JSON-serializable"),
        ("not_a_result", "invalid_result", "executor returned dict, not TaskResult"),
    ],
)
def test_permanent_failures_fail_at_once_with_attempts_left(s: Setup, do: str, reason: str, text: str) -> None:
    task = s.record(do)
    outcome = s.runner.run(s.delivery(task, attempt=1), "w1")
    assert outcome.kind == "failed" and outcome.error is not None
    assert outcome.error.reason == reason and text in outcome.error.message
    record = s.stored(task)
    assert record.status is TaskStatus.FAILED and record.error == outcome.error and record.lease_until is None


def test_a_type_this_worker_has_no_executor_for_fails(s: Setup) -> None:
    task = s.record("ok", task_type="not_here")
    outcome = s.runner.run(s.delivery(task), "w1")
    assert outcome.kind == "failed" and outcome.error is not None and outcome.error.reason == "unknown_task_type"
    assert s.stored(task).status is TaskStatus.FAILED and s.executor.runs == []


def test_a_task_cancelled_while_it_runs_keeps_nothing_of_the_run(s: Setup) -> None:
    task = s.record("ok")
    s.executor.during = lambda t: s.lifecycle.cancel(s.stored(t))
    outcome = s.runner.run(s.delivery(task), "w1")
    assert (outcome.kind, outcome.why) == ("revoked", "cancelled while it ran")
    record = s.stored(task)
    assert record.status is TaskStatus.CANCELLED and record.result is None
    assert record.lease_until is None  # the run gave its lease up


# --- messages that start no run ------------------------------------------------------------


def test_a_message_with_a_stale_token_does_not_run(s: Setup) -> None:
    task = s.record("ok")
    outcome = s.runner.run(s.delivery(task, token=new_id()), "w1")
    assert (outcome.kind, outcome.why) == ("dropped", "task is queued")
    assert s.executor.runs == [] and s.stored(task).status is TaskStatus.QUEUED


def test_a_second_copy_of_a_running_message_does_not_run_it_again(s: Setup) -> None:
    task = s.record("ok")
    second: list[Any] = []
    s.executor.during = lambda t: second.append(s.runner.run(s.delivery(task), "w2")) if not second else None
    assert s.runner.run(s.delivery(task), "w1").kind == "succeeded"
    assert (second[0].kind, second[0].why) == ("dropped", "task is running")  # at most one run at a time
    assert s.executor.runs == [task.task_id] and s.stored(task).worker_id == "w1"


@pytest.mark.parametrize(
    ("status", "kind", "why"),
    [
        (TaskStatus.CANCELLED, "revoked", "cancelled"),
        (TaskStatus.SUCCEEDED, "dropped", "task is succeeded"),
        (TaskStatus.FAILED, "dropped", "task is failed"),
        (TaskStatus.DEAD, "dropped", "task is dead"),
    ],
)
def test_a_message_for_a_finished_task_does_not_run(s: Setup, status: TaskStatus, kind: str, why: str) -> None:
    task = s.record("ok", status=status)
    outcome = s.runner.run(s.delivery(task), "w1")
    assert (outcome.kind, outcome.why) == (kind, why)
    assert s.executor.runs == [] and s.stored(task).status is status


@pytest.mark.parametrize("status", [TaskStatus.PENDING, TaskStatus.SCHEDULED, TaskStatus.RETRYING])
def test_every_startable_status_runs(s: Setup, status: TaskStatus) -> None:
    task = s.record("ok", status=status)
    assert s.runner.run(s.delivery(task), "w1").kind == "succeeded"
    assert s.stored(task).status is TaskStatus.SUCCEEDED


def test_a_message_for_no_record_is_dropped(s: Setup) -> None:
    ghost = Task(new_id(), "scripted", {"do": "ok"}, dispatch_token=new_id())
    outcome = s.runner.run(s.delivery(ghost), "w1")
    assert (outcome.kind, outcome.why) == ("dropped", "no such record") and s.executor.runs == []


# --- plain Celery messages -----------------------------------------------------------------


def test_a_plain_message_is_recorded_on_receipt_and_a_redelivery_after_its_end_is_dropped(s: Setup) -> None:
    plain = Delivery(new_id(), "scripted", [], {"do": "ok"}, None, retries=1)
    assert s.runner.run(plain, "w1").kind == "succeeded"
    record = s.stored(Task(plain.task_id, "scripted", {}))
    assert (record.status, record.attempt, record.max_retries) == (TaskStatus.SUCCEEDED, 2, MAX_RETRIES)
    assert record.dispatch_token == s.runner.token_of(plain)
    assert s.runner.run(plain, "w1").why == "task is succeeded" and len(s.executor.runs) == 1


def test_a_plain_message_retries_within_the_default_max_retries(s: Setup) -> None:
    plain = Delivery(new_id(), "scripted", [], {"do": "retryable"}, None)
    assert s.runner.run(plain, "w1").kind == "retry"
    last = Delivery(new_id(), "scripted", [], {"do": "retryable"}, None, retries=MAX_RETRIES)
    assert s.runner.run(last, "w1").kind == "failed"


# --- backoff ---------------------------------------------------------------------------------


def test_backoff_doubles_up_to_its_cap(s: Setup) -> None:
    assert [s.runner.backoff(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_backoff_with_jitter_stays_under_the_exponential(sqlite_storage: Storage) -> None:
    runner = Setup(sqlite_storage, jitter=True).runner
    for attempt, cap in ((1, 1.0), (3, 4.0), (9, 8.0)):
        delays = [runner.backoff(attempt) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays) and len(set(delays)) > 100


# --- a first message ahead of its record (a submit publishes while its insert is on the way) ---


def test_a_first_message_whose_record_commits_just_after_the_failed_claim_is_claimed(
    s: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim finds no record; the submit's insert commits before the worker reads the record
    back: the message is the submit's, claimed then, not dropped as a duplicate."""
    task = Task(
        new_id(), "scripted", {"do": "ok"}, status=TaskStatus.QUEUED, max_retries=MAX_RETRIES, dispatch_token=new_id()
    )
    task = task.replace(queued_at=task.created_at)
    claim, claims = s.lifecycle.claim, []

    def insert_lands_after_the_claim(*args: Any, **kwargs: Any) -> Task | None:
        out = claim(*args, **kwargs)
        if not claims:
            s.storage.tasks.create(task)
        claims.append(out)
        return out

    monkeypatch.setattr(s.lifecycle, "claim", insert_lands_after_the_claim)
    header = ExtHeader(task.dispatch_token or "", 1, max_retries=MAX_RETRIES, queued_at=task.queued_at)
    outcome = s.runner.run(Delivery(task.task_id, "scripted", [], dict(task.payload), header), "w1")
    assert outcome.kind == "succeeded", outcome
    assert claims[0] is None and claims[1] is not None and len(s.executor.runs) == 1
    record = s.stored(task)
    assert (record.status, record.attempt, record.dispatch_token) == (TaskStatus.SUCCEEDED, 1, task.dispatch_token)


def test_a_first_message_whose_record_is_missing_makes_it(s: Setup) -> None:
    task = Task(new_id(), "scripted", {"do": "ok"}, max_retries=MAX_RETRIES, dispatch_token=new_id())
    header = ExtHeader(task.dispatch_token or "", 1, max_retries=MAX_RETRIES, queued_at=task.created_at)
    assert s.runner.run(Delivery(task.task_id, "scripted", [], dict(task.payload), header), "w1").kind == "succeeded"
    record = s.stored(task)
    assert (record.status, record.attempt, record.dispatch_token) == (TaskStatus.SUCCEEDED, 1, task.dispatch_token)


def test_a_duplicate_first_message_is_still_dropped(s: Setup) -> None:
    task = s.record("ok")
    header = ExtHeader(task.dispatch_token or "", 1, max_retries=MAX_RETRIES, queued_at=task.created_at)
    d = Delivery(task.task_id, "scripted", [], dict(task.payload), header)
    assert s.runner.run(d, "w1").kind == "succeeded"
    assert s.runner.run(d, "w1").kind == "dropped" and len(s.executor.runs) == 1
