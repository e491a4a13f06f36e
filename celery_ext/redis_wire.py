"""A batch of Celery task messages and their task-sent events written into Redis pipelines.

On Redis, publishing one task message costs ~150 us of Python in kombu's and Celery's generic
publish path (``send_task_message`` -> ``Producer.publish`` -> ``Channel.basic_publish`` ->
``_put``, and the same again for the task-sent event; profiled in docs/benchmarks.md).  Most of
it is dispatch around a few steps, which this module runs with kombu's and Celery's own functions:

  body      kombu's serializer registry (``task_serializer``); for JSON, the same JSON value
            by orjson (``envelope_dumps``)
  envelope  the channel's ``prepare_message`` and what its ``_inplace_augment_message`` adds
            (``augment``: base64 body, delivery tag, delivery info), as ``basic_publish`` does,
            with the delivery mode and priority ``send_task_message`` and ``Producer.publish``
            give it
  key       the channel's ``_q_for_pri``: ``queue`` or ``queue\\x06\\x16<step>`` (kombu's ``_put``)
  event     Celery's ``EventDispatcher._prepare_event`` (clock, utcoffset, pid, timestamp)

The messages and events are those Celery would send (tests/integration/test_dispatch_batch.py
reads both back raw from Redis and compares them).  A flush sends one LPUSH per queue key with
all of its messages, then the batch's task-sent events, in one non-transactional pipeline: every
event follows its message.  The events go out as one list, PUBLISHed to the channel's fanout
topics for ``task.multi``, the form in which a Celery worker sends its buffered task events
(``EventDispatcher.flush``) and every Celery event receiver (Flower's too) reads as the events
one after another; one PUBLISH and one envelope per flush instead of one per message (a fifth of
a batch's publishing time, profiled in docs/benchmarks.md).  A message for any other destination
(a non-direct exchange, a route naming an exchange or routing key) is not taken here
(``accepts``): the caller sends it through Celery.

``push_reserved`` writes a single message and its event through the router's reservation script
instead (``WorkerRegistry.reserve_push``): the worker's slot, then the message, in one call.  Its
caller's other work (``meanwhile``: a single submit's insert, ``TaskManager.submit``) runs between
the script's send and the read of its reply, so the message leaves first and the round trips
overlap (``run_script``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import orjson
from celery import Celery
from kombu import serialization
from kombu.entity import maybe_delivery_mode
from kombu.serialization import dumps as serialize
from kombu.utils import json as kombu_json
from redis.exceptions import NoScriptError

from celery_ext.model import new_uuid

EVENT = "task-sent"
EVENT_ROUTING_KEY = "task.multi"  # a list of task events, as a worker's buffered ones
# kombu's ``_put`` writes ``kombu.utils.json.dumps(envelope)``, i.e. ``json.dumps(envelope,
# cls=JSONEncoder)``: the same encoder with the same defaults, made once instead of per call.
json_dumps = kombu_json.JSONEncoder().encode
# orjson encodes an envelope 20x faster than that encoder (measured: 0.9 against 18 us).  What
# kombu's encoder writes in its own form (a datetime, a dataclass) or could write otherwise (a
# subclass of str, int or dict) orjson is told to refuse, as it refuses what it cannot encode (a
# Decimal, an int over 64 bits, a key that is not a string): such an envelope goes to kombu's
# encoder.  (An enum it encodes as its value, as json does a str or int enum.)
ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATACLASS


def envelope_dumps(envelope: Any) -> str | bytes:
    """kombu's ``json_dumps(envelope)``: the same JSON value, as UTF-8 bytes by orjson (kombu's
    Redis transport decodes either), or by kombu's encoder where orjson refuses a value."""
    try:
        return orjson.dumps(envelope, option=ORJSON_OPTIONS)
    except TypeError:
        return json_dumps(envelope)


def serializer(name: str) -> Callable[[Any], tuple[str, str, Any]]:
    """kombu's ``serialization.dumps(data, serializer=name)``; for kombu's own JSON encoder
    (``registry.register('json', kombu.utils.json.dumps, ...)``) the same JSON value by
    ``envelope_dumps`` (its UTF-8, the content encoding kombu declares for it)."""
    entry = serialization.registry._encoders.get(name)  # type: ignore[attr-defined]
    if entry is None or entry.encoder is not kombu_json.dumps:
        return lambda data: serialize(data, serializer=name)
    content_type, encoding = entry.content_type, entry.content_encoding
    return lambda data: (content_type, encoding, envelope_dumps(data))


def run_script(client: Any, script: Any, keys: list[Any], args: list[Any], meanwhile: Callable[[], None]) -> Any:
    """``script(keys, args)`` (a redis-py ``Script``) on ``client``, with ``meanwhile()`` called
    after the EVALSHA is sent and before its reply is read: that work overlaps the round trip.
    The reply is read whatever ``meanwhile`` does.  A client that rewrites commands (kombu's
    ``global_keyprefix`` prefixes the keys in ``execute_command``) runs ``meanwhile`` first and
    the script as usual, and so does a server that lost the script (NOSCRIPT: loaded again by
    redis-py's ``Script``)."""
    if getattr(client, "global_keyprefix", None):
        meanwhile()
        return script(keys=keys, args=args, client=client)
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            meanwhile()
        finally:
            reply = conn.read_response()
    except NoScriptError:
        pool.release(conn)
        return script(keys=keys, args=args, client=client)
    except BaseException:
        conn.disconnect()  # the reply may be unread: the connection is out of step
        pool.release(conn)
        raise
    pool.release(conn)
    return reply


def augment(channel: Any, envelope: dict[str, Any], exchange: str, routing_key: str) -> None:
    """kombu's ``Channel._inplace_augment_message``, its delivery tag (``str(uuid4())``, from
    ``_next_delivery_tag``) made by ``new_uuid`` (a third of the time)."""
    envelope["body"], body_encoding = channel.encode_body(envelope["body"], channel.body_encoding)
    props = envelope["properties"]
    props.update(body_encoding=body_encoding, delivery_tag=new_uuid())
    props["delivery_info"].update(exchange=exchange, routing_key=routing_key)


class RedisWire:
    """Collects a batch's messages for one kombu Redis ``channel`` and writes them on ``flush``
    (also every ``max_messages``); ``events`` is the batch's ``EventDispatcher`` (its exchange
    bound to ``channel``), or ``None`` without task-sent events.  Not thread-safe: one per
    channel (``Dispatcher`` keeps it with the channel, which one thread uses at a time)."""

    def __init__(self, app: Celery, channel: Any, events: Any, max_messages: int) -> None:
        self.channel = channel
        self.events = events
        self.max_messages = max_messages
        self.serialize = serializer(app.conf.task_serializer)
        self.serialize_event = serializer(events.serializer) if events is not None else self.serialize
        self.default_delivery_mode = app.conf.task_default_delivery_mode
        self._pushes: dict[str, list[str | bytes]] = {}
        self._events: list[dict[str, Any]] = []
        self._expiring: dict[str, int] = {}
        self._count = 0
        self._topics: Sequence[str] = ()
        if events is not None:
            self._topics = channel._get_publish_topics(events.exchange.name, EVENT_ROUTING_KEY)

    @staticmethod
    def accepts(queue: Any, route: dict[str, Any]) -> bool:
        """Whether a message routed to ``queue`` (with ``route``'s other options) goes to the
        queue's own Redis list: a direct exchange, nothing in the route but the queue."""
        return not route and getattr(queue.exchange, "type", "direct") == "direct"

    def add(self, queue: Any, message: Any, headers: dict[str, Any], priority: int) -> None:
        """One task message (``amqp.create_task_message``'s) for ``queue``, with ``headers``
        merged into Celery's as ``send_task_message`` does, and its task-sent event."""
        key, envelope, event = self._prepare(queue, message, headers, priority)
        self._pushes.setdefault(key, []).append(envelope)
        qname = queue.name
        if qname in self.channel._expires:  # x-expires: kombu refreshes every priority list's TTL
            self._expiring[qname] = self.channel._expires[qname]
        if event is not None:
            self._events.append(event)
        self._count += 1
        if self._count >= self.max_messages:
            self.flush()

    def push_reserved(
        self,
        queue: Any,
        message: Any,
        headers: dict[str, Any],
        priority: int,
        reservation: Any,
        meanwhile: Callable[[], None] | None = None,
    ) -> int:
        """Write one message as ``add`` and ``flush`` would, through the reservation's script
        (``TaskRouter.pending``): only if it takes the worker's slot, in the same round trip.
        Returns the script's reply (the worker's new in-flight count, or -1/-2: nothing was
        written).  ``queue`` must have no ``x-expires`` (``accepts_reserved``).  ``meanwhile`` is
        called once the script is sent, before its reply is read (``run_script``)."""
        key, envelope, event = self._prepare(queue, message, headers, priority)
        events = self._events_envelope([event]) if event is not None else b""
        topics = self._topics if event is not None else ()
        keys = [reservation.keys[0], key, *reservation.keys[1:]]
        args = [*reservation.args, envelope, events, *topics]
        with self.channel.conn_or_acquire() as client:
            if meanwhile is None:
                return int(reservation.script(keys=keys, args=args, client=client))
            return int(run_script(client, reservation.script, keys, args, meanwhile))

    def accepts_reserved(self, queue: Any, route: dict[str, Any]) -> bool:
        """Whether ``push_reserved`` can write a message for ``queue``: ``accepts``, and no queue
        TTL to refresh."""
        return self.accepts(queue, route) and queue.name not in self.channel._expires

    def _prepare(
        self, queue: Any, message: Any, headers: dict[str, Any], priority: int
    ) -> tuple[str, str | bytes, dict[str, Any] | None]:
        """The list key, the envelope as kombu's ``_put`` would write it, and the prepared
        task-sent event (None without one) of a message for ``queue``."""
        ch, qname = self.channel, queue.name
        task_headers, properties, body, sent_event = message
        task_headers.update(headers)
        properties["delivery_mode"] = maybe_delivery_mode(queue.exchange.delivery_mode or self.default_delivery_mode)
        content_type, encoding, payload = self.serialize(body)
        envelope = ch.prepare_message(payload, priority, content_type, encoding, task_headers, properties)
        augment(ch, envelope, "", qname)
        key = ch._q_for_pri(qname, ch._get_message_priority(envelope, reverse=False))
        event = None
        if sent_event is not None and self.events is not None:
            sent_event.update({"queue": qname, "exchange": "", "routing_key": qname})
            event = self.events._prepare_event(EVENT, sent_event)
        return key, envelope_dumps(envelope), event

    def _events_envelope(self, events: list[dict[str, Any]]) -> str | bytes:
        """The batch's task-sent events as one ``task.multi`` message, as kombu's ``basic_publish``
        would wrap it for the event exchange."""
        evd, ch = self.events, self.channel
        assert evd is not None
        content_type, encoding, payload = self.serialize_event(events)
        envelope = ch.prepare_message(
            payload, 0, content_type, encoding, evd.headers, {"delivery_mode": maybe_delivery_mode(evd.delivery_mode)}
        )
        augment(ch, envelope, evd.exchange.name, EVENT_ROUTING_KEY)
        return envelope_dumps(envelope)

    def clear(self) -> None:
        """Drop what was added and not flushed."""
        self._pushes, self._events, self._expiring, self._count = {}, [], {}, 0

    def flush(self) -> None:
        """Write what was added: one round trip."""
        if not self._count:
            return
        pushes, events, expiring = self._pushes, self._events, self._expiring
        self.clear()
        with self.channel.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
            for key, values in pushes.items():
                pipe.lpush(key, *values)
            for qname, ttl in expiring.items():
                for step in self.channel.priority_steps:
                    pipe.pexpire(self.channel._q_for_pri(qname, step), ttl)
            if events:
                payload = self._events_envelope(events)
                for topic in self._topics:
                    pipe.publish(topic, payload)
            pipe.execute()
