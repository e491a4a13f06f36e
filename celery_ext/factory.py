"""``create_app(config)``: the one place that wires celery_ext's parts into a Celery app.

(Named ``factory`` rather than ``app`` so that ``celery_ext.app`` can be the Celery instance that
``celery -A celery_ext`` looks for.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery
from kombu import Queue

from celery_ext.config import Config, load_config
from celery_ext.dispatch import Dispatcher, queue_name
from celery_ext.embedded import ensure_embedded_redis
from celery_ext.executors.pool import ExecutorSet
from celery_ext.executors.task import register_task_types
from celery_ext.manager import TaskManager
from celery_ext.routing.router import TaskRouter
from celery_ext.runner import TaskRunner
from celery_ext.storage import Storage, open_storage


@dataclass
class Runtime:
    """Everything one process of celery_ext holds; reachable as ``app.celery_ext``."""

    config: Config
    celery: Celery
    broker_url: str
    storage: Storage
    executors: ExecutorSet
    dispatcher: Dispatcher
    runner: TaskRunner
    manager: TaskManager
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir


def broker_url_for(config: Config) -> str:
    return config.broker.url or ensure_embedded_redis(config.data_dir)


def celery_settings(config: Config, broker_url: str, task_types: list[str]) -> dict[str, Any]:
    prefix = config.app.name
    is_redis = broker_url.startswith(("redis", "rediss"))
    transport: dict[str, Any] = {"visibility_timeout": config.broker.visibility_timeout}
    if is_redis:
        transport.update(priority_steps=list(range(10)), sep=":", queue_order_strategy="priority")
    transport.update(config.broker.transport_options)
    queues = [Queue(queue_name(prefix, t), routing_key=queue_name(prefix, t)) for t in task_types]
    return {
        "broker_url": broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": transport,
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_ignore_result": True,
        "task_default_queue": queue_name(prefix, "default"),
        "task_queues": queues + [Queue(queue_name(prefix, "default"))],
        "task_queue_max_priority": None if is_redis else 10,
        "task_routes": (TaskRouter(prefix, task_types),),
        "worker_concurrency": config.worker.capacity,
        "worker_pool": config.worker.pool,
        "timezone": "UTC",
        "enable_utc": True,
    }


def create_app(config: Config | None = None, *, config_path: str | os.PathLike[str] | None = None) -> Celery:
    """Build a configured Celery app with celery_ext's tasks, router and worker bootstep."""
    from celery_ext.worker import install_worker_steps

    config = config or load_config(config_path)
    executors = ExecutorSet.from_config(config)
    storage = open_storage(config.storage, config.data_dir)
    broker_url = broker_url_for(config)
    app = Celery(config.app.name, set_as_current=False)
    app.conf.update(celery_settings(config, broker_url, executors.task_types))
    register_task_types(app, executors.task_types)
    dispatcher = Dispatcher(app, hard_timeout_grace=config.worker.hard_timeout_grace,
                            redis_priorities=broker_url.startswith("redis"))
    runtime = Runtime(
        config=config,
        celery=app,
        broker_url=broker_url,
        storage=storage,
        executors=executors,
        dispatcher=dispatcher,
        runner=TaskRunner(storage, executors, dispatcher, config.worker),
        manager=TaskManager(config, storage, executors, dispatcher),
    )
    app.celery_ext = runtime  # type: ignore[attr-defined]
    install_worker_steps(app)
    return app


_default: Celery | None = None


def default_app() -> Celery:
    """The app ``celery -A celery_ext`` runs: built from config on first use, then cached."""
    global _default
    if _default is None:
        _default = create_app()
    return _default
