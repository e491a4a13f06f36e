"""The completion message: what a run's outcome pushes, and when a waiter may use it."""

from __future__ import annotations

import json
from datetime import timedelta

from celery_ext.completion import MAX_PUSH, WAKE, merged, pushed
from celery_ext.model import Task, TaskErrorInfo, TaskStatus, utcnow


def queued() -> Task:
    return Task("t1", "echo", {"a": 1}, status=TaskStatus.QUEUED, attempt=0, queued_at=utcnow(), dispatch_token="k0")


def finished(base: Task, **changes: object) -> Task:
    now = utcnow()
    fields: dict[str, object] = {
        "status": TaskStatus.SUCCEEDED,
        "attempt": base.attempt + 1,
        "worker_id": "w1@h",
        "started_at": now - timedelta(milliseconds=3),
        "finished_at": now,
        "updated_at": now,
        "dispatch_token": "k1",
        "result": {"a": 1, "f": 2.5, "l": [None, "é"]},
    }
    return base.replace(**{**fields, **changes})


def test_an_outcome_laid_over_the_queued_record_is_the_finished_record() -> None:
    base = queued()
    done = finished(base)
    assert merged(base, pushed(done)) == done
    failed = finished(base, status=TaskStatus.FAILED, result=None, error=TaskErrorInfo("rejected", "no"))
    assert merged(base, pushed(failed)) == failed
    running = base.replace(status=TaskStatus.RUNNING, attempt=1, worker_id="w1@h")
    assert merged(running, pushed(done)) == done  # read while the same attempt ran
    with_args = finished(base, args=[41])
    assert merged(base, pushed(with_args)) == with_args


def test_a_waiter_reads_the_record_unless_the_outcome_is_of_the_run_it_read() -> None:
    base = queued()
    done = finished(base)
    assert merged(base, WAKE) is None
    assert merged(base, None) is None
    assert merged(base, b"{not json") is None
    assert merged(base.replace(run=2), pushed(done)) is None  # a manual retry's new run
    assert merged(base.replace(status=TaskStatus.RETRYING, attempt=1), pushed(finished(base, attempt=3))) is None
    not_terminal = json.loads(pushed(done))
    not_terminal["status"] = "retrying"
    assert merged(base, json.dumps(not_terminal).encode()) is None


def test_an_outcome_too_large_or_not_json_is_a_bare_wake_up() -> None:
    base = queued()
    assert pushed(finished(base, result="x" * MAX_PUSH)) == WAKE
    assert pushed(finished(base, result=float("nan"))) == WAKE
    assert len(pushed(finished(base, result="x" * 1000))) < MAX_PUSH
