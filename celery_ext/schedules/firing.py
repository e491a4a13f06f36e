"""Firing due schedules: the scheduler leader's part.

``fire_due`` runs every round: for each due schedule, first ``advance`` it (conditional on the
fire time read, and fenced with the leader's token: of two leaders, or a deposed one acting late,
exactly one moves it), then submit its task under the idempotency key ``schedule:<name>:<fire
time>`` (``fire_key``): a second submit of the same fire returns the first task.  A leader that
dies between the two leaves the fire recorded without a task (``last_task_id`` empty);
``resubmit_last``, called by a scheduler when it becomes the leader, submits it under the same key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from celery_ext.errors import PublishError
from celery_ext.schedules.model import GRACE, Schedule, fire_key

if TYPE_CHECKING:
    from celery_ext.manager import TaskManager
    from celery_ext.storage.base import Fence, Storage

logger = logging.getLogger("celery_ext.schedules")


@dataclass(frozen=True, slots=True)
class FiredSchedule:
    """One fire, for the caller's ``schedule_fired`` event."""

    schedule: str
    fire_at: datetime
    task_type: str
    # None: the submit failed (``error``); the fire stays recorded for ``resubmit_last``.
    task_id: str | None
    # False: the task of this fire existed already (another leader, or an earlier attempt, made it).
    created: bool
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule,
            "fire_at": self.fire_at.isoformat(),
            "task_type": self.task_type,
            "task_id": self.task_id,
            "created": self.created,
            "error": self.error,
        }


def fire_due(
    storage: Storage, manager: TaskManager, fence: Fence, now: datetime, limit: int = 100, *, grace: float = GRACE
) -> list[FiredSchedule]:
    """Fire the schedules due at ``now`` (at most ``limit``), as the leader holding ``fence``.
    Returns the fires this call made; a schedule another leader advanced first is left out, and
    so are missed times skipped by ``catch_up: skip``."""
    fired = []
    for schedule in storage.schedules.due(now, limit):
        expected = schedule.next_fire_at
        try:
            fire_at, upcoming = schedule.plan(now, grace)
        except (ValueError, KeyError) as exc:  # e.g. its time zone is gone from this machine
            logger.warning("schedule %s: cannot compute its fire times: %s", schedule.name, exc)
            continue
        if expected is None or not storage.schedules.advance(schedule.name, expected, upcoming, fire_at, fence):
            continue  # another leader fired it, or this one is deposed
        if fire_at is None:
            logger.warning(
                "schedule %s: skipped the fire times missed since %s (catch_up: skip); next at %s",
                schedule.name,
                expected.isoformat(),
                upcoming.isoformat(),
            )
            continue
        fired.append(_submit(storage, manager, fence, schedule, fire_at))
    return fired


def resubmit_last(storage: Storage, manager: TaskManager, fence: Fence) -> list[FiredSchedule]:
    """Submit again each schedule's last fire that has no task recorded (a leader died between
    advancing the schedule and submitting, or the submit failed), under the same idempotency key:
    a fire whose task exists gets that task back (``created`` False) and nothing new."""
    return [
        _submit(storage, manager, fence, s, s.last_fire_at)
        for s in storage.schedules.list()
        if s.last_fire_at is not None and s.last_task_id is None
    ]


def _submit(
    storage: Storage, manager: TaskManager, fence: Fence, schedule: Schedule, fire_at: datetime
) -> FiredSchedule:
    spec = {
        "task_type": schedule.task_type,
        "payload": schedule.payload,
        "priority": schedule.priority,
        "max_retries": schedule.max_retries,
        "timeout": schedule.timeout,
        "idempotency_key": fire_key(schedule.name, fire_at),
    }
    try:
        built = manager.build_specs([spec])
        task_id = manager.submit_built(built)[0].task_id
        created = task_id == built[0][0].task_id  # else the key's earlier task came back
    except PublishError as exc:
        task_id, created = exc.task_id, True  # recorded as pending: the scheduler publishes it later
    except Exception as exc:  # noqa: BLE001 - one schedule's failure must not stop the others
        logger.warning("schedule %s: submitting the fire of %s failed: %s", schedule.name, fire_at.isoformat(), exc)
        return FiredSchedule(
            schedule.name, fire_at, schedule.task_type, None, False, f"{exc.__class__.__name__}: {exc}"
        )
    storage.schedules.fired(schedule.name, fire_at, task_id, fence)
    return FiredSchedule(schedule.name, fire_at, schedule.task_type, task_id, created)
