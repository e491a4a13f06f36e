"""Task records, results, logs, filters, and the task state machine."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any

from celery_ext.validation import renderable


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    """A random (version 4) UUID as 32 hex digits: ``uuid.uuid4().hex`` without building the
    ``UUID`` object (a third of the time; a batch submit makes four ids a task)."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    return raw.hex()


def new_uuid() -> str:
    """``str(uuid.uuid4())``, by ``new_id``: the dashed form (kombu's delivery tags)."""
    h = new_id()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class TaskStatus(enum.StrEnum):
    PENDING = "pending"
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DEAD = "dead"

    def __str__(self) -> str:
        return self.value

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.DEAD})

# Statuses from which a dispatched message may start the task.  PENDING is accepted because
# the worker may start a task before the producer has marked it QUEUED after publishing.
STARTABLE = frozenset({TaskStatus.PENDING, TaskStatus.SCHEDULED, TaskStatus.QUEUED, TaskStatus.RETRYING})

# Every allowed move; each is applied as a conditional update on the expected status.
TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    # Back to SCHEDULED/RETRYING: the scheduler took a due record to publish it and could not.
    TaskStatus.PENDING: frozenset(
        {TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.CANCELLED, TaskStatus.SCHEDULED, TaskStatus.RETRYING}
    ),
    # FAILED without running: a chain or chord step whose previous step failed (parent_failed).
    # Taken by the scheduler's leader to be published: QUEUED at once on a Redis broker, else
    # PENDING (then QUEUED after the publish), as a submit is.
    TaskStatus.SCHEDULED: frozenset(
        {TaskStatus.PENDING, TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.CANCELLED, TaskStatus.FAILED}
    ),
    # Back to PENDING, SCHEDULED or RETRYING: written QUEUED before its publish (a Redis broker),
    # and the publish failed (the outbox, or the due scan, publishes it again).
    TaskStatus.QUEUED: frozenset(
        {TaskStatus.RUNNING, TaskStatus.CANCELLED, TaskStatus.PENDING, TaskStatus.SCHEDULED, TaskStatus.RETRYING}
    ),
    TaskStatus.RUNNING: frozenset(
        {
            TaskStatus.SUCCEEDED,
            TaskStatus.RETRYING,
            TaskStatus.FAILED,
            TaskStatus.DEAD,
            TaskStatus.CANCELLED,
            TaskStatus.QUEUED,  # released after the worker was lost, to be redelivered
        }
    ),
    TaskStatus.RETRYING: frozenset({TaskStatus.PENDING, TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.CANCELLED}),
    # A manual retry re-opens a finished task as PENDING, then publishes it like a new one.
    TaskStatus.FAILED: frozenset({TaskStatus.PENDING}),
    TaskStatus.DEAD: frozenset({TaskStatus.PENDING}),
    TaskStatus.CANCELLED: frozenset({TaskStatus.PENDING}),
    TaskStatus.SUCCEEDED: frozenset(),
}


def can_transition(src: TaskStatus, dst: TaskStatus) -> bool:
    return dst in TRANSITIONS[src]


def sources_of(dst: TaskStatus) -> frozenset[TaskStatus]:
    """Every status from which ``dst`` may be reached."""
    return frozenset(s for s, targets in TRANSITIONS.items() if dst in targets)


@dataclass(frozen=True, slots=True)
class TaskErrorInfo:
    """Why a task failed: a stable reason code and a human message."""

    reason: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"reason": self.reason, "message": self.message}


@dataclass(frozen=True, slots=True)
class TaskResult:
    """What an executor returns. ``retryable`` only matters when ``success`` is false."""

    success: bool
    data: Any = None
    error: TaskErrorInfo | None = None
    retryable: bool = False
    # The exception behind a failure, in the process that caught it (never stored): Celery's
    # traceback of the failure (Flower's task page) shows it as the cause of ``TaskFailed``.
    cause: BaseException | None = field(default=None, compare=False, repr=False)

    @classmethod
    def ok(cls, data: Any = None) -> TaskResult:
        return cls(True, data)

    @classmethod
    def fail(
        cls,
        reason: str,
        message: str,
        *,
        retryable: bool = False,
        data: Any = None,
        cause: BaseException | None = None,
    ) -> TaskResult:
        return cls(False, data, TaskErrorInfo(reason, message), retryable, cause)


@dataclass(frozen=True, slots=True)
class Task:
    """The durable record of one task: the source of truth."""

    task_id: str
    task_type: str
    payload: dict[str, Any]
    status: TaskStatus = TaskStatus.PENDING
    priority: int = 0
    attempt: int = 0
    max_retries: int = 0
    timeout: float | None = None
    run_at: datetime | None = None
    worker_id: str | None = None
    result: Any = None
    error: TaskErrorInfo | None = None
    idempotency_key: str | None = None
    created_at: datetime = field(default_factory=utcnow)
    queued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime | None = None
    dispatch_token: str | None = None
    lease_until: datetime | None = None
    # A manual retry starts a new run (``run`` + 1) whose attempts count again from 1.
    run: int = 1
    # Positional args of the Celery message (a chain passes the previous step's result as args[0]).
    args: list[Any] | None = None
    # Celery's canvas ids: the task that sent this one, the first task of its workflow, its group.
    parent_id: str | None = None
    root_id: str | None = None
    group_id: str | None = None
    # The last custom state a running attempt reported with Celery's ``update_state`` (progress):
    # ``{"state", "meta", "attempt", "run", "at"}``; Celery's state while that attempt runs.
    progress: dict[str, Any] | None = None

    def replace(self, **changes: Any) -> Task:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: statuses lowercase, times ISO 8601 UTC.  ``payload``, ``args`` and
        ``result`` are shown whatever a record holds (``validation.renderable``: a NaN as "NaN",
        nesting past 64 levels cut), so one bad record never breaks a listing."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "dispatch_token"}
        out["status"] = self.status.value
        out["error"] = self.error.to_dict() if self.error else None
        for key, value in out.items():
            if isinstance(value, datetime):
                out[key] = value.isoformat()
        for key in ("payload", "args", "result", "progress"):
            if out[key] is not None:
                out[key] = renderable(out[key])
        return out

    @property
    def reported(self) -> dict[str, Any] | None:
        """The custom state its running attempt reported (``progress`` of this run and attempt)."""
        p = self.progress
        if self.status is TaskStatus.RUNNING and p and (p.get("run"), p.get("attempt")) == (self.run, self.attempt):
            return p
        return None

    @property
    def duration(self) -> float | None:
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds()
        return None


@dataclass(frozen=True, slots=True)
class TaskLog:
    task_id: str
    attempt: int
    time: datetime
    level: str
    message: str
    run: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "attempt": self.attempt,
            "time": self.time.isoformat(),
            "level": self.level,
            "message": self.message,
            "run": self.run,
        }


@dataclass(frozen=True, slots=True)
class TaskFilter:
    """Query for ``TaskRepository.list``; newest first.  Every filter given must match.

    Paginate with ``limit``/``offset``, or with ``cursor`` (the ``next_cursor`` of the previous
    page), which stays stable while records are inserted.
    """

    status: tuple[TaskStatus, ...] = ()
    task_type: tuple[str, ...] = ()
    worker_id: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    limit: int = 100
    offset: int = 0
    cursor: str | None = None
    # Celery canvas ids, each an equality filter.
    root_id: str | None = None
    parent_id: str | None = None
    group_id: str | None = None


@dataclass(frozen=True, slots=True)
class TaskPage:
    items: list[Task]
    next_cursor: str | None
