"""``EventBridge``: turns state-machine transitions into events and metrics.

The composition root (``factory.create_app``) builds it over the process's event bus and metrics
collector and gives it to the lifecycle (every task transition), the worker registry (a worker
found offline), the scheduler and the config watcher; it is ``Runtime.observer``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from celery_ext.events.base import EventBus
from celery_ext.events.model import (
    CONFIG_RELOADED,
    SCHEDULE_FIRED,
    SCHEDULER_LEADER_CHANGED,
    TASK_CANCELLED,
    TASK_COMPLETED,
    TASK_CREATED,
    TASK_FAILED,
    TASK_PROGRESS,
    TASK_QUEUED,
    TASK_RETRYING,
    TASK_SCHEDULED,
    TASK_STARTED,
    WORKER_OFFLINE,
    Event,
)
from celery_ext.metrics import MetricsCollector
from celery_ext.model import Task, TaskErrorInfo
from celery_ext.observer import TaskObserver

if TYPE_CHECKING:
    pass

logger = logging.getLogger("celery_ext.events")

F = TypeVar("F", bound=Callable[..., None])
MAX_MESSAGE = 500


def _safe(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:  # noqa: BLE001 - observing a task must never fail it
            logger.exception("event/metrics hook %s failed", fn.__name__)

    return wrapper  # type: ignore[return-value]


class EventBridge(TaskObserver):
    def __init__(self, bus: EventBus, metrics: MetricsCollector) -> None:
        self.bus = bus
        self.metrics = metrics

    def _emit(self, kind: str, task: Task, **data: Any) -> None:
        if not self.bus.delivers(kind):
            return
        self.bus.publish(
            Event(kind, task.task_id, task.worker_id, {"task_type": task.task_type, "attempt": task.attempt, **data})
        )

    @_safe
    def task_created(self, task: Task) -> None:
        self.metrics.task_created(task.task_type)
        self._emit(TASK_CREATED, task, status=task.status.value, priority=task.priority)

    @_safe
    def task_queued(self, task: Task) -> None:
        self._emit(TASK_QUEUED, task)

    @_safe
    def task_scheduled(self, task: Task) -> None:
        self._emit(TASK_SCHEDULED, task, run_at=task.run_at.isoformat() if task.run_at else None)

    @_safe
    def task_cancelled(self, task: Task) -> None:
        self._emit(TASK_CANCELLED, task)

    @_safe
    def task_started(self, task: Task) -> None:
        self._emit(TASK_STARTED, task)

    @_safe
    def task_progress(self, task: Task) -> None:
        progress = task.progress or {}
        self._emit(TASK_PROGRESS, task, state=progress.get("state"), meta=progress.get("meta"))

    @_safe
    def task_retrying(self, task: Task, error: TaskErrorInfo | None, delay: float) -> None:
        self._emit(TASK_RETRYING, task, delay=round(delay, 3), **_error(error))

    @_safe
    def task_completed(self, task: Task, duration: float | None) -> None:
        self.metrics.task_completed(task.task_type, "succeeded", duration)
        self._emit(TASK_COMPLETED, task, duration=duration)

    @_safe
    def task_failed(self, task: Task, error: TaskErrorInfo | None, duration: float | None) -> None:
        reason = error.reason if error else "unknown"
        self.metrics.task_completed(task.task_type, "failed", duration)
        self.metrics.task_failed(task.task_type, reason)
        self._emit(TASK_FAILED, task, duration=duration, **_error(error))

    @_safe
    def worker_offline(self, worker_id: str, reason: str) -> None:
        self.metrics.worker_offline(worker_id)
        self.bus.publish(Event(WORKER_OFFLINE, worker_id=worker_id, data={"reason": reason}))

    @_safe
    def leader_changed(self, node: str, is_leader: bool, **data: Any) -> None:
        """For the scheduler: this node gained or lost leadership."""
        self.metrics.scheduler_election(is_leader)
        self.bus.publish(Event(SCHEDULER_LEADER_CHANGED, worker_id=node, data={"is_leader": is_leader, **data}))

    @_safe
    def schedule_fired(self, fired: Any) -> None:
        """For the scheduler: a periodic schedule fired (``celery_ext.schedules.FiredSchedule``)."""
        self.metrics.schedule_fired(fired.schedule, "failed" if fired.error else "fired")
        self.bus.publish(Event(SCHEDULE_FIRED, task_id=fired.task_id, data=fired.to_dict()))

    @_safe
    def due_published(self, lags: list[float]) -> None:
        """For the scheduler: due records published, each this many seconds after its run_at."""
        for lag in lags:
            self.metrics.due_lag(lag)

    @_safe
    def config_reloaded(self, node: str, **data: Any) -> None:
        """For the config watcher: a new valid config was swapped in."""
        self.bus.publish(Event(CONFIG_RELOADED, worker_id=node, data=data))


def _error(error: TaskErrorInfo | None) -> dict[str, Any]:
    if error is None:
        return {"reason": "unknown", "message": ""}
    return {"reason": error.reason, "message": error.message[:MAX_MESSAGE]}
