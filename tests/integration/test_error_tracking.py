"""A task's failure reaches an error tracker as with bare Celery: Sentry's own Celery integration,
in a real worker, reports the final failure of a task (with the task's own frames), and nothing for
a retry or a success.  Sentry skips exceptions a task lists in ``Task.throws``; celery_ext's
``TaskFailed`` was listed there, so no failure was ever reported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from celery_ext.model import TaskStatus
from tests.conftest import TEST_TASKS
from tests.support.scrape import poll
from tests.support.services import unique

MODULES = [*TEST_TASKS[0]["config"]["modules"], "tests.support.sentry_init"]


def events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def exceptions(event: dict[str, Any]) -> list[str]:
    return [f"{v['type']}: {v['value']}" for v in event["exception"]["values"]]


def test_sentry_reports_each_final_failure_once_with_the_tasks_own_frames(make_cluster, tmp_path: Path) -> None:
    c = make_cluster(executors=[{"type": "python", "config": {"modules": MODULES}}])
    sink = tmp_path / "sentry-events.jsonl"
    c.worker(env={"SENTRY_EVENTS": str(sink)})
    m = c.manager

    assert m.wait(m.submit("sentry_probe", {"ok": 1}).task_id, 30).status is TaskStatus.SUCCEEDED
    flaky = m.submit("flaky", {"key": unique("flaky:"), "fail_times": 10}, max_retries=1)
    assert m.wait(flaky.task_id, 30).status is TaskStatus.FAILED  # one retry, then the failure
    reject = m.submit("reject", {"reason": "bad input"})
    assert m.wait(reject.task_id, 30).status is TaskStatus.FAILED

    poll(lambda: len(events(sink)) >= 2, 20, "two events from Sentry's Celery integration")
    seen = events(sink)
    assert len(seen) == 2, [exceptions(e) for e in seen]  # no event for the retry or the success
    failed = next(e for e in seen if "planned failure 2" in json.dumps(e))
    rejected = next(e for e in seen if "bad input" in json.dumps(e))
    # The chain as Sentry shows it: the task's RuntimeError, then the TaskFailed raised from it.
    # (Sentry shows an exception's ``message`` attribute: TaskFailed's is the part after the reason.)
    assert exceptions(failed) == ["RuntimeError: planned failure 2", "TaskFailed: RuntimeError: planned failure 2"]
    frames = failed["exception"]["values"][0]["stacktrace"]["frames"]
    assert any(f["filename"].endswith("tests/support/tasks.py") and f["function"] == "flaky" for f in frames)
    # A PermanentError raised by the task's own code, then TaskFailed.
    assert exceptions(rejected) == ["PermanentError: bad input", "TaskFailed: bad input"]
