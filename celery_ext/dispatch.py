"""Publishing task messages: the one place that turns a record into a Celery message."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery

from celery_ext.model import Task

MAX_PRIORITY = 9


@dataclass(frozen=True, slots=True)
class Dispatch:
    """One message to publish: the record, its dispatch token and attempt, and a delay."""

    task: Task
    token: str
    attempt: int
    countdown: float | None = None


def queue_name(prefix: str, task_type: str) -> str:
    """The shared queue of a task type."""
    return f"{prefix}.{task_type}"


def message_kwargs(d: Dispatch) -> dict[str, Any]:
    t = d.task
    return {
        "task_id": t.task_id,
        "token": d.token,
        "attempt": d.attempt,
        "payload": t.payload,
        "max_retries": t.max_retries,
        "timeout": t.timeout,
        # For the router (consistent_hash); the worker ignores it.
        **({"idempotency_key": t.idempotency_key} if t.idempotency_key else {}),
    }


class Dispatcher:
    """Publishes messages over the app's producer pool; routing is the app's ``task_routes``."""

    def __init__(self, app: Celery, *, hard_timeout_grace: float, redis_priorities: bool) -> None:
        self.app = app
        self.grace = hard_timeout_grace
        # Redis consumes priority 0 first, AMQP the highest number first; ours is AMQP's order.
        self.redis_priorities = redis_priorities

    def options(self, d: Dispatch) -> dict[str, Any]:
        t = d.task
        priority = max(0, min(MAX_PRIORITY, t.priority))
        opts: dict[str, Any] = {
            "task_id": t.task_id,
            "kwargs": message_kwargs(d),
            "priority": MAX_PRIORITY - priority if self.redis_priorities else priority,
            "ignore_result": True,
        }
        if d.countdown:
            opts["countdown"] = d.countdown
        if t.timeout:
            opts["soft_time_limit"] = t.timeout
            opts["time_limit"] = t.timeout + self.grace
        return opts

    def publish(self, d: Dispatch) -> None:
        self.app.send_task(d.task.task_type, **self.options(d))

    def publish_many(self, batch: Sequence[Dispatch]) -> None:
        with self.app.producer_or_acquire() as producer:
            for d in batch:
                self.app.send_task(d.task.task_type, producer=producer, **self.options(d))
