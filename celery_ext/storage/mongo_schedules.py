"""Periodic schedules in MongoDB: the ``celery_ext_schedules`` collection, one document per
schedule keyed by its name (``_id``), times in microseconds as in ``mongo_doc``.

Fenced writes read the fence just before writing (see ``MongoFenceRepository``); ``advance`` is
also conditional on the expected ``next_fire_at``, so of two leaders at most one moves it.
"""

from __future__ import annotations

import builtins
from datetime import datetime
from typing import TYPE_CHECKING, Any

from celery_ext.errors import StorageError
from celery_ext.model import utcnow
from celery_ext.schedules.model import TIME_FIELDS, Schedule
from celery_ext.storage.base import Fence, ScheduleRepository
from celery_ext.storage.mongo_doc import dec, enc

if TYPE_CHECKING:
    from celery_ext.storage.mongo import MongoStorage

COLLECTION = "celery_ext_schedules"


def _to_doc(schedule: Schedule) -> dict[str, Any]:
    doc = schedule.record()
    for name in TIME_FIELDS:
        doc[name] = enc(doc[name])
    doc["_id"] = doc.pop("name")
    return doc


def _from_doc(doc: dict[str, Any]) -> Schedule:
    return Schedule.from_record({**doc, "name": doc["_id"]}, dec)


class MongoScheduleRepository(ScheduleRepository):
    def __init__(self, storage: MongoStorage) -> None:
        self.storage = storage

    @property
    def col(self) -> Any:
        return self.storage.db[COLLECTION]

    def create_indexes(self) -> None:
        self.col.create_index([("paused", 1), ("next_fire_at", 1)], name="ix_due")

    def list(self) -> list[Schedule]:
        with self.storage.guard():
            return [_from_doc(d) for d in self.col.find({}).sort([("_id", 1)])]

    def get(self, name: str) -> Schedule | None:
        with self.storage.guard():
            doc = self.col.find_one({"_id": name})
        return _from_doc(doc) if doc else None

    def save(self, schedule: Schedule) -> Schedule:
        # No transaction: the replacement is conditional on the state read, so a fire that a
        # leader recorded in between is never overwritten (the loop reads it and goes again).
        for _ in range(5):
            now = utcnow()
            with self.storage.guard():
                current = self.col.find_one({"_id": schedule.name})
                if current is None:
                    stored = schedule.replace(updated_at=now)
                    insert = {**_to_doc(stored), "created_at": enc(now)}
                    if self.col.update_one({"_id": schedule.name}, {"$setOnInsert": insert}, upsert=True).upserted_id:
                        return stored
                    continue
                stored = schedule.succeeding(_from_doc(current)).replace(updated_at=now)
                state = {k: current.get(k) for k in ("next_fire_at", "last_fire_at", "last_task_id")}
                doc = {**_to_doc(stored), "created_at": current.get("created_at")}
                if self.col.replace_one({"_id": schedule.name, **state}, doc).matched_count == 1:
                    return stored
        raise StorageError(f"schedule {schedule.name!r} kept changing while it was saved; try again")

    def delete(self, name: str) -> bool:
        with self.storage.guard():
            return int(self.col.delete_one({"_id": name}).deleted_count) == 1

    def set_paused(self, name: str, paused: bool) -> bool:
        with self.storage.guard():
            result = self.col.update_one({"_id": name}, {"$set": {"paused": paused, "updated_at": enc(utcnow())}})
        return int(result.matched_count) == 1

    def due(self, now: datetime, limit: int = 100) -> builtins.list[Schedule]:
        query = {"paused": False, "next_fire_at": {"$lte": enc(now)}}
        with self.storage.guard():
            return [_from_doc(d) for d in self.col.find(query).sort([("next_fire_at", 1)]).limit(limit)]

    def advance(
        self,
        name: str,
        expected_next_fire_at: datetime,
        new_next_fire_at: datetime,
        last_fire_at: datetime | None,
        fence: Fence,
    ) -> bool:
        values: dict[str, Any] = {"next_fire_at": enc(new_next_fire_at), "updated_at": enc(utcnow())}
        if last_fire_at is not None:
            values.update(last_fire_at=enc(last_fire_at), last_task_id=None)
        return self._fenced({"_id": name, "next_fire_at": enc(expected_next_fire_at)}, values, fence)

    def fired(self, name: str, fire_at: datetime, task_id: str, fence: Fence) -> bool:
        return self._fenced({"_id": name, "last_fire_at": enc(fire_at)}, {"last_task_id": task_id}, fence)

    def _fenced(self, query: dict[str, Any], values: dict[str, Any], fence: Fence) -> bool:
        if not self.storage.fences.holds(fence):
            return False
        with self.storage.guard():
            return int(self.col.update_one(query, {"$set": values}).matched_count) == 1
