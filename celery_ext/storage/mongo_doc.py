"""Task <-> MongoDB document mapping.

Times are stored as integer microseconds since the Unix epoch (UTC): exact (BSON dates keep only
milliseconds), totally ordered, and the same on MongoDB and on wire-compatible servers (some
of which turn dates written by ``$set`` into strings).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from celery_ext.model import Task, TaskErrorInfo, TaskStatus, utcnow

FIELDS = (
    "task_id", "task_type", "payload", "status", "priority", "attempt", "max_retries", "timeout", "run_at",
    "worker_id", "result", "error_reason", "error_message", "idempotency_key", "dispatch_token",
    "lease_until", "created_at", "queued_at", "started_at", "finished_at", "updated_at",
)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
TIME_FIELDS = frozenset({"run_at", "lease_until", "created_at", "queued_at", "started_at", "finished_at",
                         "updated_at"})


def enc(value: datetime | None) -> int | None:
    """Aware datetime -> microseconds since the epoch."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("naive datetime given to the task store; use aware UTC")
    return (value - _EPOCH) // timedelta(microseconds=1)


def dec(value: int | None) -> datetime | None:
    return None if value is None else _EPOCH + timedelta(microseconds=value)


def statuses(expected: Iterable[TaskStatus]) -> list[str]:
    return [TaskStatus(s).value for s in expected]


def to_doc(task: Task) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "task_id": task.task_id,
        "task_type": task.task_type,
        "payload": task.payload,
        "status": task.status.value,
        "priority": task.priority,
        "attempt": task.attempt,
        "max_retries": task.max_retries,
        "timeout": task.timeout,
        "run_at": enc(task.run_at),
        "worker_id": task.worker_id,
        "result": task.result,
        "error_reason": task.error.reason if task.error else None,
        "error_message": task.error.message if task.error else None,
        "dispatch_token": task.dispatch_token,
        "lease_until": enc(task.lease_until),
        "created_at": enc(task.created_at),
        "queued_at": enc(task.queued_at),
        "started_at": enc(task.started_at),
        "finished_at": enc(task.finished_at),
        "updated_at": enc(task.updated_at or task.created_at),
    }
    # Absent, not null, so that the partial unique index only sees real keys.
    if task.idempotency_key is not None:
        doc["idempotency_key"] = task.idempotency_key
    return doc


def from_doc(doc: dict[str, Any]) -> Task:
    error = TaskErrorInfo(doc["error_reason"], doc.get("error_message") or "") if doc.get("error_reason") else None
    return Task(
        task_id=doc["task_id"],
        task_type=doc["task_type"],
        payload=doc["payload"],
        status=TaskStatus(doc["status"]),
        priority=doc.get("priority", 0),
        attempt=doc.get("attempt", 0),
        max_retries=doc.get("max_retries", 0),
        timeout=doc.get("timeout"),
        run_at=dec(doc.get("run_at")),
        worker_id=doc.get("worker_id"),
        result=doc.get("result"),
        error=error,
        idempotency_key=doc.get("idempotency_key"),
        dispatch_token=doc.get("dispatch_token"),
        lease_until=dec(doc.get("lease_until")),
        created_at=_EPOCH + timedelta(microseconds=doc["created_at"]),
        queued_at=dec(doc.get("queued_at")),
        started_at=dec(doc.get("started_at")),
        finished_at=dec(doc.get("finished_at")),
        updated_at=dec(doc.get("updated_at")),
    )


def set_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """An update document for ``fields`` (names as in ``Task``); unknown names are an error."""
    values: dict[str, Any] = {}
    unset: dict[str, str] = {}
    for key, value in fields.items():
        if key == "error":
            values["error_reason"] = value.reason if value else None
            values["error_message"] = value.message if value else None
        elif key == "status":
            values["status"] = TaskStatus(value).value
        elif key == "idempotency_key" and value is None:
            unset["idempotency_key"] = ""
        elif key in TIME_FIELDS:
            values[key] = enc(value)
        elif key in FIELDS:
            values[key] = value
        else:
            raise ValueError(f"tasks has no field {key!r}")
    values.setdefault("updated_at", enc(utcnow()))
    update: dict[str, Any] = {"$set": values}
    if unset:
        update["$unset"] = unset
    return update
