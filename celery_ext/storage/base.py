"""The storage extension point: ``TaskRepository``, ``TaskLogRepository`` and ``Storage``.

What every backend must do is in those ABCs.  What a backend may do besides is a capability ABC
of its own, which its repository also inherits and callers test with ``isinstance`` (as with
``collections.abc``): ``TaskMaintenance`` (retention purges, counts by status) for a task
repository, ``LogMaintenance`` (retention purges) for a log repository.  The built-in SQL and
MongoDB backends have both; a backend without one still stores and runs tasks, and the commands
that need it say so (``missing_capability``).

Every status change is a conditional update: it names the statuses it expects (and, for moves
driven by a broker message, the dispatch token), so a duplicated or stale message can never
move a record backwards.
"""

from __future__ import annotations

import abc
import builtins
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from celery_ext.model import Task, TaskErrorInfo, TaskFilter, TaskLog, TaskPage, TaskStatus, utcnow
from celery_ext.schedules.model import Schedule


@dataclass(frozen=True, slots=True)
class Fence:
    """A leader's fencing token: a write carrying it is refused once storage holds a newer one
    for ``name`` (a newer leader advanced it), so a leader deposed while paused (GC, SIGSTOP)
    cannot act late."""

    name: str
    token: int


class FenceRepository(abc.ABC):
    @abc.abstractmethod
    def advance(self, fence: Fence) -> int:
        """Record ``fence.token`` as the newest of ``fence.name`` unless a newer one is stored;
        returns the newest stored token (above ``fence.token``: this leader is deposed)."""

    @abc.abstractmethod
    def current(self, name: str) -> int:
        """The newest token recorded for ``name`` (0 if none)."""


class ScheduleRepository(abc.ABC):
    """Periodic schedules (``celery_ext.schedules``), keyed by name.  ``advance`` and ``fired`` are
    the leader's writes: fenced like task updates, and ``advance`` is also conditional on the
    fire time it expects, so two leaders (or a deposed one) never both fire one time."""

    @abc.abstractmethod
    def list(self) -> list[Schedule]:
        """Every schedule, by name."""

    @abc.abstractmethod
    def get(self, name: str) -> Schedule | None: ...

    @abc.abstractmethod
    def save(self, schedule: Schedule) -> Schedule:
        """Insert ``schedule`` or replace the definition stored under its name; returns what is
        stored.  A replaced schedule whose timing (cron, every, timezone) is unchanged keeps its
        stored ``next_fire_at``; its last fire and task are always kept."""

    @abc.abstractmethod
    def delete(self, name: str) -> bool: ...

    @abc.abstractmethod
    def set_paused(self, name: str, paused: bool) -> bool:
        """Returns whether a schedule of that name exists."""

    @abc.abstractmethod
    def due(self, now: datetime, limit: int = 100) -> builtins.list[Schedule]:
        """Schedules not paused whose ``next_fire_at <= now``, the most overdue first."""

    @abc.abstractmethod
    def advance(
        self,
        name: str,
        expected_next_fire_at: datetime,
        new_next_fire_at: datetime,
        last_fire_at: datetime | None,
        fence: Fence,
    ) -> bool:
        """Move ``next_fire_at`` from ``expected_next_fire_at`` to ``new_next_fire_at`` unless
        another leader moved it or ``fence`` is older than the stored one.  With ``last_fire_at``
        (a fire decided) also record it and clear ``last_task_id`` until ``fired``; without, the
        last fire is kept (missed times skipped).  Returns whether the schedule changed."""

    @abc.abstractmethod
    def fired(self, name: str, fire_at: datetime, task_id: str, fence: Fence) -> bool:
        """Record the task of the fire at ``fire_at`` (if it is still the last fire; fenced)."""


@dataclass(frozen=True, slots=True)
class SavedGroup:
    """A group saved by Celery's ``GroupResult.save()``: its members as
    ``GroupResult.as_tuple()`` gives them (JSON), for ``GroupResult.restore``."""

    group_id: str
    result: Any
    saved_at: datetime


class GroupRepository(abc.ABC):
    """Groups saved through the result backend (``_save_group``).  A group's members have their
    own records; this keeps only the ordered list of their ids, which the records cannot give
    for members that have not started yet."""

    @abc.abstractmethod
    def save(self, group_id: str, result: Any) -> None:
        """Store ``result`` under ``group_id``, replacing a group saved before under that id."""

    @abc.abstractmethod
    def get(self, group_id: str) -> SavedGroup | None: ...

    @abc.abstractmethod
    def delete(self, group_id: str) -> bool: ...

    @abc.abstractmethod
    def purge(self, before: datetime, limit: int = 1000) -> int:
        """Delete up to ``limit`` groups saved before ``before``; returns how many."""


class TaskRepository(abc.ABC):
    @abc.abstractmethod
    def create(self, task: Task, *, durable: bool = True) -> tuple[Task, bool]:
        """Insert ``task``; with an idempotency key already used, return ``(existing, False)``.

        ``durable=False``: the write may return before it is on disk (it is visible to every
        reader at once); a backend that cannot tell the difference ignores it.  Only for writes
        that can be rebuilt if a crash of the store loses them (see ``Lifecycle``)."""

    def prepare(self) -> None:  # noqa: B027 - optional: nothing to prepare by default
        """Build, in a worker's main process before its pool forks, what a pool process's first
        runs would build for themselves beyond the claim and the outcome (``warm_statements``):
        the children then share it instead of each allocating its own."""

    def sends_after_publish(self) -> bool:
        """Whether a single submit may send a record's insert (``create_sent``) after its message,
        while the publish's reply is on its way: only a store that splits the write and holds a
        live connection in this thread (one the server ended is dropped by the check).  Elsewhere
        the insert goes first, on a fresh connection, so that a store known to be away fails the
        submit before anything is published."""
        return False

    def create_sent(self, task: Task) -> Callable[[], tuple[Task, bool]]:
        """``create(task, durable=False)`` in two halves, for a record whose message may be
        published while its write is on the way: the write is sent (and commits on its own) before
        this returns, and the function returned reads its outcome, ``create``'s, raising its errors.
        That function must be called, and before any other statement of this thread.  A store that
        cannot split the write does it all here."""
        outcome = self.create(task, durable=False)
        return lambda: outcome

    @abc.abstractmethod
    def create_many(self, tasks: Sequence[Task]) -> list[tuple[Task, bool]]:
        """Insert several tasks in one round trip where possible; same contract as ``create``."""

    def create_many_sent(self, tasks: Sequence[Task]) -> Callable[[], list[tuple[Task, bool]]]:
        """``create_many`` in two halves, as ``create_sent``; for tasks without idempotency keys."""
        outcome = self.create_many(tasks)
        return lambda: outcome

    @abc.abstractmethod
    def get(self, task_id: str) -> Task | None: ...

    @abc.abstractmethod
    def get_by_idempotency_key(self, key: str) -> Task | None: ...

    @abc.abstractmethod
    def update(
        self,
        task_id: str,
        expected: Iterable[TaskStatus],
        *,
        token: str | None = None,
        fence: Fence | None = None,
        durable: bool = True,
        **fields: Any,
    ) -> bool:
        """Set ``fields`` only if the record's status is in ``expected`` (and its dispatch token is
        ``token``, and ``fence`` is not older than the stored fence, when given).  Returns whether
        the record changed.  ``durable``: as ``create``'s."""

    @abc.abstractmethod
    def update_many(
        self,
        task_ids: Sequence[str],
        expected: Iterable[TaskStatus],
        *,
        tokens: Sequence[str] | None = None,
        fence: Fence | None = None,
        durable: bool = True,
        **fields: Any,
    ) -> int:
        """Conditional update of several records (fenced and ``durable`` as ``update``); returns
        how many changed.  With ``tokens``, only records whose dispatch token is one of them: as
        ``update``'s ``token`` for each record, since a token is a fresh id that only its record
        (or the records of one batch) holds."""

    def take_due(
        self,
        statuses: Iterable[TaskStatus],
        before: datetime,
        limit: int,
        *,
        fence: Fence | None = None,
        **fields: Any,
    ) -> builtins.list[tuple[Task, TaskStatus]]:
        """Set ``fields`` on up to ``limit`` records of ``statuses`` whose ``run_at <= before``,
        the earliest ``run_at`` first (the scheduler's due records; ``fields`` move them on, with
        a new dispatch token); refused altogether when ``fence`` is older than the stored one.
        Returns each record changed, as it is after the change, with the status it had.  Two
        takers at once never take the same record.

        This fallback (MongoDB, SQLite, MySQL) is ``scan`` then ``update_many`` on the ids, and
        a record moved on in between (cancelled, started, taken by another) is left out by
        reading back the records that changed: ``fields`` must hold a fresh
        ``dispatch_token``.  PostgreSQL does it in one statement (``sql_due``)."""
        if "dispatch_token" not in fields:
            raise ValueError("take_due needs a fresh dispatch_token among the fields it sets")
        statuses = builtins.list(statuses)
        batch = self.scan(statuses, due_before=before, limit=limit)
        if not batch:
            return []
        ids = [t.task_id for t in batch]
        after = {"updated_at": utcnow(), **fields}
        changed = self.update_many(ids, statuses, fence=fence, **after)
        moved = [(t.replace(**after), t.status) for t in batch]
        if changed != len(ids):  # some moved on in between: keep only what is ours
            token = fields["dispatch_token"]
            moved = [(t, s) for t, s in moved if (r := self.get(t.task_id)) and r.dispatch_token == token]
        return moved

    @abc.abstractmethod
    def delete(self, task_id: str) -> bool: ...

    @abc.abstractmethod
    def list(self, flt: TaskFilter) -> TaskPage:
        """Newest first, filtered, paginated by offset or by cursor."""

    @abc.abstractmethod
    def scan(
        self,
        statuses: Iterable[TaskStatus],
        *,
        due_before: datetime | None = None,
        lease_expired_before: datetime | None = None,
        updated_before: datetime | None = None,
        limit: int = 100,
    ) -> builtins.list[Task]:
        """Records the scheduler must act on: due, lease-expired or stale, oldest first."""


class TaskMaintenance(abc.ABC):
    """Capability of a task repository: retention purges and counts by status (``celery-ext
    storage purge | status``, the scheduler's periodic purge)."""

    @abc.abstractmethod
    def purge(self, status: TaskStatus, finished_before: datetime, limit: int = 1000) -> int:
        """Delete up to ``limit`` tasks of the terminal ``status`` that finished before
        ``finished_before``, with their log lines; returns how many.  Never touches a
        non-terminal task (``ValueError``)."""

    @abc.abstractmethod
    def count_by_status(self) -> dict[str, int]:
        """How many records there are of each status (for ``celery-ext storage status``)."""


class TaskLogRepository(abc.ABC):
    @abc.abstractmethod
    def append(self, logs: Sequence[TaskLog]) -> None:
        """Write a batch of log lines in one round trip."""

    @abc.abstractmethod
    def list(
        self, task_id: str, *, attempt: int | None = None, run: int | None = None, limit: int = 1000, offset: int = 0
    ) -> list[TaskLog]:
        """Log lines of one task in the order they were written, optionally of one ``run`` and/or
        ``attempt`` only (an attempt number alone matches that attempt of every run)."""


class LogMaintenance(abc.ABC):
    """Capability of a log repository: retention purges (``celery-ext storage purge``)."""

    @abc.abstractmethod
    def purge(self, before: datetime, limit: int = 1000) -> int:
        """Delete up to ``limit`` log lines written before ``before``; returns how many."""


def missing_capability(storage: Storage, repository: object, capability: type[Any], needed_for: str) -> str:
    """Why ``repository`` of ``storage`` cannot do ``needed_for``: one line naming the backend and
    the capability it lacks."""
    return (
        f"storage {storage.description}: {type(repository).__name__} does not implement "
        f"{capability.__module__}.{capability.__name__}, needed for {needed_for}"
    )


class Storage(abc.ABC):
    """A backend: its repositories over one connection pool."""

    tasks: TaskRepository
    logs: TaskLogRepository
    fences: FenceRepository
    schedules: ScheduleRepository
    # Optional: without it, Celery's GroupResult.save() / restore() say this store cannot.
    groups: GroupRepository | None = None

    @classmethod
    @abc.abstractmethod
    def from_config(cls, type_name: str, config: dict[str, Any], data_dir: Path) -> Storage:
        """Build from ``storage.type`` and ``storage.config``; no I/O."""

    @abc.abstractmethod
    def migrate(self) -> list[str] | None:
        """Create or upgrade the schema in place (never dropping data); safe to call from several
        processes.  Returns the steps applied, if the backend tracks them."""

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise ``StorageError`` naming the (redacted) location if the store is unreachable."""

    def schema_version(self) -> tuple[int | None, int]:
        """``(version of the store, version this code writes)``; ``None`` if never migrated."""
        return None, 0

    def upkeep_warnings(self) -> list[str]:
        """What in the store's own settings will degrade it as records accumulate (PostgreSQL:
        autovacuum off); a worker logs these at start, ``celery-ext storage migrate`` prints them."""
        return []

    def after_fork(self) -> None:  # noqa: B027 - optional hook
        """Drop connections inherited from a parent process."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """Where the data lives, password redacted (for banners and errors)."""


# --- the flat record every backend stores ---------------------------------------------------

_RECORD_FIELDS = frozenset(
    {
        "task_id",
        "task_type",
        "payload",
        "priority",
        "attempt",
        "max_retries",
        "timeout",
        "run_at",
        "worker_id",
        "result",
        "idempotency_key",
        "dispatch_token",
        "lease_until",
        "created_at",
        "queued_at",
        "started_at",
        "finished_at",
        "updated_at",
        "run",
        "args",
        "parent_id",
        "root_id",
        "group_id",
        "progress",
    }
)
TIME_FIELDS = ("run_at", "lease_until", "created_at", "queued_at", "started_at", "finished_at", "updated_at")


def to_record(task: Task) -> dict[str, Any]:
    """A task as a flat record: status as its string, the error split into reason and message,
    ``updated_at`` defaulting to ``created_at``.  Backends encode the time fields as they need."""
    return {
        "task_id": task.task_id,
        "task_type": task.task_type,
        "payload": task.payload,
        "status": task.status.value,
        "priority": task.priority,
        "attempt": task.attempt,
        "max_retries": task.max_retries,
        "timeout": task.timeout,
        "run_at": task.run_at,
        "worker_id": task.worker_id,
        "result": task.result,
        "error_reason": task.error.reason if task.error else None,
        "error_message": task.error.message if task.error else None,
        "idempotency_key": task.idempotency_key,
        "dispatch_token": task.dispatch_token,
        "lease_until": task.lease_until,
        "created_at": task.created_at,
        "queued_at": task.queued_at,
        "started_at": task.started_at,
        "finished_at": task.finished_at,
        "updated_at": task.updated_at or task.created_at,
        "run": task.run,
        "args": task.args,
        "parent_id": task.parent_id,
        "root_id": task.root_id,
        "group_id": task.group_id,
        "progress": task.progress,
    }


def from_record(record: Mapping[str, Any], time: Callable[[Any], datetime | None] = lambda v: v) -> Task:
    """The inverse of ``to_record``; ``time`` decodes a stored time field (absent means None).
    A record written before a field existed reads as that field's default (``run`` 1, else None)."""
    reason = record.get("error_reason")
    created = time(record["created_at"])
    assert created is not None
    return Task(
        task_id=record["task_id"],
        task_type=record["task_type"],
        payload=record["payload"],
        status=TaskStatus(record["status"]),
        priority=record.get("priority") or 0,
        attempt=record.get("attempt") or 0,
        max_retries=record.get("max_retries") or 0,
        timeout=record.get("timeout"),
        run_at=time(record.get("run_at")),
        worker_id=record.get("worker_id"),
        result=record.get("result"),
        error=TaskErrorInfo(reason, record.get("error_message") or "") if reason else None,
        idempotency_key=record.get("idempotency_key"),
        dispatch_token=record.get("dispatch_token"),
        lease_until=time(record.get("lease_until")),
        created_at=created,
        queued_at=time(record.get("queued_at")),
        started_at=time(record.get("started_at")),
        finished_at=time(record.get("finished_at")),
        updated_at=time(record.get("updated_at")),
        run=record.get("run") or 1,
        args=record.get("args"),
        parent_id=record.get("parent_id"),
        root_id=record.get("root_id"),
        group_id=record.get("group_id"),
        progress=record.get("progress"),
    )


def record_changes(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Changes named as in ``Task`` (``error``, ``status``, ...) -> the record's fields, with
    ``updated_at`` set to now unless given.  Backends encode the values as they need."""
    changes: dict[str, Any] = {}
    for key, value in fields.items():
        if key == "error":
            changes["error_reason"] = value.reason if value else None
            changes["error_message"] = value.message if value else None
        elif key == "status":
            changes["status"] = TaskStatus(value).value
        elif key in _RECORD_FIELDS:
            changes[key] = value
        else:
            raise ValueError(f"tasks has no field {key!r}")
    changes.setdefault("updated_at", utcnow())
    return changes


def status_values(expected: Iterable[TaskStatus]) -> list[str]:
    return [TaskStatus(s).value for s in expected]
