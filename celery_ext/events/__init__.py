"""Events: ``Event`` (the model), ``EventBus`` (the one bus class), the ``Transport`` ABC that
moves events between processes, and ``build_event_bus(config)``.

Built-in transports (``events.type``): ``local`` (in process), ``kombu`` (fanout exchange on the
broker), ``redis`` (Redis Streams with consumer groups).  Third parties subclass ``Transport`` and
register it under the ``celery_ext.eventbus`` entry-point group or name it as ``module:Class``.
"""

from __future__ import annotations

from celery_ext.config import Config
from celery_ext.events.base import EventBus
from celery_ext.events.model import (
    ALL,
    CONFIG_RELOADED,
    EVENT_TYPES,
    SCHEDULER_LEADER_CHANGED,
    TASK_CANCELLED,
    TASK_COMPLETED,
    TASK_CREATED,
    TASK_FAILED,
    TASK_PROGRESS,
    TASK_QUEUED,
    TASK_RETRYING,
    TASK_STARTED,
    WORKER_OFFLINE,
    WORKER_ONLINE,
    Event,
    Handler,
)
from celery_ext.events.transport import Receive, Transport
from celery_ext.registry import EVENT_BUSES

__all__ = [
    "ALL",
    "CONFIG_RELOADED",
    "EVENT_TYPES",
    "SCHEDULER_LEADER_CHANGED",
    "TASK_CANCELLED",
    "TASK_COMPLETED",
    "TASK_CREATED",
    "TASK_FAILED",
    "TASK_PROGRESS",
    "TASK_QUEUED",
    "TASK_RETRYING",
    "TASK_STARTED",
    "WORKER_OFFLINE",
    "WORKER_ONLINE",
    "Event",
    "EventBus",
    "Handler",
    "Receive",
    "Transport",
    "build_event_bus",
]


def build_event_bus(config: Config, broker_url: str) -> EventBus:
    """A bus over the transport named by ``events.type``; builds no connection (they open on
    first use)."""
    cls = EVENT_BUSES.resolve(config.events.type, "events.type")
    transport: Transport = cls(config.events.config, app_name=config.app.name, broker_url=broker_url)
    return EventBus(transport)
