"""``create_app(config)``: the composition root, the one place that wires celery_ext's parts into a
Celery app (docs/architecture.md, "how the pieces fit").

It builds each part once, in order, handing it what it needs when it is built, and holds them
in one typed ``Runtime`` (``celery_ext/runtime.py``), reachable from the app as ``runtime_of(app)``:

    config -> storage -> event bus, metrics -> observer (events and metrics of every transition)
           -> worker registry (on_offline: the observer) -> router (over the registry)
           -> Celery app (settings, task types, the result backend) -> dispatcher
           -> lifecycle (storage, completion, observer, task holds) -> runner, manager
           -> worker bootsteps (they run only in ``celery worker``)

(Named ``factory`` rather than ``app`` so that ``celery_ext.app`` can be the Celery instance that
``celery -A celery_ext`` looks for.)
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Mapping
from typing import Any

from celery import Celery
from celery._state import get_current_app, get_current_task
from kombu import Exchange, Queue

from celery_ext.completion import Completion
from celery_ext.config import Config, load_config
from celery_ext.dispatch import Dispatcher, plain_queues, queue_name
from celery_ext.embedded import ensure_embedded_redis
from celery_ext.events import build_event_bus
from celery_ext.events.bridge import EventBridge
from celery_ext.executors.pool import ExecutorSet
from celery_ext.lifecycle import Lifecycle
from celery_ext.manager import TaskManager
from celery_ext.metrics import build_metrics
from celery_ext.routing.router import TaskRouter, registry_url_for
from celery_ext.routing.workers import WorkerRegistry
from celery_ext.runner import TaskRunner
from celery_ext.runtime import Runtime
from celery_ext.storage import open_storage
from celery_ext.task import register_task_types
from celery_ext.transport import install as install_transport
from celery_ext.transport import is_redis_url
from celery_ext.worker import install_worker_steps

logger = logging.getLogger("celery_ext")


def broker_for(config: Config) -> tuple[str, dict[str, Any]]:
    """The broker URL and extra transport options: ``broker.url``, else the embedded broker as
    ``redis+socket://<socket path>``.  Installs celery_ext's Redis transport under kombu's Redis
    schemes (``celery_ext.transport.install``), so the URL keeps its standard scheme."""
    install_transport()
    if config.broker.url:
        return config.broker.url, {}
    return f"redis+socket://{ensure_embedded_redis(config.data_dir)}", {}


def transport_options(config: Config, broker_url: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``broker_transport_options``: celery_ext's (priorities on Redis), then ``broker.transport_options``."""
    transport: dict[str, Any] = {"visibility_timeout": config.broker.visibility_timeout, **(extra or {})}
    if is_redis_url(broker_url):
        transport.update(priority_steps=list(range(10)), sep=":", queue_order_strategy="priority")
    transport.update(config.broker.transport_options)
    return transport


def celery_settings(
    config: Config, task_types: list[str], broker_url: str, transport: dict[str, Any], router: TaskRouter
) -> dict[str, Any]:
    prefix = config.app.name
    is_redis = is_redis_url(broker_url)
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
        # Each on an exchange of its own name with its name as routing key, as Celery declares
        # "celery": a Queue without them is bound to the default exchange and key, so every
        # message for this app's default queue would also be copied into "celery", which every
        # app's workers on the broker consume (a second run, or another app's).
        "task_queues": queues + [Queue(q, Exchange(q, type="direct"), routing_key=q) for q in plain_queues(config)],
        "task_queue_max_priority": None if is_redis else 10,
        "task_routes": (router,),
        # Checks every task message before Celery parses it: no message can stop or wedge a
        # worker (celery_ext/guard.py).
        "worker_consumer": "celery_ext.guard:GuardedConsumer",
        "worker_concurrency": config.worker.capacity,
        "worker_pool": config.worker.pool,
        "timezone": "UTC",
        "enable_utc": True,
    }


def create_app(config: Config | None = None, *, config_path: str | os.PathLike[str] | None = None) -> Celery:
    """Build a configured Celery app with celery_ext's tasks, router and worker bootsteps (the
    order is the module doc's)."""
    config = config or load_config(config_path)
    executors = ExecutorSet.from_config(config)
    storage = open_storage(config.storage, config.data_dir)
    broker_url, extra_options = broker_for(config)
    transport = transport_options(config, broker_url, extra_options)
    bus = build_event_bus(config, broker_url)
    metrics = build_metrics(config)
    observer = EventBridge(bus, metrics)
    registry_url = registry_url_for(config, broker_url)
    registry = None
    if registry_url is not None:
        metrics.share_counters(registry_url, config.app.name)  # producers' counts reach the leader
        registry = WorkerRegistry.from_url(
            registry_url, config.app.name, lambda info: observer.worker_offline(info.id, "heartbeat_expired")
        )
    router = TaskRouter.from_config(config, executors.task_types, registry, broker_url, transport)
    app = Celery(config.app.name, set_as_current=False)
    app.conf.update(celery_settings(config, executors.task_types, broker_url, transport, router))
    register_task_types(app, executors.task_types)
    app.loader.override_backends["celery_ext"] = "celery_ext.backend:RecordBackend"
    dispatcher = Dispatcher(
        app,
        hard_timeout_grace=config.worker.hard_timeout_grace,
        redis_priorities=is_redis_url(broker_url),
        router=router,
    )
    lifecycle = Lifecycle(
        storage,
        Completion(registry_url, config.app.name),  # the registry's Redis (none: waiters poll)
        observer,
        # Spooled outcomes are held in the registry, so recovery leaves their tasks be.
        holds=registry.holds(config.worker.task_lease) if registry is not None else None,
        # Redis: a record whose message never went out is found by looking into the queues.
        queued_before_publish=is_redis_url(broker_url),
    )
    runtime = Runtime(
        config=config,
        celery=app,
        broker_url=broker_url,
        storage=storage,
        bus=bus,
        metrics=metrics,
        observer=observer,
        registry=registry,
        router=router,
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
            kept_for=_kept_for(config),
        ),
        manager=TaskManager(config, lifecycle, executors, dispatcher, router),
    )
    app.celery_ext = runtime  # type: ignore[attr-defined]
    install_worker_steps(app)
    global _latest
    _latest = weakref.ref(app)
    return app


def completion_for(config: Config, broker_url: str) -> Completion:
    """Where terminal records are announced (the worker registry's Redis; none: waiters poll)."""
    return Completion(registry_url_for(config, broker_url), config.app.name)


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
    task = get_current_task()
    for app in (getattr(task, "app", None), get_current_app(), _latest() if _latest is not None else None):
        if app is not None and getattr(app, "celery_ext", None) is not None:
            return app
    return default_app()


def _kept_for(config: Config) -> float | None:
    """How long the shortest-kept finished record is kept (``storage.retention``), or None."""
    r = config.storage.retention
    kept = [d for d in (r.succeeded, r.failed, r.cancelled, r.dead) if d is not None]
    return min(kept) if kept else None
