"""``Event``: what the event bus carries, and the names of the event types celery_ext publishes.

An event is a small immutable record that travels as JSON; it knows nothing of buses, threads
or transports (``celery_ext.events.base.EventBus`` carries it, a ``Transport`` moves it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from celery_ext.model import new_id

TASK_CREATED = "task_created"
TASK_QUEUED = "task_queued"
TASK_STARTED = "task_started"
TASK_RETRYING = "task_retrying"
TASK_COMPLETED = "task_completed"
TASK_FAILED = "task_failed"
TASK_CANCELLED = "task_cancelled"
TASK_SCHEDULED = "task_scheduled"
TASK_PROGRESS = "task_progress"
SCHEDULE_FIRED = "schedule_fired"
WORKER_ONLINE = "worker_online"
WORKER_OFFLINE = "worker_offline"
SCHEDULER_LEADER_CHANGED = "scheduler_leader_changed"
CONFIG_RELOADED = "config_reloaded"
EVENT_TYPES = frozenset(
    {
        TASK_CREATED,
        TASK_QUEUED,
        TASK_STARTED,
        TASK_RETRYING,
        TASK_COMPLETED,
        TASK_FAILED,
        TASK_CANCELLED,
        TASK_SCHEDULED,
        TASK_PROGRESS,
        SCHEDULE_FIRED,
        WORKER_ONLINE,
        WORKER_OFFLINE,
        SCHEDULER_LEADER_CHANGED,
        CONFIG_RELOADED,
    }
)
ALL = "*"  # subscribe to every event type

Handler = Callable[["Event"], None]


@dataclass(frozen=True, slots=True)
class Event:
    type: str
    task_id: str | None = None
    worker_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    timestamp: float = field(default_factory=time.time)
    id: str = field(default_factory=new_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "task_id": self.task_id,
            "worker_id": self.worker_id,
            "data": self.data,
            "timestamp": self.timestamp,
            "id": self.id,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), default=str)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Event:
        if not isinstance(d.get("type"), str):
            raise ValueError(f"not an event: {dict(d)!r:.200}")
        return cls(
            d["type"],
            d.get("task_id"),
            d.get("worker_id"),
            dict(d.get("data") or {}),
            float(d.get("timestamp") or time.time()),
            str(d.get("id") or new_id()),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Event:
        return cls.from_dict(json.loads(text))
