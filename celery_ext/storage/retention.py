"""Retention: delete finished tasks and old log lines in batches, as ``storage.retention`` says.

``storage.retention`` keys: ``succeeded``, ``failed``, ``cancelled``, ``dead`` (how long a task of
that terminal status is kept after it finished), ``logs`` (how long a log line is kept after it
was written), ``groups`` (how long a group saved by Celery's ``GroupResult.save()`` is kept after
it was saved), each a duration such as ``7d``; unset keeps forever.  ``batch_size`` (default 1000)
bounds each delete so a purge never holds long locks.  Non-terminal tasks are never touched;
deleting a task deletes its log lines.  Run by ``celery-ext storage purge`` (and periodically by
the scheduler).  It needs the storage capabilities ``TaskMaintenance`` (for the task keys),
``LogMaintenance`` (for ``logs``) and ``GroupRepository`` (for ``groups``): a backend without the
one a configured key needs is a ``ConfigError`` saying so, before anything is deleted.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from celery_ext.config import RetentionConfig
from celery_ext.errors import ConfigError
from celery_ext.model import TaskStatus, utcnow
from celery_ext.storage.base import GroupRepository, LogMaintenance, Storage, TaskMaintenance, missing_capability

logger = logging.getLogger("celery_ext.storage.retention")

TERMINAL_ORDER = (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.DEAD)


@dataclass
class PurgeReport:
    tasks: dict[str, int] = field(default_factory=dict)
    logs: int = 0
    groups: int = 0
    seconds: float = 0.0

    @property
    def total_tasks(self) -> int:
        return sum(self.tasks.values())

    def to_dict(self) -> dict[str, object]:
        return {"tasks": self.tasks, "logs": self.logs, "groups": self.groups, "seconds": round(self.seconds, 3)}


def cutoffs(retention: RetentionConfig, now: datetime | None = None) -> dict[str, datetime]:
    """The ``before`` instant for each configured status (and ``logs``)."""
    now = now or utcnow()
    out = {}
    for key in [s.value for s in TERMINAL_ORDER] + ["logs", "groups"]:
        keep = getattr(retention, key)
        if keep is not None:
            out[key] = now - timedelta(seconds=keep)
    return out


def purge(
    storage: Storage, retention: RetentionConfig, *, now: datetime | None = None, max_batches: int | None = None
) -> PurgeReport:
    """Apply ``retention`` until nothing is left to delete (or ``max_batches`` per kind)."""
    started = time.monotonic()
    report = PurgeReport()
    limit = retention.batch_size
    due = cutoffs(retention, now)
    batch_of = purgers(storage, due)
    for key, before in due.items():
        total, batches = 0, 0
        while max_batches is None or batches < max_batches:
            n = batch_of[key](before, limit)
            total += n
            batches += 1
            if n < limit:
                break
        if key == "logs":
            report.logs = total
        elif key == "groups":
            report.groups = total
        else:
            report.tasks[key] = total
        if total:
            what = {"logs": "log lines", "groups": "saved groups"}.get(key, f"{key} tasks")
            logger.info("retention: deleted %d %s older than %s", total, what, before.isoformat())
    report.seconds = time.monotonic() - started
    return report


def purgers(storage: Storage, keys: Iterable[str]) -> dict[str, Callable[[datetime, int], int]]:
    """For each retention key, the call that deletes one batch ``(before, limit)`` of it; a
    ``ConfigError`` when the backend lacks the capability a key needs."""
    tasks, logs = storage.tasks, storage.logs
    out: dict[str, Callable[[datetime, int], int]] = {}
    problems: dict[type[Any], str] = {}
    for key in keys:
        if key == "logs":
            if isinstance(logs, LogMaintenance):
                out[key] = logs.purge
            else:
                problems[LogMaintenance] = missing_capability(
                    storage, logs, LogMaintenance, "purging log lines (storage.retention.logs)"
                )
        elif key == "groups":
            if storage.groups is not None:
                out[key] = storage.groups.purge
            else:
                problems[GroupRepository] = missing_capability(
                    storage, storage, GroupRepository, "purging saved groups (storage.retention.groups)"
                )
        elif isinstance(tasks, TaskMaintenance):
            out[key] = functools.partial(tasks.purge, TaskStatus(key))
        else:
            problems[TaskMaintenance] = missing_capability(
                storage, tasks, TaskMaintenance, "purging tasks (storage.retention)"
            )
    if problems:
        raise ConfigError(list(problems.values()))
    return out
