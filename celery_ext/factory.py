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


EMBEDDED_URL = "redis://localhost/0"


def broker_for(config: Config) -> tuple[str, dict[str, Any]]:
    """The broker URL and extra transport options (the embedded broker is a unix socket)."""
    if config.broker.url:
        return config.broker.url, {}
    return EMBEDDED_URL, {"unix_socket_path": ensure_embedded_redis(config.data_dir)}


def celery_settings(config: Config, task_types: list[str]) -> dict[str, Any]:
    prefix = config.app.name
    broker_url, extra_options = broker_for(config)
    is_redis = broker_url.startswith(("redis://", "rediss://"))
    transport: dict[str, Any] = {"visibility_timeout": config.broker.visibility_timeout, **extra_options}
    if is_redis:
        transport.update(priority_steps=list(range(10)), sep=":", queue_order_strategy="priority")
    transport.update(config.broker.transport_options)
    queues = [Queue(queue_name(prefix, t), routing_key=queue_name(prefix, t)) for t in task_types]
    return {
        "broker_url": broker_url,
        # A Redis transport that drops undecodable queue entries instead of dying on them.
        "broker_transport": "celery_ext.transport:Transport" if is_redis else None,
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
        "task_routes": (TaskRouter.from_config(config, broker_url, task_types, transport),),
        "worker_concurrency": config.worker.capacity,
        "worker_pool": config.worker.pool,
        "timezone": "UTC",
        "enable_utc": True,
    }


def create_app(config: Config | None = None, *, config_path: str | os.PathLike[str] | None = None) -> Celery:
    """Build a configured Celery app with celery_ext's tasks, router and worker bootstep."""
    from celery_ext.events.bridge import install as install_events
    from celery_ext.worker import install_worker_steps

    config = config or load_config(config_path)
    executors = ExecutorSet.from_config(config)
    storage = open_storage(config.storage, config.data_dir)
    app = Celery(config.app.name, set_as_current=False)
    app.conf.update(celery_settings(config, executors.task_types))
    broker_url = describe_broker(app)
    register_task_types(app, executors.task_types)
    dispatcher = Dispatcher(app, hard_timeout_grace=config.worker.hard_timeout_grace,
                            redis_priorities=str(app.conf.broker_url).startswith(("redis://", "rediss://")))
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
    install_events(runtime)
    install_worker_steps(app)
    return app


def describe_broker(app: Celery) -> str:
    """The broker as users should read it (the embedded one by its socket)."""
    socket = app.conf.broker_transport_options.get("unix_socket_path")
    return f"redis+socket://{socket}" if socket else str(app.conf.broker_url)


_default: Celery | None = None


def default_app() -> Celery:
    """The app ``celery -A celery_ext`` runs: built from config on first use, then cached."""
    global _default
    if _default is None:
        _default = create_app()
    return _default
