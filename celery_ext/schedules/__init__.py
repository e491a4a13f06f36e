"""Periodic schedules: tasks fired on a cron expression or every N seconds by the scheduler's leader.

``model``   the ``Schedule`` record, its checks and its fire times (croniter, zoneinfo)
``firing``  ``fire_due`` and ``resubmit_last``: the leader's part, fenced and idempotent
``admin``   adding, removing and pausing schedules; ``sync_config_schedules`` for config.yaml
``beat``    importing a Celery beat schedule

Schedules are stored by the task store (``Storage.schedules``), so they survive restarts.
"""

from __future__ import annotations

from celery_ext.schedules.admin import SyncReport, sync_config_schedules
from celery_ext.schedules.beat import BeatImport, from_beat, load_app
from celery_ext.schedules.firing import FiredSchedule, fire_due, resubmit_last
from celery_ext.schedules.model import Schedule, fire_key

__all__ = [
    "BeatImport",
    "FiredSchedule",
    "Schedule",
    "SyncReport",
    "fire_due",
    "fire_key",
    "from_beat",
    "load_app",
    "resubmit_last",
    "sync_config_schedules",
]
