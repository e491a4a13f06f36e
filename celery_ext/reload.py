"""Live config reload in a worker: it watches its config.yaml and applies what can change live.

The worker's main process polls the file it started from (``YamlConfigLoader.watch``, every
second).  A change that does not validate is logged with every error's YAML path and ignored:
the worker keeps running on its last good config.  A valid change is compared with the running
config, key by key:

  worker.capacity                   the pool grows or shrinks to it (prefork and threads pools),
                                    the prefetch count follows; the registry shows it at the next
                                    heartbeat
  worker.weight                     the registry entry (weighted_round_robin) likewise
  scheduler.load_balance_strategy   the router's balancer is swapped (the worker's router routes
  scheduler.load_balance_config     the retries it publishes)

Anything else (executors, storage, broker, ...) needs a restart: the worker logs the keys that
changed and keeps its running values for them.  ``--capacity`` / ``--weight`` given on the
command line win over the file.  Each applied reload publishes a ``config_reloaded`` event with
what was applied and what waits for a restart.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from celery import bootsteps

from celery_ext.config import Config, YamlConfigLoader
from celery_ext.executors.task import runtime_of
from celery_ext.routing.heartbeat import config_version, seat_of
from celery_ext.routing.router import build_balancer, router_of

logger = logging.getLogger("celery_ext.reload")

LIVE = ("worker.capacity", "worker.weight", "scheduler.load_balance_strategy", "scheduler.load_balance_config")


def changed_paths(old: Config, new: Config) -> list[str]:
    """The YAML paths whose values differ (lists, such as ``executors``, compare whole)."""
    out: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        elif a != b:
            out.append(path)

    walk(old.model_dump(mode="json"), new.model_dump(mode="json"), "")
    return out


def _live(path: str) -> str | None:
    return next((key for key in LIVE if path == key or path.startswith(key + ".")), None)


def _with(config: Config, key: str, value: Any) -> Config:
    section, name = key.split(".", 1)
    updated = getattr(config, section).model_copy(update={name: value})
    return config.model_copy(update={section: updated})


class WorkerReloader:
    """Applies a new config's live keys to a running worker (main process)."""

    def __init__(self, worker: Any, running: Config, pinned: set[str]) -> None:
        self.worker = worker
        self.running = running  # the startup config with the live keys as last applied
        self.pinned = pinned  # keys fixed by the command line

    def apply(self, new: Config) -> tuple[list[str], list[str]]:
        """Returns (applied keys, keys that need a restart)."""
        paths = changed_paths(self.running, new)
        live = sorted({k for p in paths if (k := _live(p)) is not None and k not in self.pinned})
        restart = sorted(p for p in paths if _live(p) is None)
        applied = []
        for key in live:
            value = _value(new, key)
            try:
                self._APPLY[key](self, new, value)
            except Exception as exc:  # noqa: BLE001 - a reload must never stop the worker
                logger.error("config reload: could not apply %s = %r: %s: %s", key, value, exc.__class__.__name__, exc)
                continue
            self.running = _with(self.running, key, value)
            applied.append(key)
        return applied, restart

    def _capacity(self, new: Config, value: int) -> None:
        pool = self.worker.pool
        current = int(getattr(pool, "num_processes", None) or self.worker.concurrency)
        if value > current:
            pool.grow(value - current)
            pool.maintain_pool()  # start the new processes now, not at the pool's next check
        elif value < current:
            pool.shrink(current - value)
        consumer = getattr(self.worker, "consumer", None)
        if consumer is not None and value != current:
            consumer._update_prefetch_count(value - current)  # as Celery's autoscaler does
        self.worker.concurrency = value
        self._seat(capacity=value)

    def _weight(self, new: Config, value: int) -> None:
        self._seat(weight=value)

    def _balancer(self, new: Config, _value: Any) -> None:
        router_of(self.worker.app).set_balancer(build_balancer(new))

    def _seat(self, **changes: Any) -> None:
        seat = seat_of(self.worker.app)
        if seat is not None:
            seat.info = dataclasses.replace(seat.info, **changes)  # published by the next heartbeat

    _APPLY: dict[str, Callable[[WorkerReloader, Config, Any], None]] = {
        "worker.capacity": _capacity,
        "worker.weight": _weight,
        "scheduler.load_balance_strategy": _balancer,
        "scheduler.load_balance_config": _balancer,
    }


class ConfigWatchStep(bootsteps.StartStopStep):
    """Worker step: watch the config file the worker started from and apply live changes."""

    label = "celery_ext.config_watch"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, capacity: int | None = None, weight: int | None = None, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.pinned = {key for key, given in (("worker.capacity", capacity), ("worker.weight", weight)) if given}
        self.stop_watching: Callable[[], None] | None = None

    def start(self, worker: Any) -> None:
        rt = runtime_of(worker.app)
        if not rt.config.source:
            return  # built-in defaults: no file to watch
        loader = YamlConfigLoader(rt.config.source)
        reloader = WorkerReloader(worker, rt.config, self.pinned)

        def on_change(new: Config) -> None:
            # Runs on the worker's event loop: an exception here would stop the worker.
            try:
                apply(new)
            except Exception:  # noqa: BLE001 - keep the running config and the worker
                logger.exception("config %s: could not apply the new config; keeping the running one", rt.config.source)

        def apply(new: Config) -> None:
            applied, restart = reloader.apply(new)
            if restart:
                logger.warning(
                    "config %s changed %s: needs a worker restart to take effect", rt.config.source, ", ".join(restart)
                )
            if not applied:
                return
            logger.warning(
                "config %s reloaded: applied %s",
                rt.config.source,
                ", ".join(f"{k}={_value(reloader.running, k)!r}" for k in applied),
            )
            seat = seat_of(worker.app)
            if seat is not None:
                seat.info = dataclasses.replace(seat.info, config_version=config_version(reloader.running))
            notify = getattr(rt.extras.get("observer"), "config_reloaded", None)
            if notify is not None:
                notify(worker.hostname, applied=applied, restart_needed=restart)

        hub = getattr(worker, "hub", None)
        if hub is None:
            self.stop_watching = loader.watch(on_change)
        else:
            # Applied on the worker's event loop, where the pool may grow (as Celery's autoscaler does).
            self.stop_watching = loader.watch(lambda new: hub.call_soon(on_change, new))

    def stop(self, worker: Any) -> None:
        if self.stop_watching is not None:
            self.stop_watching()
            self.stop_watching = None


def _value(config: Config, key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(getattr(config, section), name)
