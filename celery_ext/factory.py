"""``create_app(config)``: the one place that wires celery_ext's parts into a Celery app.

(Named ``factory`` rather than ``app`` so that ``celery_ext.app`` can be the Celery instance that
``celery -A celery_ext`` looks for.)
"""

from __future__ import annotations

import functools
import logging
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery
from kombu import Queue

from celery_ext.completion import Completion
from celery_ext.config import Config, load_config
from celery_ext.dispatch import Dispatcher, plain_queues, queue_name
from celery_ext.embedded import ensure_embedded_redis
from celery_ext.executors.pool import ExecutorSet
from celery_ext.executors.task import register_task_types
from celery_ext.lifecycle import Lifecycle
from celery_ext.manager import TaskManager
from celery_ext.routing.router import TaskRouter, registry_url_for, router_of
from celery_ext.runner import TaskRunner
from celery_ext.storage import Storage, open_storage
from celery_ext.transport import install as install_transport
from celery_ext.transport import is_redis_url

logger = logging.getLogger("celery_ext")


@dataclass
class Runtime:
    """Everything one process of celery_ext holds; reachable as ``app.celery_ext``."""

    config: Config
    celery: Celery
    broker_url: str
    storage: Storage
    executors: ExecutorSet
    dispatcher: Dispatcher
    lifecycle: Lifecycle
    runner: TaskRunner
    manager: TaskManager
    extras: dict[str, Any] = field(default_factory=dict)
    closed: bool = field(default=False, init=False, repr=False)

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir

    def close(self, timeout: float = 5.0) -> None:
        """The end of a process that used this runtime (the CLI, the REST API, the scheduler, a
        program that submits tasks): send the events still queued (up to ``timeout`` seconds)
        and the metric counts held (``metrics.cluster``), then release connections: event
        transport, completion listener, router, executors, storage pools, the broker connection
        pool.  Idempotent; a failing part is logged and the others still close.  A worker's
        parts are closed by its bootsteps (``worker.py``)."""
        if self.closed:
            return
        self.closed = True
        parts: list[tuple[str, Callable[[], object]]] = []
        bus = self.extras.get("events")
        if bus is not None:
            parts.append(("event bus", functools.partial(bus.close, timeout)))
        metrics = self.extras.get("metrics")
        if metrics is not None:
            parts.append(("metrics", metrics.flush))
        parts += [
            ("completion listener", self.lifecycle.completion.close),
            ("router", lambda: router_of(self.celery).close()),
            ("executors", self.executors.close),
            ("storage", self.storage.close),
            ("broker connections", self._close_broker_pool),
        ]
        for name, close in parts:
            try:
                close()
            except Exception:  # noqa: BLE001 - close the other parts anyway
                logger.exception("closing the %s failed", name)

    def _close_broker_pool(self) -> None:
        """Close this app's broker connections.  Celery takes its pools from kombu's process-wide
        groups, keyed by the broker URL, so they also leave those groups: another app of this
        process on the same broker (a test, a program with two configs) gets fresh pools instead
        of closed ones ("Acquire on closed pool")."""
        from kombu import pools

        app: Any = self.celery
        pool: Any = getattr(app, "_pool", None)  # Celery makes its pool on first publish
        if pool is None:
            return
        for group in (pools.producers, pools.connections):
            for key, value in list(dict.items(group)):
                if value is pool or getattr(value, "connections", None) is pool:
                    dict.__delitem__(group, key)
        pool.force_close_all()
        app._pool = None
        app.amqp._producer_pool = None


def broker_for(config: Config) -> tuple[str, dict[str, Any]]:
    """The broker URL and extra transport options: ``broker.url``, else the embedded broker as
    ``redis+socket://<socket path>``.  Installs celery_ext's Redis transport under kombu's Redis
    schemes (``celery_ext.transport.install``), so the URL keeps its standard scheme."""
    install_transport()
    if config.broker.url:
        return config.broker.url, {}
    return f"redis+socket://{ensure_embedded_redis(config.data_dir)}", {}


def celery_settings(config: Config, task_types: list[str]) -> dict[str, Any]:
    prefix = config.app.name
    broker_url, extra_options = broker_for(config)
    is_redis = is_redis_url(broker_url)
    transport: dict[str, Any] = {"visibility_timeout": config.broker.visibility_timeout, **extra_options}
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
        # Results are the task records (celery_ext.backend): AsyncResult and Flower read them.
        "result_backend": "celery_ext://",
        "task_ignore_result": False,
        "result_extended": True,
        # This app's own messages that no router places (chord_unlock, plain @app.task) stay in
        # its own default queue; workers also consume worker.celery_queue (Celery's "celery"),
        # where a plain producer's send_task("echo", ...) lands.
        "task_default_queue": queue_name(prefix, "default"),
        "task_queues": queues + [Queue(q) for q in plain_queues(config)],
        "task_queue_max_priority": None if is_redis else 10,
        "task_routes": (TaskRouter.from_config(config, broker_url, task_types, transport),),
        # Checks every task message before Celery parses it: no message can stop or wedge a
        # worker (celery_ext/guard.py).
        "worker_consumer": "celery_ext.guard:GuardedConsumer",
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
    app.loader.override_backends["celery_ext"] = "celery_ext.backend:RecordBackend"
    dispatcher = Dispatcher(
        app, hard_timeout_grace=config.worker.hard_timeout_grace, redis_priorities=is_redis_url(app.conf.broker_url)
    )
    lifecycle = Lifecycle(storage, completion_for(config, str(app.conf.broker_url), app.conf.broker_transport_options))
    runtime = Runtime(
        config=config,
        celery=app,
        broker_url=broker_url,
        storage=storage,
        executors=executors,
        dispatcher=dispatcher,
        lifecycle=lifecycle,
        runner=TaskRunner(
            lifecycle,
            executors,
            dispatcher,
            config.worker,
            default_max_retries=config.worker.default_max_retries,
            default_timeout=config.worker.default_timeout,
            max_countdown=config.scheduler.max_countdown,
        ),
        manager=TaskManager(config, lifecycle, executors, dispatcher),
    )
    app.celery_ext = runtime  # type: ignore[attr-defined]
    install_events(runtime)
    install_worker_steps(app)
    global _latest
    _latest = weakref.ref(app)
    return app


def completion_for(config: Config, broker_url: str, transport_options: dict[str, Any] | None = None) -> Completion:
    """Where terminal records are announced (the worker registry's Redis; none: waiters poll)."""
    return Completion(registry_url_for(config, broker_url, transport_options), config.app.name)


def describe_broker(app: Celery) -> str:
    """The broker URL, with its password (redact it for display): the embedded broker reads
    ``redis+socket:///<data dir>/redis.sock``."""
    return str(app.conf.broker_url)


_default: Celery | None = None
_latest: weakref.ref[Celery] | None = None  # the app create_app built last in this process


def default_app() -> Celery:
    """The app ``celery -A celery_ext`` runs: built from config on first use, then cached."""
    global _default
    if _default is None:
        _default = create_app()
    return _default


def current_app() -> Celery:
    """The celery_ext app in use in this process (what ``@task_type`` functions send with):

    1. in a worker, inside a task: the app of the task being run (the worker's app);
    2. Celery's current app, when it is a celery_ext app (``app.set_current()`` chooses one);
    3. the app ``create_app`` built last (a producer's app; in ``celery -A celery_ext worker``
       the worker's app, which is ``celery_ext.app``);
    4. ``celery_ext.app``, built from ``$CELERY_EXT_CONFIG`` or ``./config.yaml``.
    """
    from celery._state import get_current_app, get_current_task

    task = get_current_task()
    for app in (getattr(task, "app", None), get_current_app(), _latest() if _latest is not None else None):
        if app is not None and getattr(app, "celery_ext", None) is not None:
            return app
    return default_app()
