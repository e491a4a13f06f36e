"""Groups saved by Celery's ``GroupResult.save()`` in SQL: the ``celery_ext_groups`` table (schema
version 7), one row per group id."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from celery_ext.model import utcnow
from celery_ext.storage.base import GroupRepository, SavedGroup
from celery_ext.storage.sql_schema import groups

if TYPE_CHECKING:
    from celery_ext.storage.sql import SqlStorage

_BY_ID = groups.c.group_id


class SqlGroupRepository(GroupRepository):
    def __init__(self, storage: SqlStorage) -> None:
        self.storage = storage

    def save(self, group_id: str, result: Any) -> None:
        values = {"result": result, "saved_at": utcnow()}
        for attempt in range(3):
            try:
                with self.storage.begin() as conn:
                    if conn.execute(update(groups).where(_BY_ID == group_id).values(**values)).rowcount:
                        return
                    conn.execute(insert(groups).values(group_id=group_id, **values))
                    return
            except IntegrityError:
                if attempt == 2:  # another process inserted the same id at the same moment: update it
                    raise
        raise AssertionError("unreachable")

    def get(self, group_id: str) -> SavedGroup | None:
        with self.storage.begin() as conn:
            row = conn.execute(select(groups).where(_BY_ID == group_id)).first()
        return SavedGroup(row.group_id, row.result, row.saved_at) if row else None

    def delete(self, group_id: str) -> bool:
        with self.storage.begin() as conn:
            return bool(conn.execute(delete(groups).where(_BY_ID == group_id)).rowcount)

    def purge(self, before: datetime, limit: int = 1000) -> int:
        with self.storage.begin() as conn:
            ids = list(conn.execute(select(_BY_ID).where(groups.c.saved_at < before).limit(limit)).scalars())
            if not ids:
                return 0
            return int(conn.execute(delete(groups).where(_BY_ID.in_(ids))).rowcount)
