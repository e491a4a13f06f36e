from __future__ import annotations

import json

import pytest

from celery_ext.model import (
    STARTABLE,
    TERMINAL,
    TRANSITIONS,
    Task,
    TaskErrorInfo,
    TaskResult,
    TaskStatus,
    can_transition,
    new_id,
    sources_of,
)


def test_statuses_are_lowercase_strings_in_json() -> None:
    task = Task(new_id(), "echo", {"a": 1}, status=TaskStatus.RUNNING, error=TaskErrorInfo("timeout", "slow"))
    data = json.loads(json.dumps(task.to_dict()))
    assert data["status"] == "running"
    assert data["error"] == {"reason": "timeout", "message": "slow"}
    assert "dispatch_token" not in data
    assert data["created_at"].endswith("+00:00")
    assert {s.value for s in TaskStatus} == {
        "pending",
        "scheduled",
        "queued",
        "running",
        "retrying",
        "succeeded",
        "failed",
        "cancelled",
        "dead",
    }


def test_terminal_states_never_move_forward_except_manual_retry() -> None:
    assert TRANSITIONS[TaskStatus.SUCCEEDED] == frozenset()
    for status in (TaskStatus.FAILED, TaskStatus.DEAD, TaskStatus.CANCELLED):
        assert TRANSITIONS[status] == {TaskStatus.PENDING}
    assert all(s.terminal for s in TERMINAL)
    assert not TaskStatus.RUNNING.terminal


@pytest.mark.parametrize(
    "src,dst,ok",
    [
        (TaskStatus.PENDING, TaskStatus.QUEUED, True),
        (TaskStatus.QUEUED, TaskStatus.RUNNING, True),
        (TaskStatus.RUNNING, TaskStatus.SUCCEEDED, True),
        (TaskStatus.RUNNING, TaskStatus.RETRYING, True),
        (TaskStatus.RETRYING, TaskStatus.QUEUED, True),
        (TaskStatus.SCHEDULED, TaskStatus.QUEUED, True),
        (TaskStatus.SUCCEEDED, TaskStatus.RUNNING, False),
        (TaskStatus.FAILED, TaskStatus.RUNNING, False),
        (TaskStatus.QUEUED, TaskStatus.PENDING, True),  # written queued, and its publish failed
        (TaskStatus.QUEUED, TaskStatus.SUCCEEDED, False),
        (TaskStatus.RUNNING, TaskStatus.PENDING, False),
    ],
)
def test_transitions(src: TaskStatus, dst: TaskStatus, ok: bool) -> None:
    assert can_transition(src, dst) is ok


def test_startable_and_cancel_sources() -> None:
    assert TaskStatus.RUNNING not in STARTABLE
    assert sources_of(TaskStatus.RUNNING) == STARTABLE
    assert sources_of(TaskStatus.CANCELLED) == {
        TaskStatus.PENDING,
        TaskStatus.SCHEDULED,
        TaskStatus.QUEUED,
        TaskStatus.RUNNING,
        TaskStatus.RETRYING,
    }


def test_task_result_constructors() -> None:
    assert TaskResult.ok({"x": 1}) == TaskResult(True, {"x": 1})
    fail = TaskResult.fail("http_500", "boom", retryable=True)
    assert not fail.success and fail.retryable and fail.error == TaskErrorInfo("http_500", "boom")


P, S, Q, R, RT = TaskStatus.PENDING, TaskStatus.SCHEDULED, TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.RETRYING
OK, F, C, D = TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.DEAD
# The state machine, arrow by arrow, as ARCHITECTURE.md and docs/reliability.md draw it.
ARROWS = {
    (P, Q),  # published
    (P, R),  # started before the producer marked it queued
    (P, S),  # due, taken to be published, and the publish failed: back to wait
    (P, RT),
    (S, P),  # due: taken by the scheduler to be published
    (S, Q),
    (S, R),
    (S, F),  # a chain step whose previous step failed
    (Q, R),
    (Q, P),  # written queued before its publish (a Redis broker), and the publish failed: the outbox
    (Q, S),  # due, taken queued (a Redis broker), and the publish failed: back to wait
    (Q, RT),
    (R, OK),
    (R, RT),  # a retryable failure with attempts left
    (R, F),
    (R, D),  # worker lost on the last attempt
    (R, Q),  # released after its worker was lost, to be redelivered
    (RT, P),
    (RT, Q),
    (RT, R),
    (F, P),  # a manual retry
    (D, P),
    (C, P),
    *((s, C) for s in (P, S, Q, R, RT)),  # cancel: anything not finished
}


@pytest.mark.parametrize("src", list(TaskStatus))
@pytest.mark.parametrize("dst", list(TaskStatus))
def test_every_arrow_is_allowed_and_nothing_else(src: TaskStatus, dst: TaskStatus) -> None:
    assert can_transition(src, dst) is ((src, dst) in ARROWS)
    assert (src in sources_of(dst)) is ((src, dst) in ARROWS)


def test_a_finished_task_never_runs_again_in_the_same_run() -> None:
    assert TERMINAL == {OK, F, C, D}
    for status in TERMINAL:
        assert not can_transition(status, R) and not can_transition(status, Q)
    assert STARTABLE == {s for s in TaskStatus if can_transition(s, R)}


def test_a_reported_custom_state_belongs_to_the_running_attempt_only() -> None:
    """``progress`` (Celery's update_state) is Celery's state only while the attempt that reported
    it runs: not for the next attempt of a retry, a manual retry's new run, or a finished task."""
    report = {"state": "PROGRESS", "meta": {"done": 1}, "attempt": 2, "run": 1, "at": "2026-12-04T00:00:00+00:00"}
    running = Task(task_id="t", task_type="echo", payload={}, status=TaskStatus.RUNNING, attempt=2, progress=report)
    assert running.reported == report
    assert running.replace(attempt=3).reported is None  # the next attempt has not reported yet
    assert running.replace(run=2).reported is None
    assert running.replace(status=TaskStatus.SUCCEEDED).reported is None
    assert running.replace(progress=None).reported is None
    assert running.to_dict()["progress"] == report
