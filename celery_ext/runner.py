"""Running one delivered message: claim the record, execute, record the outcome, retry or finish.

This is the worker-side half of the state machine.  It is independent of Celery's Task class
(``executors/task.py`` adapts it) and every move is a conditional update on status and dispatch
token, so a duplicated, stale or cancelled message does nothing.
"""

from __future__ import annotations

import json
import logging
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from celery.exceptions import SoftTimeLimitExceeded

from celery_ext.config import WorkerConfig
from celery_ext.dispatch import Dispatch, Dispatcher
from celery_ext.errors import ExecutorError, StorageError
from celery_ext.executors.pool import ExecutorSet
from celery_ext.model import STARTABLE, Task, TaskErrorInfo, TaskResult, TaskStatus, new_id, utcnow
from celery_ext.observer import NULL_OBSERVER, TaskObserver
from celery_ext.storage.base import Storage
from celery_ext.storage.spool import LogSpool
from celery_ext.tasklog import TaskLogBuffer, capture

logger = logging.getLogger("celery_ext.runner")

T = TypeVar("T")
RUNNING = (TaskStatus.RUNNING,)


class MalformedMessageError(ValueError):
    """A message on a celery_ext queue that does not carry what a celery_ext task needs."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """The fields a celery_ext message carries (see ``dispatch.message_kwargs``)."""

    task_id: str
    token: str
    attempt: int
    payload: dict[str, Any]
    max_retries: int
    timeout: float | None

    @classmethod
    def parse(cls, kwargs: dict[str, Any]) -> Delivery:
        problems = []
        for key, kind in (("task_id", str), ("token", str), ("attempt", int), ("payload", dict), ("max_retries", int)):
            if not isinstance(kwargs.get(key), kind) or isinstance(kwargs.get(key), bool):
                problems.append(f"{key}: expected {kind.__name__} (got {type(kwargs.get(key)).__name__})")
        timeout = kwargs.get("timeout")
        if timeout is not None and not isinstance(timeout, int | float):
            problems.append(f"timeout: expected a number (got {type(timeout).__name__})")
        if problems:
            raise MalformedMessageError("; ".join(problems))
        return cls(kwargs["task_id"], kwargs["token"], kwargs["attempt"], kwargs["payload"],
                   kwargs["max_retries"], float(timeout) if timeout is not None else None)


class TaskRunner:
    def __init__(self, storage: Storage, executors: ExecutorSet, dispatcher: Dispatcher, config: WorkerConfig) -> None:
        self.storage = storage
        self.executors = executors
        self.dispatcher = dispatcher
        self.config = config
        # Outcome writes are retried this long when storage is away, before giving up to recovery.
        self.write_patience = 30.0
        self.log_spool = LogSpool(storage.logs.append)
        self.observer: TaskObserver = NULL_OBSERVER  # events and metrics (events.bridge)

    # --- the happy path -------------------------------------------------------------------

    def run(self, task_type: str, d: Delivery, worker_id: str) -> TaskResult | None:
        """Returns the recorded result, or None when the message was stale and dropped."""
        now = utcnow()
        lease = max(self.config.task_lease, (d.timeout or 0) + self.config.hard_timeout_grace)
        claimed = self.storage.tasks.update(
            d.task_id, STARTABLE, token=d.token,
            status=TaskStatus.RUNNING, attempt=d.attempt, worker_id=worker_id,
            started_at=now, finished_at=None, lease_until=now + timedelta(seconds=lease),
        )
        if not claimed:
            self._explain_drop(d)
            return None
        task = Task(task_id=d.task_id, task_type=task_type, payload=d.payload, status=TaskStatus.RUNNING,
                    attempt=d.attempt, max_retries=d.max_retries, timeout=d.timeout, worker_id=worker_id,
                    started_at=now, dispatch_token=d.token)
        self.observer.task_started(task)
        buffer = TaskLogBuffer(d.task_id, d.attempt, self._write_logs,
                               max_lines=self.config.max_log_lines_per_task,
                               max_bytes=self.config.max_log_line_bytes)
        try:
            with capture(buffer):
                result = self._execute(task)
                # Lines first: whoever sees the final status can read every line of the attempt.
                buffer.flush()
                self.finish(task, result)
        finally:
            buffer.flush()
        return result

    def _execute(self, task: Task) -> TaskResult:
        executor = self.executors.get(task.task_type)
        if executor is None:
            return TaskResult.fail("unknown_task_type", f"no executor supports {task.task_type!r} on this worker")
        why = self.executors.ready(executor)
        if why:
            return TaskResult.fail("executor_unavailable", why)
        try:
            result = executor.execute(task)
        except SoftTimeLimitExceeded:
            logger.error("time limit of %ss exceeded", task.timeout)
            return TaskResult.fail("timeout", f"time limit of {task.timeout:g}s exceeded")
        except ExecutorError as exc:
            logger.error("%s: %s", exc.reason, exc)
            return TaskResult.fail(exc.reason, str(exc), retryable=exc.retryable, data=exc.data)
        except Exception as exc:  # noqa: BLE001 - any executor bug becomes a recorded failure
            logger.error("%s: %s\n%s", exc.__class__.__name__, exc, traceback.format_exc())
            return TaskResult.fail("exception", f"{exc.__class__.__name__}: {exc}", retryable=True)
        if not isinstance(result, TaskResult):
            return TaskResult.fail("invalid_result", f"executor returned {type(result).__name__}, not TaskResult")
        try:
            json.dumps(result.data)
        except (TypeError, ValueError) as exc:
            return TaskResult.fail("invalid_result", f"result is not JSON-serializable: {exc}")
        return result

    # --- outcomes -------------------------------------------------------------------------

    def finish(self, task: Task, result: TaskResult) -> None:
        now = utcnow()
        if result.success:
            changed = self._write(lambda: self.storage.tasks.update(
                task.task_id, RUNNING, token=task.dispatch_token,
                status=TaskStatus.SUCCEEDED, result=result.data, error=None, finished_at=now, lease_until=None))
        elif result.retryable and task.attempt <= task.max_retries:
            changed = self.retry_later(task, result.error, data=result.data)
        else:
            changed = self._write(lambda: self.storage.tasks.update(
                task.task_id, RUNNING, token=task.dispatch_token,
                status=TaskStatus.FAILED, result=result.data, error=result.error, finished_at=now, lease_until=None))
        if not changed:
            logger.warning("task %s changed while it ran (cancelled?); outcome not recorded", task.task_id)
        elif result.success or not (result.retryable and task.attempt <= task.max_retries):
            duration = (now - task.started_at).total_seconds() if task.started_at else None
            if result.success:
                self.observer.task_completed(task, duration)
            else:
                self.observer.task_failed(task, result.error, duration)

    def retry_later(self, task: Task, error: TaskErrorInfo | None, *, data: Any = None) -> bool:
        delay = self.backoff(task.attempt)
        token = new_id()
        logger.warning("attempt %d failed (%s); retrying in %.2fs", task.attempt,
                       error.reason if error else "?", delay)
        changed = self._write(lambda: self.storage.tasks.update(
            task.task_id, RUNNING, token=task.dispatch_token,
            status=TaskStatus.RETRYING, dispatch_token=token, error=error, result=data,
            run_at=utcnow() + timedelta(seconds=delay), lease_until=None))
        if changed:
            self.observer.task_retrying(task, error, delay)
            # If this publish fails the record stays RETRYING with its run_at: the scheduler's
            # recovery publishes it.  Nothing is lost.
            try:
                self.dispatcher.publish(Dispatch(task, token, task.attempt + 1, countdown=delay))
            except Exception:  # noqa: BLE001
                logger.exception("could not publish retry of %s; left for recovery", task.task_id)
        return changed

    def backoff(self, attempt: int) -> float:
        delay = min(self.config.retry_backoff_max, self.config.retry_backoff * 2 ** max(0, attempt - 1))
        return random.uniform(0, delay) if self.config.retry_jitter else delay

    def fail_running(self, task_id: str, token: str, reason: str, message: str) -> bool:
        """Record a failure decided outside the task (hard time limit)."""
        error = TaskErrorInfo(reason, message)
        changed = self._write(lambda: self.storage.tasks.update(
            task_id, RUNNING, token=token, status=TaskStatus.FAILED,
            error=error, finished_at=utcnow(), lease_until=None))
        record = self.storage.tasks.get(task_id) if changed and self.observer is not NULL_OBSERVER else None
        if record is not None:
            self.observer.task_failed(record, error, record.duration)
        return changed

    def worker_lost(self, task_type: str, d: Delivery) -> None:
        """The pool process running ``d`` died: retry it under a new token, or declare it dead."""
        task = Task(task_id=d.task_id, task_type=task_type, payload=d.payload, attempt=d.attempt,
                    max_retries=d.max_retries, timeout=d.timeout, dispatch_token=d.token)
        error = TaskErrorInfo("worker_lost", f"the worker process died during attempt {d.attempt}")
        if d.attempt <= d.max_retries:
            self.retry_later(task, error)
        else:
            if self._write(lambda: self.storage.tasks.update(
                    d.task_id, RUNNING, token=d.token, status=TaskStatus.DEAD, error=error,
                    finished_at=utcnow(), lease_until=None)):
                self.observer.task_failed(task, error, None)

    # --- helpers --------------------------------------------------------------------------

    def _explain_drop(self, d: Delivery) -> None:
        record = self.storage.tasks.get(d.task_id)
        if record is None:
            logger.error("message for unknown task %s dropped (no such record)", d.task_id)
        elif record.status.terminal or record.dispatch_token != d.token:
            logger.info("task %s is %s; duplicate or stale message dropped", d.task_id, record.status)
        else:
            logger.warning("task %s is %s; message dropped", d.task_id, record.status)

    def _write_logs(self, lines: Any) -> None:
        # Never blocks the task on an outage: the spool keeps the lines in order and retries.
        self.log_spool.submit(lines)

    def _write(self, fn: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.write_patience
        delay = 0.1
        while True:
            try:
                return fn()
            except StorageError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                logger.warning("storage unavailable, retrying in %.1fs: %s", delay, exc)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
