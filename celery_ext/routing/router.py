"""The Celery router, installed as an instance in ``task_routes``: load-aware placement.

For a celery_ext task it takes the online workers that support the type and have a free slot
(from the worker registry, cached for ``scheduler.routing_cache``), asks the ``LoadBalancer``
(``scheduler.load_balance_strategy``) to choose, reserves a slot on the chosen worker in one
Redis round trip, and returns that worker's direct queue.  With no candidate, a delayed task, no
registry, or a registry that cannot be reached, it returns the type's shared queue, where every
supporting worker consumes: a task always has somewhere to wait.  While work already waits in the
shared queue (the registry is the broker), new tasks queue behind it there rather than overtake
it.  It only ever returns the direct queue of a registered worker or the shared queue of a known
type: one this process has an executor for, or one a live worker advertises (a producer that
cannot import the users' task modules still routes their types).  Any other name (Celery's own
tasks, a type no worker runs) is left to Celery's default queue.

A strategy with state (``round_robin``, ``weighted_round_robin``, ``affinity``) keeps it in the
registry's Redis, shared by every producer, and the same single Lua call that reserves the slot
reads and advances it (``routing/shared.py``); ``scheduler.load_balance_state: local`` keeps it
in this process instead (``LoadBalancer.select``).

Config: ``scheduler.load_balance_strategy`` (``least_task``), ``scheduler.load_balance_config``,
``scheduler.load_balance_state`` (``shared``), ``scheduler.routing_cache`` (200ms),
``scheduler.registry_url`` (default: a Redis broker).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery_ext.dispatch import queue_name
from celery_ext.errors import ConfigError
from celery_ext.message import HEADER
from celery_ext.registry import BALANCERS
from celery_ext.routing.base import LoadBalancer, RoutedTask
from celery_ext.routing.least_task import LeastTaskBalancer
from celery_ext.routing.shared import SharedPlan, SharedState
from celery_ext.routing.stranded import queue_keys
from celery_ext.routing.workers import WorkerInfo, WorkerRegistry, direct_queue_name
from celery_ext.transport import is_redis_url, redis_py_url

if TYPE_CHECKING:
    from celery_ext.config import Config

logger = logging.getLogger("celery_ext.routing")


def registry_url_for(config: Config, broker_url: str) -> str | None:
    """``scheduler.registry_url``, else the broker when it is Redis (as a redis-py URL: the
    embedded broker's ``redis+socket://<path>`` is ``unix://<path>``), else None (no registry)."""
    if config.scheduler.registry_url:
        return config.scheduler.registry_url
    return redis_py_url(broker_url) if is_redis_url(broker_url) else None


def build_balancer(config: Config) -> LoadBalancer:
    """The configured strategy; an unknown name is a ``ConfigError`` listing the known ones."""
    return balancer_from(config.scheduler.load_balance_strategy, config.scheduler.load_balance_config)


def balancer_from(strategy: str, settings: Mapping[str, Any]) -> LoadBalancer:
    """``strategy`` with its ``load_balance_config``; remembers both (``LoadBalancer.spec``), so
    that a worker can publish them to the cluster."""
    cls = BALANCERS.resolve(strategy, "scheduler.load_balance_strategy")
    balancer: LoadBalancer = cls.from_config(settings)
    balancer.spec = {"strategy": strategy, "config": dict(settings)}
    return balancer


def spec_version(spec: Mapping[str, Any]) -> str:
    """Names a strategy with its settings: equal specs, equal versions, in every process."""
    text = json.dumps({"strategy": spec.get("strategy"), "config": spec.get("config")}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]  # noqa: S324 - a name, not a secret


def index_by_type(
    prefix: str, task_types: Iterable[str], workers: Iterable[WorkerInfo]
) -> tuple[dict[str, list[WorkerInfo]], list[WorkerInfo]]:
    """A registry snapshot (its online workers) by task type: every one of ``task_types``, and
    every type a worker advertises (also those this process has no executor for).  A worker whose
    queue is not its direct queue is left out, and returned apart."""
    by_type: dict[str, list[WorkerInfo]] = {t: [] for t in task_types}
    misplaced: list[WorkerInfo] = []
    for w in workers:
        if w.queue != direct_queue_name(prefix, w.id):
            misplaced.append(w)
            continue
        for t in w.supported_types:
            by_type.setdefault(t, []).append(w)
    return by_type, misplaced


def candidates(pool: Sequence[WorkerInfo] | None, exclude: set[str] | frozenset[str] = frozenset()) -> list[WorkerInfo]:
    """The workers of a type's pool a balancer may choose: those with a free slot, less ``exclude``
    (found full when a slot was reserved)."""
    return [w for w in pool or () if w.in_flight < w.capacity and w.id not in exclude]


@dataclass(frozen=True, slots=True)
class Reservation:
    """A slot to take with the publish of the message that fills it (``TaskRouter.pending``)."""

    task_type: str
    worker: WorkerInfo
    keys: tuple[str, ...]  # the in-flight hash, then the type's shared sub-queues (a backlog)
    script: Any  # ``WorkerRegistry.reserve_push``

    @property
    def args(self) -> tuple[str, int]:
        return self.worker.id, self.worker.capacity


class TaskRouter:
    """Routes each celery_ext task to the worker that should run it (see the module doc)."""

    def __init__(
        self,
        prefix: str,
        task_types: Iterable[str],
        registry: WorkerRegistry | None = None,
        balancer: LoadBalancer | None = None,
        cache_ttl: float = 0.2,
        shared_state: bool = True,
    ) -> None:
        self.prefix = prefix
        self.task_types = frozenset(task_types)
        self.shared = {t: queue_name(prefix, t) for t in self.task_types}
        self.registry = registry
        # Balancer state shared by the cluster (None: each process keeps its own).
        self.state = SharedState(registry.client, prefix) if registry is not None and shared_state else None
        self.backlog_keys: dict[str, list[str]] = {}
        self.balancer = balancer or LeastTaskBalancer()
        self.balancer.startup()
        # task type -> (the snapshot's pool, its key, the balancer's plan for it, the pool by id,
        # the plan's state field)
        self._plans: dict[
            str, tuple[list[WorkerInfo], tuple[str, frozenset[str]], SharedPlan | None, dict[str, WorkerInfo], str]
        ] = {}
        self.cache_ttl = cache_ttl
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._by_type: dict[str, list[WorkerInfo]] = {}
        self._fresh_until = 0.0
        self._warned_at = 0.0
        self._down_until = 0.0
        self._backlog_until: dict[str, float] = {}
        self.retry_after = 2.0
        # The cluster's published strategy: None until the first registry read; then its version
        # (or "" while nothing is published).  A change after that is followed.
        self._published: str | None = None

    @classmethod
    def from_config(
        cls,
        config: Config,
        task_types: Iterable[str],
        registry: WorkerRegistry | None,
        broker_url: str,
        transport_options: Mapping[str, Any] | None = None,
    ) -> TaskRouter:
        """The router ``config`` asks for, over ``registry`` (built by the composition root)."""
        router = cls(
            config.app.name,
            task_types,
            registry,
            build_balancer(config),
            config.scheduler.routing_cache,
            shared_state=config.scheduler.load_balance_state == "shared",
        )
        if registry is not None and registry_url_for(config, broker_url) == redis_py_url(broker_url):
            # The registry is the broker: the reservation can see each type's shared-queue backlog.
            router.backlog_keys = {t: queue_keys(q, transport_options) for t, q in router.shared.items()}
        return router

    def set_balancer(self, balancer: LoadBalancer, publish: bool = True) -> None:
        """Swap the strategy (config reload); the next decision uses the new one.  With
        ``publish``, a balancer built from config is also published to the cluster: every
        producer follows it at its next registry read (``routing_cache``)."""
        balancer.startup()
        with self._lock:
            old, self.balancer = self.balancer, balancer
            self._plans = {}
        old.shutdown()
        if publish:
            self.publish_strategy()

    def publish_strategy(self) -> None:
        """Publish this router's strategy and settings as the cluster's (a worker does, at start
        and when its config.yaml changes them).  A failure is logged: routing goes on."""
        spec = self.balancer.spec
        if self.registry is None or spec is None:
            return
        version = spec_version(spec)
        try:
            self.registry.publish_strategy(json.dumps({**spec, "version": version}, default=str))
        except Exception as exc:  # noqa: BLE001 - the producers keep their strategy meanwhile
            logger.warning("could not publish the load-balancing strategy: %s", exc)
            return
        self._published = version  # ours: nothing to follow

    def _follow(self, raw: bytes | None) -> None:
        """Adopt the cluster's strategy when it changes (a worker's config.yaml changed it)."""
        try:
            data = json.loads(raw) if raw else {}
            version = str(data.get("version") or "")
        except (ValueError, AttributeError):
            version, data = "", {}
        if self._published is None or version in ("", self._published):
            # The first read is the baseline: a producer configured apart from the workers
            # keeps its own strategy until the cluster's changes.
            self._published = version or self._published or ""
            return
        self._published = version
        if self.balancer.spec is not None and spec_version(self.balancer.spec) == version:
            return
        try:
            balancer = balancer_from(str(data["strategy"]), data.get("config") or {})
        except (ConfigError, KeyError, TypeError) as exc:
            logger.warning(
                "the cluster's load-balancing strategy changed, but this process cannot use it (keeping %r): %s",
                self.balancer.state_name,
                exc,
            )
            return
        self.set_balancer(balancer, publish=False)
        logger.warning(
            "load-balancing strategy is now %r (published by the cluster, version %s)", data["strategy"], version
        )

    def close(self) -> None:
        """The process stops: the balancer's ``shutdown`` hook."""
        self.balancer.shutdown()

    # --- Celery's router protocol ---------------------------------------------------------

    def __call__(
        self, name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any
    ) -> dict[str, Any] | None:
        if options.get("queue"):
            return None  # the sender chose the queue (a retry, a forward)
        shared = self.shared.get(name) or self._advertised_queue(name)
        if shared is None:
            return None  # not ours: Celery's default queue
        # A fresh dict every time: Celery pops "queue" out of what a router returns.
        if self.registry is None or options.get("countdown") or options.get("eta"):
            # A delayed task must not hold a slot while it waits for its time.
            return {"queue": shared}
        if time.monotonic() < self._down_until:
            return {"queue": shared}
        try:
            worker = self.route(name, _routed(name, kwargs, options))
        except Exception as exc:  # noqa: BLE001 - routing must never stop a publish
            # Back off, so a registry outage costs one timeout, not one per publish.
            self._down_until = time.monotonic() + self.retry_after
            self._warn(f"worker registry unavailable, routing to the shared queues for {self.retry_after:g}s: {exc}")
            worker = None
        return {"queue": worker.queue if worker else shared}

    def _advertised_queue(self, name: str) -> str | None:
        """The shared queue of a type this process has no executor for but a live worker runs
        (a producer that cannot import the users' task modules); None for anything else."""
        if name.startswith("celery.") or name not in self.advertised():
            return None
        return queue_name(self.prefix, name)

    def advertised(self) -> frozenset[str]:
        """The task types that some online worker runs, from the snapshot (at most one registry
        read per ``cache_ttl``); empty without a registry or while it cannot be read."""
        if self.registry is None or time.monotonic() < self._down_until:
            return frozenset()
        try:
            by_type = self.snapshot()
        except Exception as exc:  # noqa: BLE001 - an outage only narrows what is known
            self._down_until = time.monotonic() + self.retry_after
            self._warn(f"worker registry unavailable, no advertised task types for {self.retry_after:g}s: {exc}")
            return frozenset()
        return frozenset(t for t, workers in by_type.items() if workers)

    # --- the decision ---------------------------------------------------------------------

    def route(self, task_type: str, routed: RoutedTask | None = None) -> WorkerInfo | None:
        """Choose a worker and reserve a slot on it; None means the shared queue."""
        assert self.registry is not None
        routed = routed or RoutedTask(task_type)
        if time.monotonic() < self._backlog_until.get(task_type, 0.0):
            return None  # a backlog was seen lately: join it without asking Redis again
        if self.state is not None:
            pool = self.snapshot().get(task_type)
            if not pool or not any(w.in_flight < w.capacity for w in pool):
                return None
            planned = self._plan(task_type, pool)
            if planned is not None:
                return self._route_shared(task_type, *planned)
        rejected: set[str] = set()
        for _ in range(3):
            worker = self.choose(routed, rejected)
            if worker is None:
                return None
            count = self.registry.reserve(worker.id, worker.capacity, self.backlog_keys.get(task_type, ()))
            if self._took(task_type, worker, count):
                return worker
            if count == -2:
                return None
            rejected.add(worker.id)  # another producer took the slot: try another
        return None

    def _took(self, task_type: str, worker: WorkerInfo, reply: int) -> bool:
        """Note what a reservation's reply says (``WorkerRegistry.reserve``'s, ``reserve_push``'s):
        whether it took the slot on ``worker``."""
        if reply >= 0:
            worker.in_flight = reply  # the server's count: it includes releases since the snapshot
            return True
        if reply == -2:
            # Work already waits in the shared queue: queue behind it, and keep doing so until
            # the next snapshot (a burst then costs no round trip per task).
            self._backlog_until[task_type] = time.monotonic() + self.cache_ttl
        else:
            worker.in_flight = worker.capacity  # full by the server's count
        return False

    def pending(self, task_type: str, kwargs: Any, options: Mapping[str, Any]) -> Reservation | None:
        """The reservation a publish of ``task_type`` can make in its own round trip, when the
        registry is the broker: the worker ``route`` would try first, and what its script needs
        (``WorkerRegistry.reserve_push``: the slot, then the message in that worker's queue).
        None where ``__call__`` decides otherwise (no choice, a delayed task, a backlog seen, a
        shared plan, an outage): the publish routes the message as usual.  The publish hands the
        script's reply to ``reserved``."""
        backlog = self.backlog_keys.get(task_type)
        if backlog is None or self.registry is None or any(options.get(k) for k in ("queue", "countdown", "eta")):
            return None
        now = time.monotonic()
        if now < self._down_until or now < self._backlog_until.get(task_type, 0.0):
            return None
        try:
            if self.state is not None:
                pool = self.snapshot().get(task_type)
                if pool and self._plan(task_type, pool) is not None:
                    return None  # a shared plan reserves in its own script
            worker = self.choose(_routed(task_type, kwargs, options))
        except Exception:  # noqa: BLE001 - __call__ meets the outage again, and reports it
            return None
        if worker is None:
            return None
        registry = self.registry
        return Reservation(task_type, worker, (registry.keys[2], *backlog), registry.reserve_push)

    def reserved(self, reservation: Reservation, reply: int) -> bool:
        """Whether the reservation's script took the slot (and wrote the message).  Otherwise it
        wrote nothing, and what it found is noted as ``route`` notes it (a backlog in the shared
        queue, a worker full by the server's count): the message is then routed again."""
        return self._took(reservation.task_type, reservation.worker, reply)

    def _plan(self, task_type: str, pool: list[WorkerInfo]) -> tuple[SharedPlan, dict[str, WorkerInfo], str] | None:
        """The balancer's shared plan for this pool, rebuilt only when the pool changes (a worker
        joins, leaves, or changes its capacity or weight), not per snapshot."""
        cached = self._plans.get(task_type)
        if cached is None or cached[0] is not pool:
            assert self.registry is not None
            key = (self.registry.generation, frozenset(w.id for w in pool))
            with self._lock:  # read again: set_balancer may have emptied the cache meanwhile
                cached = self._plans.get(task_type)
                if cached is None or cached[0] is not pool:
                    balancer = self.balancer
                    plan = (
                        cached[2] if cached is not None and cached[1] == key else balancer.shared_plan(pool, task_type)
                    )
                    cached = (pool, key, plan, {w.id: w for w in pool}, f"{balancer.state_name}|{task_type}")
                    self._plans[task_type] = cached
        plan = cached[2]
        return None if plan is None else (plan, cached[3], cached[4])

    def _route_shared(
        self, task_type: str, plan: SharedPlan, by_id: dict[str, WorkerInfo], state_field: str
    ) -> WorkerInfo | None:
        assert self.state is not None and self.registry is not None
        reply = self.state.decide(plan, state_field, self.registry.keys[2], self.backlog_keys.get(task_type, ()))
        if isinstance(reply, tuple):
            worker = by_id.get(reply[0])
            if worker is not None:
                worker.in_flight = reply[1]
            return worker
        if reply == -2:
            self._backlog_until[task_type] = time.monotonic() + self.cache_ttl
        else:  # every worker is full by the server's count: so until the next snapshot
            for w in by_id.values():
                w.in_flight = max(w.in_flight, w.capacity)
        return None

    def choose(self, routed: RoutedTask, exclude: set[str] | frozenset[str] = frozenset()) -> WorkerInfo | None:
        """The balancer's pick among the candidates, without reserving (no I/O on a warm cache)."""
        free = candidates(self.snapshot().get(routed.task_type), exclude)
        if not free:
            return None
        with self._lock:
            return self.balancer.select(free, routed)

    def snapshot(self) -> dict[str, list[WorkerInfo]]:
        """Online workers by supported type, read at most once per ``cache_ttl``."""
        if time.monotonic() < self._fresh_until:
            return self._by_type
        with self._refresh_lock:
            if time.monotonic() >= self._fresh_until:
                assert self.registry is not None
                self._by_type = self._index(self.registry.online())
                self._follow(self.registry.published)
                self._fresh_until = time.monotonic() + self.cache_ttl
        return self._by_type

    def invalidate(self) -> None:
        self._fresh_until = 0.0
        self._backlog_until.clear()
        self._plans = {}

    def _index(self, workers: list[WorkerInfo]) -> dict[str, list[WorkerInfo]]:
        by_type, misplaced = index_by_type(self.prefix, self.task_types, workers)
        for w in misplaced:
            self._warn(f"ignoring worker {w.id!r}: queue {w.queue!r} is not its direct queue")
        return by_type

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._warned_at > 10:
            self._warned_at = now
            logger.warning(message)


def _routed(name: str, kwargs: Any, options: Mapping[str, Any]) -> RoutedTask:
    """What the balancer sees of a message about to be published (see ``message.py``)."""
    headers = options.get("headers") or {}
    ext = headers.get(HEADER) if isinstance(headers, Mapping) else None
    key = ext.get("idempotency_key") if isinstance(ext, Mapping) else None
    return RoutedTask(
        name,
        options.get("task_id"),
        kwargs if isinstance(kwargs, Mapping) else {},
        key if isinstance(key, str) else None,
        options.get("priority"),
    )
