"""The worker side of routing: which queues it consumes, its registry entry, and its heartbeat.

Each worker consumes its own direct queue (``<app.name>.worker.<hostname>``) and the shared queue
of each type it supports (``worker.supported_types``; empty means every registered type), then
registers ``{id, queue, weight, capacity, supported_types, in_flight, config_version,
heartbeat_at}`` and refreshes it every ``worker.heartbeat_interval``; an entry not refreshed for
``worker.offline_after`` (3 intervals) is offline.  A warm shutdown marks the worker offline at
once and hands its direct queue back to the shared queues.

At start the worker also publishes its load-balancing strategy to the cluster (producers follow
its changes, see ``TaskRouter.publish_strategy``).  ``worker.enabled: false`` (the design's one
config for every role) makes ``celery -A celery_ext worker`` log that and exit 0.

Each heartbeat also checks that the consumer makes progress (``Progress``): a worker that has
taken no message for ``worker.stall_after`` while messages wait in the queues it consumes (Redis
broker: their lengths, read by the heartbeat) and it has free pool slots is reported unhealthy
(``healthy: false`` with a ``problem``, shown by ``celery-ext workers``, the API and the
dashboard), with an error in its log; it is healthy again as soon as it takes a message.  (A
consumer whose broker connection went silent, a half-open TCP connection that Redis's protocol
never notices, is the case in point: its process, heartbeat and registry entry all look alive.)

Worker options (override config): ``--capacity N`` (also the pool size), ``--weight N``,
``--supported-types a,b``.  Config: ``worker.enabled``, ``worker.capacity``, ``worker.weight``,
``worker.supported_types``, ``worker.heartbeat_interval``, ``worker.offline_after``; the entry
carries ``app.version``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import click
from celery import Celery, bootsteps
from celery.signals import task_postrun, task_received

from celery_ext.config import config_version
from celery_ext.dispatch import plain_queues, queue_name
from celery_ext.routing.seat import Progress, Seat
from celery_ext.routing.stranded import queue_keys
from celery_ext.routing.workers import WorkerInfo, direct_queue_name
from celery_ext.runtime import Runtime, runtime_of
from celery_ext.transport import is_redis_url

logger = logging.getLogger("celery_ext.routing")


def _types(value: Any) -> list[str] | None:
    if value is None or value == "":
        return None
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    return [t.strip() for t in items if t.strip()]


class CapacityStep(bootsteps.Step):
    """``--capacity`` sets the pool size before the pool is created (every step's ``__init__``
    runs before any step creates its service)."""

    label = "celery_ext.capacity"

    def __init__(self, w: Any, capacity: int | None = None, **kwargs: Any) -> None:
        super().__init__(w, **kwargs)
        config = runtime_of(w.app).config
        if not config.worker.enabled:
            # The design's one config for every role: this one runs no worker.
            logger.warning("worker.enabled is false in %s: not starting a worker", config.source or "the config")
            raise SystemExit(0)
        if capacity:
            w.concurrency = capacity
            if getattr(w, "min_concurrency", None) is not None:
                w.min_concurrency = capacity


class RegistrationStep(bootsteps.StartStopStep):
    """Consumer step: picks the queues and takes the worker's seat (``take_seat``, before the pool
    forks), then starts, pauses and leaves it (``routing/seat.py``)."""

    label = "celery_ext.registry"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(
        self, c: Any, capacity: int | None = None, weight: int | None = None, supported_types: Any = None, **kwargs: Any
    ) -> None:
        super().__init__(c, **kwargs)
        self.seat = take_seat(runtime_of(c.app), c, capacity, weight, _types(supported_types))

    def start(self, c: Any) -> None:
        if self.seat is not None:
            self.seat.start()
            # This worker's config.yaml is the cluster's: long-running producers follow its strategy.
            runtime_of(c.app).router.publish_strategy()

    def stop(self, c: Any) -> None:
        if self.seat is not None:
            self.seat.pause()

    def shutdown(self, c: Any) -> None:
        if self.seat is not None:
            self.seat.leave(runtime_of(c.app).config.app.name, c.app.conf.broker_transport_options)


def take_seat(
    rt: Runtime, c: Any, capacity: int | None, weight: int | None, supported_types: list[str] | None
) -> Seat | None:
    """Choose the queues the consumer ``c`` consumes and make this worker's registry seat (None
    without a registry); both go on ``rt.worker``, before the pool forks, so children see them."""
    conf, prefix = rt.config.worker, rt.config.app.name
    known = rt.executors.task_types
    types = supported_types or list(conf.supported_types) or known
    unknown = sorted(set(types) - set(known))
    if unknown:
        raise SystemExit(
            f"celery_ext: cannot start worker: worker.supported_types: unknown task type(s) "
            f"{', '.join(map(repr, unknown))}; this worker's executors run: {', '.join(known)}"
        )
    direct = direct_queue_name(prefix, c.hostname)
    rt.worker.supported_types = frozenset(types)
    # Only the shared queues of supported types, plus the direct queue, plus the app's default
    # queue and Celery's (``worker.celery_queue``), where plain Celery producers send by name:
    # a message there of a type this worker does not run is handed to that type's shared queue
    # (``task.py``).
    c.app.amqp.queues.select([direct, *(queue_name(prefix, t) for t in types), *plain_queues(rt.config)])
    if rt.registry is None:
        logger.info("no worker registry (broker is not Redis, scheduler.registry_url unset): static routing")
        return None
    # Under Celery's --autoscale the pool may grow to its maximum (and Celery prefetches for it).
    autoscaled = getattr(c.controller, "max_concurrency", None)
    info = WorkerInfo(
        id=c.hostname,
        queue=direct,
        hostname=c.hostname,
        weight=weight or conf.weight,
        capacity=capacity or autoscaled or c.controller.concurrency or conf.capacity,
        supported_types=tuple(sorted(types)),
        config_version=config_version(rt.config),
        app_version=rt.config.app.version or "",
        pid=os.getpid(),
    )
    options = c.app.conf.broker_transport_options
    redis_broker = is_redis_url(c.app.conf.broker_url)
    seat = Seat(
        rt.registry,
        info,
        conf.offline_threshold,
        conf.heartbeat_interval,
        queue_keys(direct, options) if redis_broker else [],
        frozenset(types),
    )
    if not redis_broker:
        seat.queued = _queue_depth(c.app, direct)
    elif conf.stall_after > 0:
        consumed = [q.name for q in c.app.amqp.queues.consume_from.values()]
        seat.progress = Progress([k for q in consumed for k in queue_keys(q, options)], conf.stall_after)
    rt.worker.seat = seat
    return seat


def _queue_depth(app: Any, queue: str) -> Callable[[], int]:
    """Message count of ``queue`` by a passive declare, on a connection of the heartbeat thread."""
    conn: Any = None

    def depth() -> int:
        nonlocal conn
        try:
            if conn is None:
                conn = app.connection_for_write()
            return int(conn.default_channel.queue_declare(queue=queue, passive=True).message_count)
        except Exception:
            if conn is not None:
                conn.release()
            conn = None
            raise

    return depth


# Set on a task's request when its slot was released with its pushed outcome.
RELEASED = "celery_ext_released"


def install_routing(app: Celery) -> None:
    """Worker options, the two bootsteps, and the in-flight accounting signals."""
    app.user_options["worker"].add(
        click.Option(
            ["--capacity"],
            type=click.IntRange(min=1),
            default=None,
            help="celery_ext: tasks this worker runs at once (pool size; overrides worker.capacity)",
        )
    )
    app.user_options["worker"].add(
        click.Option(
            ["--weight"],
            type=click.IntRange(min=1),
            default=None,
            help="celery_ext: weight for weighted_round_robin (overrides worker.weight)",
        )
    )
    app.user_options["worker"].add(
        click.Option(
            ["--supported-types"],
            default=None,
            help="celery_ext: comma-separated task types this worker runs (overrides worker.supported_types)",
        )
    )
    app.steps["worker"].add(CapacityStep)
    app.steps["consumer"].add(RegistrationStep)

    def received(request: Any = None, **_: Any) -> None:
        # Main process.  A task from a shared queue was not reserved by a router: count it now.
        seat = runtime_of(app).worker.seat
        if seat is not None and seat.progress is not None:
            seat.progress.taken += 1
        if seat is None or request is None or request.name not in seat.types or request.app is not app:
            return
        if (request.delivery_info or {}).get("routing_key") != seat.info.queue:
            seat.adjust(+1)

    def finished(sender: Any = None, **_: Any) -> None:
        # Pool process (or thread): the slot is free again, unless released with the outcome.
        seat = runtime_of(app).worker.seat
        if seat is not None and getattr(sender, "name", None) in seat.types and sender.app is app:
            if not getattr(sender.request, RELEASED, False):
                seat.adjust(-1)

    def outcome_pushed(task_id: str) -> list[tuple[Any, ...]]:
        # Pool process (or thread), inside the run of ``task_id``: its outcome is pushed
        # (completion.py), and the slot's release goes in the same write, instead of a write of
        # its own after the task (``finished``).  Not for a spooled outcome written later.
        seat = runtime_of(app).worker.seat
        task = app.current_worker_task
        if seat is None or task is None or task.name not in seat.types or task.request.id != task_id:
            return []
        setattr(task.request, RELEASED, True)
        return [seat.registry.adjust_command(seat.info.id, -1)]

    runtime_of(app).lifecycle.completion.also = outcome_pushed

    task_received.connect(received, weak=False, dispatch_uid=f"celery_ext.routing.received.{id(app)}")
    task_postrun.connect(finished, weak=False, dispatch_uid=f"celery_ext.routing.finished.{id(app)}")
