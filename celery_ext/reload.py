"""Live config reload in a worker and a scheduler: they watch their config and apply what can change live.

A process watches the source it started from (a config.yaml, or a Redis key: ``ConfigLoader.watch``,
every second) and, with a worker registry, the cluster's config that ``celery-ext config apply``
stores (``celery_ext.config_store``); the last change wins.  A change that does not validate is
logged with every error's YAML path and ignored: the process keeps running on its last good
config.  A valid change is compared with the running config, key by key.  A worker applies:

  worker.capacity                   the pool grows or shrinks to it (prefork and threads pools),
                                    the prefetch count follows; the registry shows it at the next
                                    heartbeat
  worker.weight                     the registry entry (weighted_round_robin) likewise
  worker.supported_types            the shared queues consumed follow (Celery's add/cancel
                                    consumer), and the registry entry
  scheduler.load_balance_strategy   the router's balancer is swapped (the worker's router routes
  scheduler.load_balance_config     the retries it publishes, and publishes it to producers)
  executors                         settings only (timeouts, allowlists, the statement catalog):
                                    the executors are rebuilt; a change of the task types they
                                    provide needs a restart
  plugins                           every plugin is stopped and the new list started (enabled,
                                    disabled, re-configured); a list that does not check is refused
  app.log_level                     the level of the root logger and of task log capture

Executors and the log level live in the pool's processes: after applying them the worker restarts
its pool processes gracefully (each leaves after its current task; in-flight tasks are not
dropped), and the new ones start from the new config.  A scheduler applies the strategy,
``scheduler.interval`` and ``app.log_level``.

Keys a process does not use are taken silently (``IGNORED``: the API's, and the scheduler's own
in a worker that runs no scheduler thread).  Anything else (storage, broker, ...) needs a
restart: the process logs the keys that changed, keeps its running values for them (a key is
applied whole or not at all) and reports them (``restart_needed`` in its registry entry,
``celery-ext config status``).  ``--capacity`` / ``--weight`` / ``--supported-types`` given on the
command line win over the config.  Each reload a worker applies publishes a ``config_reloaded``
event with what was applied and what waits for a restart.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

from celery import bootsteps

from celery_ext.config import ENV_VAR, Config, ConfigLoader, config_version, loader_for
from celery_ext.config_store import RedisConfigLoader, config_key
from celery_ext.dispatch import queue_name
from celery_ext.errors import ConfigError
from celery_ext.executors.pool import ExecutorSet
from celery_ext.plugins.manager import PluginManager, check_plugins
from celery_ext.routing.router import build_balancer, registry_url_for
from celery_ext.runtime import Runtime, runtime_of
from celery_ext.scheduler import Scheduler, scheduler_in_worker

logger = logging.getLogger("celery_ext.reload")


class NeedsRestart(Exception):
    """A key whose new value this process cannot take live (reported, not applied)."""


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


def _with(config: Config, key: str, value: Any) -> Config:
    if "." not in key:
        return config.model_copy(update={key: value})
    section, name = key.split(".", 1)
    updated = getattr(config, section).model_copy(update={name: value})
    return config.model_copy(update={section: updated})


def _value(config: Config, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(config, section), name) if name else getattr(config, section)


def _level(value: str) -> int:
    level = logging.getLevelName(value.upper())
    if not isinstance(level, int):
        raise ConfigError(f"app.log_level: no log level {value!r} (DEBUG, INFO, WARNING, ERROR, CRITICAL)")
    return level


def _set_log_level(value: str) -> None:
    level = _level(value)
    for name in ("", "celery.task"):
        logging.getLogger(name).setLevel(level)


class Reloader:
    """Applies a new config's live keys (``LIVE``: key -> method) to a running process."""

    LIVE: ClassVar[dict[str, str]] = {}
    #: Keys this kind of process does not use: taken as they come, nothing to apply.
    IGNORED: ClassVar[tuple[str, ...]] = ()

    def __init__(self, running: Config, pinned: set[str] | frozenset[str] = frozenset()) -> None:
        self.running = running  # the startup config with the live keys as last applied
        self.pinned = pinned  # keys fixed by the command line
        self.ignored: tuple[str, ...] = self.IGNORED
        self.restart_needed: list[str] = []

    def _live(self, path: str) -> str | None:
        return next((key for key in self.LIVE if path == key or path.startswith(key + ".")), None)

    def _ignored(self, path: str) -> str | None:
        return next((key for key in self.ignored if path == key or path.startswith(key + ".")), None)

    def apply(self, new: Config) -> tuple[list[str], list[str]]:
        """Returns (applied keys, keys that need a restart)."""
        paths = changed_paths(self.running, new)
        for key in sorted({k for p in paths if (k := self._ignored(p)) is not None}):
            self.running = _with(self.running, key, _value(new, key))
        paths = [p for p in paths if self._ignored(p) is None]
        live = sorted({k for p in paths if (k := self._live(p)) is not None and k not in self.pinned})
        restart = sorted(p for p in paths if self._live(p) is None)
        applied = []
        for key in live:
            value = _value(new, key)
            try:
                getattr(self, self.LIVE[key])(new, value)
            except NeedsRestart as exc:
                logger.warning("config reload: %s cannot change live (%s): needs a restart", key, exc)
                restart.append(key)
                continue
            except Exception as exc:  # noqa: BLE001 - a reload must never stop the process
                logger.error("config reload: could not apply %s: %s: %s", key, exc.__class__.__name__, exc)
                continue
            self.running = _with(self.running, key, value)
            applied.append(key)
        self.restart_needed = sorted(restart)
        if applied:
            self.applied(applied)
        return applied, self.restart_needed

    def applied(self, keys: list[str]) -> None:
        """After the keys of one change were applied."""

    @property
    def version(self) -> str:
        return config_version(self.running)


class WorkerReloader(Reloader):
    """Applies a new config's live keys to a running worker (main process)."""

    LIVE: ClassVar[dict[str, str]] = {
        "worker.capacity": "_capacity",
        "worker.weight": "_weight",
        "worker.supported_types": "_supported_types",
        "scheduler.load_balance_strategy": "_balancer",
        "scheduler.load_balance_config": "_balancer",
        "executors": "_executors",
        "plugins": "_plugins",
        "app.log_level": "_log_level",
    }
    IGNORED = ("api", "scheduler.enabled")
    #: What only a scheduler uses (ignored unless this worker runs one: ``scheduler.in_worker``).
    SCHEDULER_ONLY = (
        "scheduler.interval",
        "scheduler.leader_lease",
        "scheduler.publish_grace",
        "scheduler.retention_interval",
        "scheduler.due_batch",
        "schedules",
        "storage.retention",
    )
    #: Keys that live in the pool's processes: applying one restarts them (gracefully).
    IN_POOL = frozenset({"executors", "app.log_level", "worker.supported_types"})

    def __init__(self, worker: Any, running: Config, pinned: set[str] | frozenset[str] = frozenset()) -> None:
        super().__init__(running, pinned)
        self.worker = worker
        self.rt: Runtime = runtime_of(worker.app)
        if not scheduler_in_worker(running):
            self.ignored = (*self.IGNORED, *self.SCHEDULER_ONLY)

    def _capacity(self, new: Config, value: int) -> None:
        pool = self.worker.pool
        current = int(getattr(pool, "num_processes", None) or self.worker.concurrency)
        if value > current:
            pool.grow(value - current)
            pool.maintain_pool()  # start the new processes now, not at the pool's next check
        consumer = getattr(self.worker, "consumer", None)
        if consumer is not None and value != current:
            consumer._update_prefetch_count(value - current)  # as Celery's autoscaler does
        self.worker.concurrency = value
        self._seat(capacity=value)
        if value < current:
            self._shrink_to(value)

    #: How often a pool whose processes were all busy is shrunk again, towards its new size.
    SHRINK_RETRY = 1.0

    def _shrink_to(self, target: int, *, first: bool = True) -> None:
        """Stop pool processes until ``target`` remain.  Only idle ones can stop, so a busy pool
        shrinks as its tasks end: retried every ``SHRINK_RETRY`` seconds on the worker's event
        loop (as Celery's autoscaler does), while it fetches no more than ``target`` tasks."""
        if target != self.worker.concurrency:
            return  # a later change set another size
        pool = self.worker.pool
        excess = int(getattr(pool, "num_processes", None) or target) - target
        if excess <= 0:
            return
        try:
            pool.shrink(excess)  # the idle ones; raises if fewer than ``excess`` were idle
        except ValueError:
            hub = getattr(self.worker, "hub", None)
            if hub is None:
                logger.warning("config reload: the pool stays larger than %d until its tasks end", target)
                return
            if first:
                logger.info("config reload: pool processes busy; shrinking to %d as their tasks end", target)
            hub.call_later(self.SHRINK_RETRY, lambda: self._shrink_to(target, first=False))

    def _weight(self, new: Config, value: int) -> None:
        self._seat(weight=value)

    def _balancer(self, new: Config, _value: Any) -> None:
        self.rt.router.set_balancer(build_balancer(new))

    def _supported_types(self, new: Config, value: list[str]) -> None:
        known = self.rt.executors.task_types
        types = frozenset(value or known)
        unknown = sorted(types - set(known))
        if unknown:
            raise ConfigError(
                f"worker.supported_types: unknown task type(s) {', '.join(map(repr, unknown))}; "
                f"this worker's executors run: {', '.join(known)}"
            )
        old = self.rt.worker.supported_types or frozenset(known)
        consumer = self.worker.consumer
        prefix = self.rt.config.app.name
        for task_type in sorted(types - old):
            consumer.add_task_queue(queue_name(prefix, task_type))
        for task_type in sorted(old - types):
            consumer.cancel_task_queue(queue_name(prefix, task_type))
        self.rt.worker.supported_types = types
        seat = self.rt.worker.seat
        if seat is not None:
            seat.types = types
        self._seat(supported_types=tuple(sorted(types)))

    def _executors(self, new: Config, _value: Any) -> None:
        fresh = ExecutorSet.from_config(new)  # a ConfigError names the entry; nothing changed yet
        if fresh.task_types != self.rt.executors.task_types:
            raise NeedsRestart(
                f"the task types would change from {', '.join(self.rt.executors.task_types)} "
                f"to {', '.join(fresh.task_types)}"
            )
        problems = fresh.worker_problems()
        if problems:
            raise ConfigError(problems)
        self.rt.executors.replace(fresh)

    def _plugins(self, new: Config, value: Any) -> None:
        errors, _ = check_plugins(list(enumerate(new.plugins)))
        if errors:
            raise ConfigError(errors)  # the running plugins stay
        ctx = self.rt.worker.plugin_context
        old = self.rt.worker.plugins
        if ctx is None or old is None:
            raise NeedsRestart("this worker hosts no plugins")
        old.stop_all(ctx)
        fresh = PluginManager()
        fresh.load(new.plugins)
        ctx.config = new
        fresh.start_all(ctx)
        self.rt.worker.plugins = fresh
        logger.warning("plugins now running: %s", ", ".join(fresh.running) or "none")

    def _log_level(self, new: Config, value: str) -> None:
        _set_log_level(value)

    def _seat(self, **changes: Any) -> None:
        seat = self.rt.worker.seat
        if seat is not None:
            seat.info = dataclasses.replace(seat.info, **changes)  # published by the next heartbeat

    def applied(self, keys: list[str]) -> None:
        # Pool processes were forked from the old config: replace them, each after its current
        # task (an idle one within a second); the log says when no old process is left.
        if not self.IN_POOL.intersection(keys):
            return
        processes = getattr(getattr(self.worker.pool, "_pool", None), "_pool", None)
        if processes is None or not getattr(self.worker, "pool_restarts", False):
            return  # threads and solo pools run tasks in this process: in effect already
        old = {p.pid for p in list(processes)}
        self.worker.pool.restart()
        logger.warning("pool processes restart on the new config, each after its current task")
        threading.Thread(
            target=self._replaced, args=(processes, old), name="celery_ext-pool-restart", daemon=True
        ).start()

    @staticmethod
    def _replaced(processes: list[Any], old: set[int]) -> None:
        deadline = time.monotonic() + 24 * 3600  # a task may run long; its process leaves after it
        while time.monotonic() < deadline:
            if not old.intersection(p.pid for p in list(processes)):
                logger.warning("pool processes replaced: the new config is in effect in every process")
                return
            time.sleep(0.2)


class SchedulerReloader(Reloader):
    """Applies a new config's live keys to a running ``celery -A celery_ext scheduler``."""

    LIVE: ClassVar[dict[str, str]] = {
        "scheduler.load_balance_strategy": "_balancer",
        "scheduler.load_balance_config": "_balancer",
        "scheduler.interval": "_interval",
        "app.log_level": "_log_level",
    }
    IGNORED = ("api", "worker.enabled", "worker.capacity", "worker.weight", "worker.supported_types", "worker.pool")

    def __init__(self, scheduler: Scheduler, running: Config) -> None:
        super().__init__(running)
        self.scheduler = scheduler

    def _balancer(self, new: Config, _value: Any) -> None:
        self.scheduler.rt.router.set_balancer(build_balancer(new))

    def _interval(self, new: Config, value: float) -> None:
        self.scheduler.config = self.scheduler.config.model_copy(update={"interval": value})

    def _log_level(self, new: Config, value: str) -> None:
        _set_log_level(value)


def config_loaders(rt: Runtime) -> list[ConfigLoader]:
    """What a process watches: the source it started from, and (with a worker registry) the
    cluster's key that ``celery-ext config apply`` writes, once when they are the same."""
    loaders: list[ConfigLoader] = []
    if rt.config.source:
        # A URL source is shown without its password: the environment has the real one.
        env = loader_for(os.environ.get(ENV_VAR)) if os.environ.get(ENV_VAR) else None
        loaders.append(env if env is not None and env.source == rt.config.source else loader_for(rt.config.source))
    url = registry_url_for(rt.config, str(rt.celery.conf.broker_url))
    if url is not None:
        cluster = RedisConfigLoader(f"{url}#{config_key(rt.config.app.name)}")
        if not any(isinstance(x, RedisConfigLoader) and (x.url, x.key) == (cluster.url, cluster.key) for x in loaders):
            loaders.append(cluster)
    return loaders


def watch(loaders: list[ConfigLoader], callback: Callable[[Config], None]) -> Callable[[], None]:
    """Watch every loader; returns a function that stops them all."""
    stops = [loader.watch(callback) for loader in loaders]

    def stop() -> None:
        for one in stops:
            one()

    return stop


class ConfigWatchStep(bootsteps.StartStopStep):
    """Worker step: watch the worker's config (and the cluster's) and apply live changes."""

    label = "celery_ext.config_watch"
    requires = ("celery.worker.components:Pool",)

    def __init__(
        self,
        worker: Any,
        capacity: int | None = None,
        weight: int | None = None,
        supported_types: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(worker, **kwargs)
        given = (("worker.capacity", capacity), ("worker.weight", weight), ("worker.supported_types", supported_types))
        self.pinned = {key for key, value in given if value}
        if getattr(worker, "autoscale", None):
            self.pinned.add("worker.capacity")  # Celery's autoscaler sizes the pool
        self.stop_watching: Callable[[], None] | None = None
        # Before the pool is made: its processes can then be restarted after a reload (executors,
        # log level).  Celery's pool_restart remote command stays off (worker_pool_restarts).
        worker.pool_restarts = True

    def start(self, worker: Any) -> None:
        rt = runtime_of(worker.app)
        loaders = config_loaders(rt)
        if not loaders:
            return  # built-in defaults and no registry: nothing to watch
        reloader = WorkerReloader(worker, rt.config, self.pinned)

        def on_change(new: Config) -> None:
            # Runs on the worker's event loop: an exception here would stop the worker.
            try:
                apply(new)
            except Exception:  # noqa: BLE001 - keep the running config and the worker
                logger.exception("config %s: could not apply the new config; keeping the running one", new.source)

        def apply(new: Config) -> None:
            applied, restart = reloader.apply(new)
            if restart:
                logger.warning(
                    "config %s changed %s: needs a worker restart to take effect", new.source, ", ".join(restart)
                )
            seat = rt.worker.seat
            if seat is not None:
                seat.info = dataclasses.replace(
                    seat.info, config_version=reloader.version, restart_needed=tuple(restart)
                )
            if not applied:
                return
            logger.warning(
                "config %s reloaded: applied %s",
                new.source,
                ", ".join(f"{k}={_value(reloader.running, k)!r}" for k in applied),
            )
            rt.observer.config_reloaded(worker.hostname, applied=applied, restart_needed=restart)

        hub = getattr(worker, "hub", None)
        if hub is None:
            self.stop_watching = watch(loaders, on_change)
        else:
            # Applied on the worker's event loop, where the pool may grow (as Celery's autoscaler does).
            self.stop_watching = watch(loaders, lambda new: hub.call_soon(on_change, new))

    def stop(self, worker: Any) -> None:
        if self.stop_watching is not None:
            self.stop_watching()
            self.stop_watching = None
