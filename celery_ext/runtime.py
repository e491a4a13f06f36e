"""``Runtime``: everything one process of celery_ext holds, typed, built once by ``factory.create_app``.

``create_app`` (the composition root, ``celery_ext/factory.py``) makes each part in order, giving
it what it needs when it is built: config, storage, event bus, metrics, observer, worker
registry (told whom to call when a worker goes offline), router, lifecycle (with the observer),
dispatcher, runner, manager.  Nothing looks a part up by name afterwards: the Celery side reaches
the runtime through ``runtime_of(app)`` (one attribute of the Celery app: a Celery task, a
bootstep and a signal handler are given the app, not the runtime), and reads typed fields.

The only state set after construction is a worker's own (``WorkerState``): its bootsteps fill it
before the pool forks, so pool children see it; a client process never does.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery
from kombu import pools

from celery_ext.config import Config
from celery_ext.dispatch import Dispatcher
from celery_ext.events.base import EventBus
from celery_ext.events.bridge import EventBridge
from celery_ext.events.hub import ProcessHub
from celery_ext.executors.pool import ExecutorSet
from celery_ext.lifecycle import Lifecycle
from celery_ext.manager import TaskManager
from celery_ext.metrics import MetricsCollector
from celery_ext.plugins.base import PluginContext
from celery_ext.plugins.manager import PluginManager
from celery_ext.routing.router import TaskRouter
from celery_ext.routing.seat import Seat
from celery_ext.routing.workers import WorkerRegistry
from celery_ext.runner import TaskRunner
from celery_ext.storage import Storage

logger = logging.getLogger("celery_ext")


@dataclass(eq=False)
class WorkerState:
    """What a worker's bootsteps add to its runtime, before the pool forks (all None in a client)."""

    #: The types this worker runs (``worker.supported_types``; a config reload changes them).
    supported_types: frozenset[str] | None = None
    #: Its place in the registry (``routing/heartbeat.py``), None without a registry.
    seat: Seat | None = None
    #: The plugins running, and the context they run with (a config reload replaces the plugins).
    plugins: PluginManager | None = None
    plugin_context: PluginContext | None = None
    #: The pipe that carries pool children's events to the main process (prefork pool only).
    event_hub: ProcessHub | None = None


@dataclass(frozen=True, eq=False)
class Runtime:
    """One process's celery_ext, reachable from its Celery app as ``runtime_of(app)``."""

    config: Config
    celery: Celery
    broker_url: str
    storage: Storage
    bus: EventBus
    metrics: MetricsCollector
    observer: EventBridge
    #: The worker registry in Redis (None: a broker that is not Redis and no ``registry_url``).
    registry: WorkerRegistry | None
    router: TaskRouter
    executors: ExecutorSet
    dispatcher: Dispatcher
    lifecycle: Lifecycle
    runner: TaskRunner
    manager: TaskManager
    worker: WorkerState = field(default_factory=WorkerState)
    _closed: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self, timeout: float = 5.0) -> None:
        """The end of a process that used this runtime (the CLI, the REST API, the scheduler, a
        program that submits tasks): send the events still queued (up to ``timeout`` seconds)
        and the metric counts held (``metrics.cluster``), then release connections: event
        transport, completion listener, router, executors, storage pools, the broker connection
        pool.  Idempotent; a failing part is logged and the others still close.  A worker's
        parts are closed by its bootsteps (``worker.py``)."""
        if self._closed.is_set():
            return
        self._closed.set()
        parts: list[tuple[str, Callable[[], object]]] = [
            ("event bus", functools.partial(self.bus.close, timeout)),
            ("metrics", self.metrics.flush),
            ("completion listener", self.lifecycle.completion.close),
            ("router", self.router.close),
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


def runtime_of(app: Celery) -> Runtime:
    """The runtime a celery_ext app was built with (``create_app`` sets it); ``LookupError`` for
    any other Celery app."""
    rt = getattr(app, "celery_ext", None)
    if not isinstance(rt, Runtime):
        raise LookupError(f"{app!r} is not a celery_ext app (made by celery_ext.create_app)")
    return rt
