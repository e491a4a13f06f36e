"""Task <-> MongoDB document mapping.

Times are stored as integer microseconds since the Unix epoch (UTC): exact (BSON dates keep only
milliseconds), totally ordered, and the same on MongoDB and on wire-compatible servers (some
of which turn dates written by ``$set`` into strings).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from celery_ext.model import Task
from celery_ext.storage.base import TIME_FIELDS, from_record, record_changes, to_record

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def enc(value: datetime | None) -> int | None:
    """Aware datetime -> microseconds since the epoch."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("naive datetime given to the task store; use aware UTC")
    return (value - _EPOCH) // timedelta(microseconds=1)


def dec(value: int | None) -> datetime | None:
    return None if value is None else _EPOCH + timedelta(microseconds=value)


def to_doc(task: Task) -> dict[str, Any]:
    doc = to_record(task)
    for name in TIME_FIELDS:
        doc[name] = enc(doc[name])
    # Absent, not null, so that the partial unique index only sees real keys.
    if doc["idempotency_key"] is None:
        del doc["idempotency_key"]
    return doc


def from_doc(doc: dict[str, Any]) -> Task:
    return from_record(doc, dec)


def set_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """An update document for ``fields`` (names as in ``Task``); unknown names are an error."""
    values: dict[str, Any] = {}
    unset: dict[str, str] = {}
    for key, value in record_changes(fields).items():
        if key == "idempotency_key" and value is None:
            unset["idempotency_key"] = ""
        else:
            values[key] = enc(value) if key in TIME_FIELDS else value
    update: dict[str, Any] = {"$set": values}
    if unset:
        update["$unset"] = unset
    return update
