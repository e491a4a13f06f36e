"""Periodic schedules in SQL: the ``celery_ext_schedules`` table (schema version 5)."""

from __future__ import annotations

import builtins
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, delete, false, insert, select, update
from sqlalchemy.exc import IntegrityError

from celery_ext.model import utcnow
from celery_ext.schedules.model import Schedule
from celery_ext.storage.base import Fence, ScheduleRepository
from celery_ext.storage.sql_fence import fence_holds, fence_params
from celery_ext.storage.sql_schema import schedules

if TYPE_CHECKING:
    from celery_ext.storage.sql import SqlStorage

_BY_NAME = schedules.c.name


def _from_row(row: Any) -> Schedule:
    return Schedule.from_record(row._mapping)


class SqlScheduleRepository(ScheduleRepository):
    def __init__(self, storage: SqlStorage) -> None:
        self.storage = storage

    def list(self) -> list[Schedule]:
        with self.storage.begin() as conn:
            return [_from_row(r) for r in conn.execute(select(schedules).order_by(_BY_NAME))]

    def get(self, name: str) -> Schedule | None:
        with self.storage.begin() as conn:
            row = conn.execute(select(schedules).where(_BY_NAME == name)).first()
        return _from_row(row) if row else None

    def save(self, schedule: Schedule) -> Schedule:
        for attempt in range(3):
            try:
                with self.storage.begin() as conn:
                    return self._save(conn, schedule)
            except IntegrityError:
                if attempt == 2:  # another process inserted the same name at the same moment: look again
                    raise
        raise AssertionError("unreachable")

    def _save(self, conn: Connection, schedule: Schedule) -> Schedule:
        row = conn.execute(select(schedules).where(_BY_NAME == schedule.name).with_for_update()).first()
        now = utcnow()
        if row is None:
            stored = schedule.replace(updated_at=now)
            conn.execute(insert(schedules).values(**stored.record(), created_at=now))
        else:
            stored = schedule.succeeding(_from_row(row)).replace(updated_at=now)
            conn.execute(update(schedules).where(_BY_NAME == schedule.name).values(**stored.record()))
        return stored

    def delete(self, name: str) -> bool:
        with self.storage.begin() as conn:
            return int(conn.execute(delete(schedules).where(_BY_NAME == name)).rowcount) == 1

    def set_paused(self, name: str, paused: bool) -> bool:
        stmt = update(schedules).where(_BY_NAME == name).values(paused=paused, updated_at=utcnow())
        with self.storage.begin() as conn:
            return int(conn.execute(stmt).rowcount) == 1

    def due(self, now: datetime, limit: int = 100) -> builtins.list[Schedule]:
        stmt = (
            select(schedules)
            .where(schedules.c.paused == false(), schedules.c.next_fire_at <= now)
            .order_by(schedules.c.next_fire_at)
            .limit(limit)
        )
        with self.storage.begin() as conn:
            return [_from_row(r) for r in conn.execute(stmt)]

    def advance(
        self,
        name: str,
        expected_next_fire_at: datetime,
        new_next_fire_at: datetime,
        last_fire_at: datetime | None,
        fence: Fence,
    ) -> bool:
        values: dict[str, Any] = {"next_fire_at": new_next_fire_at, "updated_at": utcnow()}
        if last_fire_at is not None:
            values.update(last_fire_at=last_fire_at, last_task_id=None)
        cond = [_BY_NAME == name, schedules.c.next_fire_at == expected_next_fire_at, fence_holds()]
        with self.storage.begin() as conn:
            return int(conn.execute(update(schedules).where(*cond).values(values), fence_params(fence)).rowcount) == 1

    def fired(self, name: str, fire_at: datetime, task_id: str, fence: Fence) -> bool:
        cond = [_BY_NAME == name, schedules.c.last_fire_at == fire_at, fence_holds()]
        stmt = update(schedules).where(*cond).values(last_task_id=task_id)
        with self.storage.begin() as conn:
            return int(conn.execute(stmt, fence_params(fence)).rowcount) == 1
