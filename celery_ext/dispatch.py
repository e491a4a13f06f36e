"""Publishing task messages: the one place that turns a record into a Celery message."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from celery import Celery

from celery_ext.config import Config
from celery_ext.message import ExtHeader
from celery_ext.model import Task

MAX_PRIORITY = 9
PUBLISH_BATCH = 2000  # Redis commands per pipeline round trip in publish_many


@dataclass(frozen=True, slots=True)
class Dispatch:
    """One message to publish: the record, its dispatch token and attempt, and a delay."""

    task: Task
    token: str
    attempt: int
    countdown: float | None = None
    queued_at: datetime | None = None


def queue_name(prefix: str, task_type: str) -> str:
    """The shared queue of a task type."""
    return f"{prefix}.{task_type}"


def ext_header(d: Dispatch) -> ExtHeader:
    return ExtHeader(d.token, d.attempt, d.task.run, d.task.max_retries, d.queued_at, d.task.idempotency_key)


def plain_queues(config: Config) -> list[str]:
    """The queues every worker of this app consumes besides its types': the app's default queue
    and ``worker.celery_queue`` (unless empty)."""
    own = queue_name(config.app.name, "default")
    return [own, *([config.worker.celery_queue] if config.worker.celery_queue not in ("", own) else [])]


class Dispatcher:
    """Publishes messages over the app's producer pool; routing is the app's ``task_routes``.

    A message is a plain Celery message (``message.py``): the payload is its kwargs, the
    celery_ext header carries the dispatch token and attempt, and ``retries`` is the attempt's
    number within the run, so Celery's tools count retries as the record does.
    """

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
            "args": t.args or (),
            "kwargs": t.payload,
            "headers": ext_header(d).to_header(),
            "priority": MAX_PRIORITY - priority if self.redis_priorities else priority,
            "retries": max(0, d.attempt - 1),
        }
        if t.parent_id:
            opts["parent_id"] = t.parent_id
        if t.root_id:
            opts["root_id"] = t.root_id
        if t.group_id:
            opts["group_id"] = t.group_id
        if d.countdown:
            opts["countdown"] = d.countdown
        if t.timeout:
            opts["soft_time_limit"] = t.timeout
            opts["time_limit"] = t.timeout + self.grace
        return opts

    def publish(self, d: Dispatch) -> None:
        self.app.send_task(d.task.task_type, **self.options(d))

    def publish_many(self, batch: Sequence[Dispatch]) -> None:
        """One producer for all; on Redis, kombu's publish batch sends the messages (and their
        task-sent events) through one pipeline, so a batch costs a round trip per
        ``PUBLISH_BATCH`` commands instead of two per message."""
        with self.app.producer_or_acquire() as producer, producer.batch(max_size=PUBLISH_BATCH):
            for d in batch:
                self.app.send_task(d.task.task_type, producer=producer, **self.options(d))
