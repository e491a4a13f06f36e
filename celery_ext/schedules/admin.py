"""Defining schedules: added through ``TaskManager`` (the CLI, your code; source ``api``) or
listed in config.yaml's ``schedules:`` (source ``config``, written by ``sync_config_schedules``).

The file is authoritative for its schedules: a sync saves each entry whose definition differs
from the stored one (pausing included) and removes the config schedules no longer listed;
schedules added through the API are left alone.  A config schedule can be paused or resumed
through the API until the next sync; adding or removing one there is refused (the file would
bring it back).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from celery_ext.errors import InvalidScheduleError, ScheduleNotFoundError
from celery_ext.model import utcnow
from celery_ext.schedules.model import Schedule

if TYPE_CHECKING:
    from celery_ext.config import Config
    from celery_ext.storage.base import Storage

logger = logging.getLogger("celery_ext.schedules")


def add(storage: Storage, schedule: Schedule, now: datetime) -> Schedule:
    """Create or replace an API schedule; a replaced one keeps its next fire time if its timing
    is unchanged."""
    _not_from_config(storage.schedules.get(schedule.name), "replace")
    return storage.schedules.save(schedule.replace(source="api").check().starting(now))


def remove(storage: Storage, name: str) -> None:
    _not_from_config(get(storage, name), "remove")
    if not storage.schedules.delete(name):
        raise ScheduleNotFoundError(name)


def set_paused(storage: Storage, name: str, paused: bool) -> Schedule:
    if not storage.schedules.set_paused(name, paused):
        raise ScheduleNotFoundError(name)
    return get(storage, name)


def get(storage: Storage, name: str) -> Schedule:
    found = storage.schedules.get(name)
    if found is None:
        raise ScheduleNotFoundError(name)
    return found


def _not_from_config(stored: Schedule | None, action: str) -> None:
    if stored is not None and stored.source == "config":
        raise InvalidScheduleError(f"{stored.name!r} is defined in config.yaml: {action} it there", field="name")


@dataclass(frozen=True, slots=True)
class SyncReport:
    saved: list[str] = field(default_factory=list)  # added or changed
    removed: list[str] = field(default_factory=list)


def config_schedules(config: Config) -> list[Schedule]:
    """The ``schedules:`` of ``config`` as records (source ``config``)."""
    return [
        Schedule(
            name=e.name,
            task_type=e.task_type,
            payload=dict(e.payload),
            cron=e.cron,
            every=e.every,
            timezone=e.timezone,
            catch_up=e.catch_up,
            paused=e.paused,
            priority=e.priority,
            max_retries=e.max_retries,
            timeout=e.timeout,
            source="config",
        )
        for e in config.schedules
    ]


def sync_config_schedules(storage: Storage, config: Config, now: datetime | None = None) -> SyncReport:
    """Make the stored config schedules those of ``config`` (see the module's docstring)."""
    now = now or utcnow()
    wanted = {s.name: s for s in config_schedules(config)}
    stored = {s.name: s for s in storage.schedules.list()}
    report = SyncReport()
    for name, schedule in wanted.items():
        have = stored.get(name)
        if have is not None and have.source == "config" and have.definition() == schedule.definition():
            continue
        if have is not None and have.source != "config":
            logger.warning("schedule %s of config.yaml replaces the one of that name added through the API", name)
        storage.schedules.save(schedule.check().starting(now))
        report.saved.append(name)
    for name, have in stored.items():
        if have.source == "config" and name not in wanted and storage.schedules.delete(name):
            report.removed.append(name)
    return report
