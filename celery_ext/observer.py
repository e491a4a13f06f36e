"""``TaskObserver``: the hook the state machine calls at each transition (no-op by default).

``TaskManager`` (producer side) and ``TaskRunner`` (worker side) call these after a transition
has been recorded.  ``celery_ext.events.bridge.EventBridge`` turns them into events and metrics.
An observer must never raise: a failing observer would fail the task it observes.
"""

from __future__ import annotations

from celery_ext.model import Task, TaskErrorInfo


class TaskObserver:
    """Every method is a no-op; subclasses override what they need."""

    def task_created(self, task: Task) -> None:
        """A record was written (status pending, queued on a Redis broker, or scheduled)."""

    def task_queued(self, task: Task) -> None:
        """Its message was published."""

    def task_scheduled(self, task: Task) -> None:
        """It waits in storage until its ``run_at`` (a delay longer than scheduler.max_countdown)."""

    def task_cancelled(self, task: Task) -> None:
        """It was cancelled before finishing."""

    def task_started(self, task: Task) -> None:
        """A worker claimed it and is about to execute it."""

    def task_progress(self, task: Task) -> None:
        """Its running attempt reported a custom state (Celery's update_state): ``task.progress``."""

    def task_retrying(self, task: Task, error: TaskErrorInfo | None, delay: float) -> None:
        """An attempt failed and another one is due in ``delay`` seconds."""

    def task_completed(self, task: Task, duration: float | None) -> None:
        """It succeeded."""

    def task_failed(self, task: Task, error: TaskErrorInfo | None, duration: float | None) -> None:
        """It failed for good (failed or dead)."""


NULL_OBSERVER = TaskObserver()
