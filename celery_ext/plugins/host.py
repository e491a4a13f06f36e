"""``PluginHostStep``: the worker bootstep that hosts plugins, the event hub and worker events
(``PluginHost``, the service it starts and stops).

Before the pool forks (the step's ``__init__``): the metrics collector prepares its multiprocess
directory, the pipe that carries pool children's events to this process is made, and plugins are
loaded and initialized.  On start: plugins start with a ``PluginContext`` and ``worker_online``
is published; on stop: ``worker_offline``, plugins stop in reverse order, the bus is flushed.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, bootsteps
from celery.signals import worker_process_init, worker_process_shutdown

from celery_ext.events.hub import ProcessHub
from celery_ext.events.model import WORKER_OFFLINE, WORKER_ONLINE, Event
from celery_ext.plugins.base import PluginContext
from celery_ext.plugins.manager import PluginManager
from celery_ext.runtime import Runtime, runtime_of

logger = logging.getLogger("celery_ext.plugins")


class PluginHostStep(bootsteps.StartStopStep):
    label = "celery_ext plugins"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        prefork = getattr(worker, "pool_cls", None) is None or "prefork" in str(worker.pool_cls).lower()
        self.host = PluginHost(runtime_of(worker.app), worker, prefork)  # before the pool forks

    def start(self, worker: Any) -> None:
        self.host.start()

    def stop(self, worker: Any) -> None:
        self.host.stop()


class PluginHost:
    """The plugins of one worker, the event hub of its pool, and its ``worker_online`` /
    ``worker_offline`` events.  Built before the pool forks (the metrics' multiprocess directory,
    the hub's pipe, the plugins loaded and initialized); started and stopped by the step."""

    def __init__(self, rt: Runtime, worker: Any, prefork: bool) -> None:
        self.rt, self.worker_id = rt, worker.hostname
        self.bus, self.metrics = rt.bus, rt.metrics
        self.metrics.startup()
        self.hub = ProcessHub() if prefork else None
        rt.worker.event_hub = self.hub
        self.plugins = PluginManager()
        self.plugins.load(rt.config.plugins)
        rt.worker.plugins = self.plugins
        self.ctx = PluginContext(
            events=self.bus,
            metrics=self.metrics,
            storage=rt.storage,
            config=rt.config,
            worker_id=worker.hostname,
            app=worker.app,
            extras={"worker": worker},
        )
        rt.worker.plugin_context = self.ctx  # a config reload restarts the plugins with it

    def start(self) -> None:
        if self.hub is not None:
            self.hub.start(self.bus)
        self.plugins.start_all(self.ctx)
        self.metrics.worker_registered(self.worker_id)
        self.bus.publish(
            Event(
                WORKER_ONLINE,
                worker_id=self.worker_id,
                data={"plugins": self.plugins.running, "failed_plugins": self.plugins.failures},
            )
        )

    def stop(self) -> None:
        self.metrics.worker_offline(self.worker_id)
        self.bus.publish(Event(WORKER_OFFLINE, worker_id=self.worker_id, data={"reason": "shutdown"}))
        # Let plugins see the last events (worker_offline included) before they stop.
        self.bus.flush(5.0)
        # The plugins a config reload started, if any (celery_ext/reload.py).
        (self.rt.worker.plugins or self.plugins).stop_all(self.ctx)
        self.bus.close(5.0)
        self.metrics.shutdown()
        if self.hub is not None:
            self.hub.close()


def install_plugin_host(app: Celery) -> None:
    """Add the step, and make each pool child forward its events to the main process."""
    app.steps["worker"].add(PluginHostStep)

    def child_init(**_: Any) -> None:
        rt = runtime_of(app)
        if rt.worker.event_hub is not None:
            rt.worker.event_hub.attach_child(rt.bus)

    def child_exit(**_: Any) -> None:
        # A child replaced after --max-tasks-per-child still holds its last events (batched) and
        # the counts of tasks its tasks created (metrics.cluster).
        rt = runtime_of(app)
        rt.bus.flush(2.0)
        rt.metrics.flush()

    worker_process_init.connect(child_init, weak=False, dispatch_uid=f"celery_ext.events_child.{id(app)}")
    worker_process_shutdown.connect(child_exit, weak=False, dispatch_uid=f"celery_ext.events_exit.{id(app)}")
