"""``TaskManager``: submit, inspect, cancel, retry and wait for tasks.

The record is always written before the message is published (outbox order): a crash or a
broker outage between the two leaves a PENDING record for the scheduler to publish later.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from celery_ext.config import Config
from celery_ext.dispatch import MAX_PRIORITY, Dispatch, Dispatcher
from celery_ext.errors import (
    InvalidPayloadError,
    InvalidTransitionError,
    PublishError,
    TaskNotFoundError,
    TaskWaitTimeoutError,
    UnknownTaskTypeError,
)
from celery_ext.executors.pool import ExecutorSet
from celery_ext.model import (
    TERMINAL,
    Task,
    TaskFilter,
    TaskLog,
    TaskPage,
    TaskStatus,
    new_id,
    utcnow,
)
from celery_ext.observer import NULL_OBSERVER, TaskObserver
from celery_ext.storage.base import Storage

_SUBMIT_KEYS = frozenset(
    {"task_type", "payload", "priority", "delay", "run_at", "max_retries", "timeout", "idempotency_key"})


class TaskManager:
    """The public front door of celery_ext."""

    def __init__(self, config: Config, storage: Storage, executors: ExecutorSet, dispatcher: Dispatcher) -> None:
        self.config = config
        self.storage = storage
        self.executors = executors
        self.dispatcher = dispatcher
        self._schema_ready = False
        self.observer: TaskObserver = NULL_OBSERVER  # events and metrics (events.bridge)

    # --- submitting -----------------------------------------------------------------------

    def submit(
        self,
        task_type: str,
        payload: Mapping[str, Any] | None = None,
        *,
        priority: int = 0,
        delay: float | None = None,
        run_at: datetime | None = None,
        max_retries: int | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> Task:
        """Record and publish one task; with a known ``idempotency_key``, return the first task."""
        task, countdown = self._build(
            task_type, payload, priority, delay, run_at, max_retries, timeout, idempotency_key)
        self._ensure_schema()
        stored, created = self.storage.tasks.create(task)
        if not created:
            return stored
        self.observer.task_created(task)
        return self._publish([(task, countdown)])[0]

    def submit_many(self, specs: Iterable[Mapping[str, Any]]) -> list[Task]:
        """Submit several tasks with one insert and one producer; each spec holds ``submit``'s
        arguments (``task_type`` required).  All are validated before anything is written."""
        built = []
        for i, spec in enumerate(specs):
            unknown = set(spec) - _SUBMIT_KEYS
            if unknown or "task_type" not in spec:
                raise InvalidPayloadError(f"unknown keys {sorted(unknown)}" if unknown else "task_type is required",
                                          field=f"[{i}]")
            built.append(self._build(
                spec["task_type"], spec.get("payload"), spec.get("priority", 0), spec.get("delay"),
                spec.get("run_at"), spec.get("max_retries"), spec.get("timeout"), spec.get("idempotency_key")))
        if not built:
            return []
        self._ensure_schema()
        results = self.storage.tasks.create_many([t for t, _ in built])
        fresh = [(t, c) for (t, c), (_, created) in zip(built, results, strict=True) if created]
        for t, _ in fresh:
            self.observer.task_created(t)
        published = iter(self._publish(fresh)) if fresh else iter(())
        return [next(published) if created else stored for stored, created in results]

    def _build(
        self, task_type: str, payload: Any, priority: int, delay: float | None, run_at: datetime | None,
        max_retries: int | None, timeout: float | None, idempotency_key: str | None,
    ) -> tuple[Task, float | None]:
        executor = self.executors.get(task_type)
        if executor is None:
            raise UnknownTaskTypeError(task_type, self.executors.task_types)
        payload = self._check_payload({} if payload is None else payload)
        if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= MAX_PRIORITY:
            raise InvalidPayloadError(f"must be an integer 0..{MAX_PRIORITY} (got {priority!r})", field="priority")
        if delay is not None and run_at is not None:
            raise InvalidPayloadError("give delay or run_at, not both", field="delay")
        if delay is not None and delay < 0:
            raise InvalidPayloadError(f"must be >= 0 (got {delay!r})", field="delay")
        if max_retries is not None and max_retries < 0:
            raise InvalidPayloadError(f"must be >= 0 (got {max_retries!r})", field="max_retries")
        if timeout is not None and timeout <= 0:
            raise InvalidPayloadError(f"must be > 0 (got {timeout!r})", field="timeout")
        now = utcnow()
        if run_at is not None:
            if run_at.tzinfo is None:
                raise InvalidPayloadError("must be timezone-aware", field="run_at")
            delay = max(0.0, (run_at - now).total_seconds())
        elif delay:
            run_at = now + timedelta(seconds=delay)
        settings = executor.settings
        task = Task(
            task_id=new_id(),
            task_type=task_type,
            payload=payload,
            status=TaskStatus.SCHEDULED if delay else TaskStatus.PENDING,
            priority=priority,
            max_retries=max_retries if max_retries is not None else (
                settings.max_retries if settings.max_retries is not None else self.config.worker.default_max_retries),
            timeout=timeout or settings.timeout or self.config.worker.default_timeout,
            run_at=run_at,
            idempotency_key=idempotency_key,
            created_at=now,
            dispatch_token=new_id(),
        )
        return task, delay or None

    def _check_payload(self, payload: Any) -> dict[str, Any]:
        if not isinstance(payload, Mapping):
            raise InvalidPayloadError(f"must be a JSON object (got {type(payload).__name__})")
        try:
            encoded = json.dumps(payload, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise InvalidPayloadError(f"not JSON-serializable: {exc}") from exc
        size, cap = len(encoded.encode()), self.config.app.max_payload_bytes
        if size > cap:
            raise InvalidPayloadError(f"{size} bytes exceeds app.max_payload_bytes ({cap})")
        result: dict[str, Any] = json.loads(encoded)
        return result

    def publish_pending(self, task: Task) -> Task:
        """Publish a PENDING record under its dispatch token and mark it queued (the scheduler's
        recovery of a record whose producer never published it)."""
        return self._publish([(task, None)])[0]

    def _publish(self, batch: list[tuple[Task, float | None]]) -> list[Task]:
        dispatches = [Dispatch(t, t.dispatch_token or "", t.attempt + 1, countdown=c) for t, c in batch]
        # Taken before publishing, so queued_at never comes after a fast worker's started_at.
        now = utcnow()
        try:
            if len(dispatches) == 1:
                self.dispatcher.publish(dispatches[0])
            else:
                self.dispatcher.publish_many(dispatches)
        except Exception as exc:
            raise PublishError(batch[0][0].task_id, exc) from exc
        pending = [t.task_id for t, _ in batch if t.status is TaskStatus.PENDING]
        if pending:
            self.storage.tasks.update_many(pending, (TaskStatus.PENDING,), status=TaskStatus.QUEUED, queued_at=now)
        out = [t.replace(status=TaskStatus.QUEUED, queued_at=now) if t.status is TaskStatus.PENDING else t
               for t, _ in batch]
        for t in out:
            if t.status is TaskStatus.QUEUED:
                self.observer.task_queued(t)
        return out

    def _ensure_schema(self) -> None:
        if not self._schema_ready:
            self.storage.migrate()
            self._schema_ready = True

    # --- reading --------------------------------------------------------------------------

    def get(self, task_id: str) -> Task:
        task = self.storage.tasks.get(task_id)
        if task is None:
            raise TaskNotFoundError(task_id)
        return task

    def list(self, flt: TaskFilter | None = None, **filters: Any) -> TaskPage:
        if flt is None:
            for key in ("status", "task_type"):
                value = filters.get(key)
                if isinstance(value, str | TaskStatus):
                    filters[key] = (value,)
            if "status" in filters:
                filters["status"] = tuple(TaskStatus(s) for s in filters["status"])
            flt = TaskFilter(**filters)
        return self.storage.tasks.list(flt)

    def logs(self, task_id: str, *, attempt: int | None = None, limit: int = 1000) -> builtins.list[TaskLog]:
        self.get(task_id)
        return self.storage.logs.list(task_id, attempt=attempt, limit=limit)

    def wait(self, task_id: str, timeout: float | None = None, *, poll: float = 0.02) -> Task:
        """Block until the task reaches a terminal status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = poll
        while True:
            task = self.get(task_id)
            if task.status in TERMINAL:
                return task
            if deadline is not None and time.monotonic() >= deadline:
                raise TaskWaitTimeoutError(task_id, timeout or 0.0, task.status.value)
            sleep = delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic()))
            time.sleep(sleep)
            delay = min(delay * 1.5, 0.5)

    # --- changing -------------------------------------------------------------------------

    def cancel(self, task_id: str, *, terminate: bool = False) -> Task:
        """Cancel a task that has not finished.  A running task's outcome is discarded; with
        ``terminate`` its pool process is also sent SIGTERM."""
        for _ in range(5):
            task = self.get(task_id)
            if task.status in TERMINAL:
                raise InvalidTransitionError(task_id, task.status.value, "cancel")
            if self.storage.tasks.update(task_id, (task.status,), status=TaskStatus.CANCELLED,
                                         finished_at=utcnow(), lease_until=None):
                break
        else:
            raise InvalidTransitionError(task_id, self.get(task_id).status.value, "cancel")
        if terminate and task.status is TaskStatus.RUNNING:
            # Only on request: a revoked id stays in the workers' revoked set for hours, which
            # would also discard a later manual retry of this task.  The record alone already
            # stops a queued message from running (its claim fails).
            try:
                self.dispatcher.app.control.revoke(task_id, terminate=True)
            except Exception:  # noqa: BLE001, S110 - the record is authoritative; revoke only saves work
                pass
        cancelled = self.get(task_id)
        self.observer.task_cancelled(cancelled)
        return cancelled

    def retry(self, task_id: str) -> Task:
        """Run a failed, dead or cancelled task again with a fresh attempt budget."""
        task = self.get(task_id)
        if task.status not in (TaskStatus.FAILED, TaskStatus.DEAD, TaskStatus.CANCELLED):
            raise InvalidTransitionError(task_id, task.status.value, "retry")
        token = new_id()
        reopened = self.storage.tasks.update(
            task_id, (task.status,), status=TaskStatus.PENDING, dispatch_token=token, attempt=0,
            error=None, result=None, started_at=None, finished_at=None, run_at=None, worker_id=None)
        if not reopened:
            raise InvalidTransitionError(task_id, self.get(task_id).status.value, "retry")
        fresh = task.replace(status=TaskStatus.PENDING, dispatch_token=token, attempt=0, error=None, result=None)
        self._publish([(fresh, None)])
        return self.get(task_id)
