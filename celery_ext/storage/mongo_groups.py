"""Groups saved by Celery's ``GroupResult.save()`` in MongoDB: the ``celery_ext_groups``
collection, one document per group keyed by its id (``_id``), times in microseconds as in
``mongo_doc``."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from celery_ext.model import utcnow
from celery_ext.storage.base import GroupRepository, SavedGroup
from celery_ext.storage.mongo_doc import dec, enc

if TYPE_CHECKING:
    from celery_ext.storage.mongo import MongoStorage

COLLECTION = "celery_ext_groups"


class MongoGroupRepository(GroupRepository):
    def __init__(self, storage: MongoStorage) -> None:
        self.storage = storage

    @property
    def col(self) -> Any:
        return self.storage.db[COLLECTION]

    def create_indexes(self) -> None:
        self.col.create_index([("saved_at", 1)], name="ix_saved")

    def save(self, group_id: str, result: Any) -> None:
        with self.storage.guard():
            self.col.update_one({"_id": group_id}, {"$set": {"result": result, "saved_at": enc(utcnow())}}, upsert=True)

    def get(self, group_id: str) -> SavedGroup | None:
        with self.storage.guard():
            doc = self.col.find_one({"_id": group_id})
        if doc is None:
            return None
        saved_at = dec(doc["saved_at"])
        assert saved_at is not None
        return SavedGroup(group_id, doc["result"], saved_at)

    def delete(self, group_id: str) -> bool:
        with self.storage.guard():
            return bool(self.col.delete_one({"_id": group_id}).deleted_count)

    def purge(self, before: datetime, limit: int = 1000) -> int:
        with self.storage.guard():
            ids = [d["_id"] for d in self.col.find({"saved_at": {"$lt": enc(before)}}, {"_id": 1}).limit(limit)]
            if not ids:
                return 0
            return int(self.col.delete_many({"_id": {"$in": ids}}).deleted_count)
