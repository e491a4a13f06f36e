"""Publishing task messages: the one place that turns a record into a Celery message."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from celery import Celery, signals
from kombu.common import maybe_declare
from kombu.exceptions import OperationalError

from celery_ext.config import Config
from celery_ext.message import ExtHeader
from celery_ext.model import Task
from celery_ext.redis_wire import RedisWire

MAX_PRIORITY = 9
PUBLISH_BATCH = 2000  # publish_many: messages per Redis pipeline (kombu batch fallback: commands)


class Reserver(Protocol):
    """What ``Dispatcher`` asks of ``TaskRouter`` (routing/router.py) for a single publish."""

    def pending(self, task_type: str, kwargs: Any, options: Mapping[str, Any]) -> Any: ...

    def reserved(self, reservation: Any, reply: int) -> bool: ...


class _Once:
    """``fn()`` at the first call, nothing at the next ones (nothing at all without ``fn``)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], None] | None) -> None:
        self.fn = fn

    def __call__(self) -> None:
        fn, self.fn = self.fn, None
        if fn is not None:
            fn()


@dataclass(frozen=True, slots=True)
class Dispatch:
    """One message to publish: the record, its dispatch token and attempt, and a delay."""

    task: Task
    token: str
    attempt: int
    countdown: float | None = None
    queued_at: datetime | None = None


def queue_name(prefix: str, task_type: str) -> str:
    """The shared queue of a task type."""
    return f"{prefix}.{task_type}"


def ext_header(d: Dispatch) -> ExtHeader:
    return ExtHeader(d.token, d.attempt, d.task.run, d.task.max_retries, d.queued_at, d.task.idempotency_key)


def plain_queues(config: Config) -> list[str]:
    """The queues every worker of this app consumes besides its types': the app's default queue
    and ``worker.celery_queue`` (unless empty)."""
    own = queue_name(config.app.name, "default")
    return [own, *([config.worker.celery_queue] if config.worker.celery_queue not in ("", own) else [])]


def plain_repr(value: Any, maxlen: int, maxlevels: int) -> str | None:
    """Celery's ``saferepr(value, maxlen, maxlevels)`` of a JSON-shaped value, computed by
    ``repr``, or ``None`` where the two could differ (then Celery computes it).  They agree when
    nothing is cut (shorter than ``maxlen``, containers nested at most ``maxlevels`` deep) and
    every string is printable without a quote or a backslash (``repr`` would escape or re-quote
    it, ``saferepr`` does not).  ``saferepr`` was 14% of a batch publish (profiled)."""
    if not _plain(value, maxlevels):
        return None
    text = repr(value)
    return text if len(text) < maxlen else None


def _plain(value: Any, levels: int) -> bool:
    if value is None or isinstance(value, int | float):
        return True
    if isinstance(value, str):
        return "'" not in value and "\\" not in value and value.isprintable()
    if levels <= 0:
        return False
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(k, 1) and _plain(v, levels - 1) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_plain(v, levels - 1) for v in value)
    return False


@dataclass(slots=True)
class _LeanChannel:
    """What ``Dispatcher._publish_lean`` sets up for a producer's channel, kept with the channel
    (the producer pool hands it to one thread at a time): its task-sent event dispatcher, its
    ``RedisWire`` (emptied by every flush) and the queues declared on it."""

    events: Any
    wire: RedisWire
    declared: dict[str, Any] = field(default_factory=dict)


class Dispatcher:
    """Publishes messages over the app's producer pool; routing is the app's ``task_routes``.

    A message is a plain Celery message (``message.py``): the payload is its kwargs, the
    celery_ext header carries the dispatch token and attempt, and ``retries`` is the attempt's
    number within the run, so Celery's tools count retries as the record does.
    """

    def __init__(
        self, app: Celery, *, hard_timeout_grace: float, redis_priorities: bool, router: Reserver | None = None
    ) -> None:
        self.app = app
        # The app's router, when it can reserve a worker's slot with a single publish.
        self.router = router
        self.grace = hard_timeout_grace
        # Redis consumes priority 0 first, AMQP the highest number first; ours is AMQP's order.
        self.redis_priorities = redis_priorities
        self._lean: weakref.WeakKeyDictionary[Any, _LeanChannel] = weakref.WeakKeyDictionary()
        self._broker_errors: tuple[type[BaseException], ...] | None = None

    def options(self, d: Dispatch) -> dict[str, Any]:
        t = d.task
        priority = max(0, min(MAX_PRIORITY, t.priority))
        opts: dict[str, Any] = {
            "task_id": t.task_id,
            "args": t.args or (),
            "kwargs": t.payload,
            "headers": ext_header(d).to_header(),
            "priority": MAX_PRIORITY - priority if self.redis_priorities else priority,
            "retries": max(0, d.attempt - 1),
        }
        if t.parent_id:
            opts["parent_id"] = t.parent_id
        if t.root_id:
            opts["root_id"] = t.root_id
        if t.group_id:
            opts["group_id"] = t.group_id
        if d.countdown:
            opts["countdown"] = d.countdown
        if t.timeout:
            opts["soft_time_limit"] = t.timeout
            opts["time_limit"] = t.timeout + self.grace
        return opts

    def publish(self, d: Dispatch, *, meanwhile: Callable[[], None] | None = None) -> None:
        """Publish one message: on Redis through ``_publish_lean`` (its message and task-sent
        event in one round trip, where Celery's ``send_task`` takes two), else, or when that
        fails on the connection, through Celery's ``send_task`` with its publish retry (a message
        the failed pipeline did deliver arrives twice: its dispatch token runs it once).

        ``meanwhile`` (the caller's other work) is called once: while the message's reply is on
        its way where a reservation script writes it (``RedisWire.push_reserved``), else before
        the publish."""
        once = _Once(meanwhile)
        if self._lean_batches():
            try:
                with self.app.producer_or_acquire() as producer:
                    if producer.supports_batch_publish:
                        self._publish_lean(producer, (d,), once)
                        return
            except self._connection_errors():
                pass  # the broker failed: Celery's send_task retries, as its publish policy says
        once()
        self.app.send_task(d.task.task_type, **self.options(d))

    def _connection_errors(self) -> tuple[type[BaseException], ...]:
        """What a publish raises when the broker fails: kombu's ``OperationalError`` (a channel
        that could not be opened) and the transport's connection errors (Redis's)."""
        if self._broker_errors is None:
            with self.app.connection_for_write() as conn:  # not connected: the transport's list
                self._broker_errors = (OperationalError, *conn.connection_errors)
        return self._broker_errors

    def publish_many(self, batch: Sequence[Dispatch]) -> None:
        """Publish a batch over one producer.

        On Redis, each message is still routed by the app's router (one call per message: a
        balancer reserves a worker's slot) and built by Celery (``amqp.create_task_message``);
        ``RedisWire`` then writes the messages and their task-sent events, the same JSON Celery's
        ``send_task_message`` would send (encoded by orjson), through one pipeline per
        ``PUBLISH_BATCH`` messages, one LPUSH per queue key (profiled in docs/benchmarks.md:
        Celery's and kombu's generic publish path was most of a batch's time).  Anything that
        changes the message takes Celery's ``send_task`` instead, in kombu's publish batch: a
        publish signal receiver (``before_task_publish``, ...), a call from inside a worker's
        task (Celery links the parent), a broker other than Redis (quorum queues and native
        delayed delivery), a Redis connection that would retry a pipeline (kombu's
        ``supports_batch_publish``).
        """
        if not batch:
            return
        with self.app.producer_or_acquire() as producer:
            if self._lean_batches() and producer.supports_batch_publish:
                self._publish_lean(producer, batch)
                return
            with producer.batch(max_size=PUBLISH_BATCH):
                for d in batch:
                    self.app.send_task(d.task.task_type, producer=producer, **self.options(d))

    def _publish_lean(self, producer: Any, batch: Sequence[Dispatch], meanwhile: _Once | None = None) -> None:
        channel = producer.channel
        lean = self._lean.get(channel)
        if lean is None:
            evd = self.app.events.Dispatcher(enabled=False)
            evd.exchange = evd.exchange(channel)  # bound once: no copy per event
            maybe_declare(evd.exchange, channel)
            wire = RedisWire(self.app, channel, evd if self.app.conf.task_send_sent_event else None, PUBLISH_BATCH)
            lean = self._lean[channel] = _LeanChannel(evd, wire)
        wire = lean.wire
        wire.clear()  # anything a failed batch left
        if len(batch) == 1 and self._publish_reserved(producer, lean, batch[0], meanwhile):
            return
        if meanwhile is not None:
            meanwhile()
        for d in batch:
            opts = self.options(d)
            queue, route, message = self._message(producer, lean, d.task.task_type, opts, {})
            if wire.accepts(queue, route):
                wire.add(queue, message, opts["headers"], opts["priority"])
                continue
            self.app.amqp.send_task_message(
                producer,
                d.task.task_type,
                message,
                queue=queue,
                declare=[],
                retry=False,
                event_dispatcher=lean.events,
                headers=opts["headers"],
                priority=opts["priority"],
                **route,
            )
        wire.flush()

    def _publish_reserved(self, producer: Any, lean: _LeanChannel, d: Dispatch, meanwhile: _Once | None) -> bool:
        """One message whose worker slot is reserved in the same round trip as its publish
        (``TaskRouter.pending``: the registry is the broker); False if the router would not, or
        the script did not take the slot and wrote nothing (the message is then routed again)."""
        router = self.router
        if router is None:
            return False
        opts = self.options(d)
        name = d.task.task_type
        reservation = router.pending(name, opts["kwargs"], opts)
        if reservation is None:
            return False
        queue, route, message = self._message(producer, lean, name, opts, {"queue": reservation.worker.queue})
        if not lean.wire.accepts_reserved(queue, route):
            return False
        reply = lean.wire.push_reserved(queue, message, opts["headers"], opts["priority"], reservation, meanwhile)
        return router.reserved(reservation, reply)

    def _message(
        self, producer: Any, lean: _LeanChannel, name: str, opts: dict[str, Any], destination: dict[str, Any]
    ) -> tuple[Any, dict[str, Any], Any]:
        """The queue (declared on the channel once), the rest of the route, and Celery's message
        for a publish of ``name`` with ``opts``, routed by the app's router (to ``destination``'s
        queue if it names one)."""
        amqp, conf = self.app.amqp, self.app.conf
        route = amqp.router.route(destination, name, opts["args"], opts["kwargs"])
        queue = route.pop("queue")
        declared = lean.declared
        if queue.name not in declared:
            declared[queue.name] = maybe_declare(queue(producer.channel), producer.channel)
        maxlevels = conf.task_repr_maxlevels
        message = amqp.create_task_message(
            opts["task_id"],
            name,
            opts["args"],
            opts["kwargs"],
            countdown=opts.get("countdown"),
            group_id=opts.get("group_id"),
            retries=opts["retries"],
            reply_to=self.app.thread_oid,
            time_limit=opts.get("time_limit"),
            soft_time_limit=opts.get("soft_time_limit"),
            create_sent_event=conf.task_send_sent_event,
            argsrepr=plain_repr(opts["args"], amqp.argsrepr_maxsize, maxlevels),
            kwargsrepr=plain_repr(opts["kwargs"], amqp.kwargsrepr_maxsize, maxlevels),
            root_id=opts.get("root_id"),
            parent_id=opts.get("parent_id"),
            ignore_result=None,
            priority=opts["priority"],
            **route,
        )
        self.app.backend.on_task_call(producer, opts["task_id"])
        return queue, route, message

    def _lean_batches(self) -> bool:
        return (
            self.redis_priorities
            and not signals.before_task_publish.receivers
            and not signals.after_task_publish.receivers
            and not signals.task_sent.receivers
            and self.app.current_worker_task is None
        )
