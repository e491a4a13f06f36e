"""A Redis transport that survives garbage on its queues, installed under kombu's Redis schemes.

kombu's Redis channel decodes each popped message with ``json.loads`` inside the worker's event
loop; a single non-JSON entry pushed onto a queue raises there and stops the whole worker
("Unrecoverable error").  This channel logs and drops such an entry instead.

kombu builds a new ``redis.Redis`` for every synchronous command it sends (each event published,
each message's unacked bookkeeping and ack): ~75 us of Python apiece, four or more per task in
the worker's main process.  This channel keeps one per connection pool; a Redis client is
thread-safe and stateless apart from its pool, and pipelines are still made per call.

A fanout message (a task event: ``task-sent`` from a producer, ``task-received``, ``-started``,
``-succeeded`` from a worker) is a PUBLISH, whose reply (the count of subscribers) kombu waits
for and throws away: a round trip per event, three per task inside the worker's event loop.  This
channel writes them on a connection of its own with replies off (``nowait.py``): in
order, applied by Redis at once, a broken connection still raising to the caller (kombu's and
Celery's retry and error handling are unchanged).  A PUBLISH is fire-and-forget in Redis anyway:
a subscriber that is not connected misses it either way.

kombu's unacked bookkeeping is written the same way: a message's entry in the unacked hash and
index when it is fetched, and its removal by the ack (each one ``MULTI``/``EXEC``): two round
trips per task less in the worker's event loop.  Both go on the one connection, so Redis applies
them in order.  A requeue (a reject with ``requeue``, a restore at shutdown) reads the entry back on
another connection: it first waits for the writes sent so far to be applied (``sync``, one round
trip on that rare path).  An ack that a dying connection lost leaves the message in the hash, to
be restored after the visibility timeout as kombu does for a worker that died before its ack; its
record is then finished, and the worker drops the copy (the record's dispatch token or terminal
status says so).  An entry that a dying connection lost leaves the message out of the hash, as
kombu does when a worker dies between its fetch and its bookkeeping: if the worker then dies
before the ack, kombu cannot restore it, and the task's record (its lease runs out) is what
recovery publishes again.

Its connection pools are registered with ``celery_ext.forksafe``, so a pool process forked while
a thread of the worker held a pool's lock does not hang on it.

How it is installed (``install()``, called by ``celery_ext.factory.broker_for`` whenever
celery_ext builds an app): kombu's alias table ``kombu.transport.TRANSPORT_ALIASES`` maps the
``redis`` and ``rediss`` schemes to this class.  The broker URL therefore keeps its own scheme
(``redis://``, ``rediss://``, and ``redis+socket:///path/redis.sock`` for the embedded broker:
kombu splits ``redis+socket`` into the ``redis`` transport and a ``socket://`` host, which the
Redis channel connects to over the unix socket), so ``Connection.as_uri()`` reads
``redis://...``.  Tools that dispatch on that scheme keep working: Flower's Broker page and
``/api/queues/length`` (``flower/utils/broker.py`` supports ``redis``, ``rediss`` and
``redis+socket`` only) and the worker banner.  (Celery's ``broker_transport``
setting, used before, made the URI start with ``celery_ext.transport:Transport://``, and made a
``rediss://`` URL skip kombu's SSL defaulting for that scheme.)

The alias table is process-wide: this affects only processes that import celery_ext and build
an app (a worker, Flower or a producer run with ``-A celery_ext``, the CLI, an embedding
program).  There every kombu Redis connection uses this transport, which behaves as kombu's
apart from the points above; ``sentinel://`` keeps kombu's own.  A process that never
builds a celery_ext app keeps kombu's transport for every scheme.
"""

from __future__ import annotations

import contextlib
import logging
import time
from queue import Empty
from typing import Any

from kombu import transport as kombu_transport
from kombu.transport import redis, virtual
from kombu.utils.json import dumps

from celery_ext.forksafe import fork_safe_pool
from celery_ext.nowait import NoReplyWriter

logger = logging.getLogger("celery_ext.transport")

# celery-types describes kombu's Redis channel without the private methods (``_create_client``,
# ``_brpop_read``, ``_get_pool``) that this channel extends: they are reached through ``_base``.

#: URL schemes of a Redis broker, as kombu spells them.
REDIS_SCHEMES = ("redis://", "rediss://", "redis+socket://")
#: The aliases this transport is installed under (``redis+socket`` resolves through ``redis``;
#: it is listed for code that passes it as a transport name).
ALIASES = ("redis", "rediss", "redis+socket")
TRANSPORT = "celery_ext.transport:Transport"


def is_redis_url(url: str) -> bool:
    return str(url).startswith(REDIS_SCHEMES)


def redis_py_url(url: str) -> str:
    """A Redis broker URL as ``redis.Redis.from_url`` reads it: kombu's ``redis+socket://`` is
    redis-py's ``unix://``; the others are the same."""
    return "unix://" + url.removeprefix("redis+socket://") if url.startswith("redis+socket://") else url


def install() -> None:
    """Make kombu resolve the Redis schemes to this transport (idempotent; see the module doc)."""
    for alias in ALIASES:
        if kombu_transport.TRANSPORT_ALIASES.get(alias) != TRANSPORT:
            kombu_transport.TRANSPORT_ALIASES[alias] = TRANSPORT
            # get_transport_cls caches by name: forget a class resolved before this call.
            kombu_transport._transport_cache.pop(alias, None)  # type: ignore[attr-defined]


class QoS(redis.QoS):
    """kombu's unacked bookkeeping, its writes with replies off (see the module's docstring)."""

    def append(self, message: Any, delivery_tag: Any) -> None:
        channel: Any = self.channel  # this module's Channel
        delivery = message.delivery_info
        entry = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        self._transaction(
            ("ZADD", channel.unacked_index_key, time.time(), delivery_tag),
            ("HSET", channel.unacked_key, delivery_tag, entry),
        )
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: Any) -> None:
        channel: Any = self.channel
        self._transaction(
            ("ZREM", channel.unacked_index_key, delivery_tag),
            ("HDEL", channel.unacked_key, delivery_tag),
        )
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if requeue:
            super().reject(delivery_tag, requeue=True)  # restore_by_tag, below
        else:
            self.ack(delivery_tag)  # kombu's reject without requeue is its ack

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
        # kombu reads the message back from the unacked hash on another connection: the append
        # (and any ack) written without replies must be applied first.
        channel: Any = self.channel
        channel.no_reply_writer().sync()
        super().restore_by_tag(tag, client=client, leftmost=leftmost)

    def _transaction(self, *commands: tuple[Any, ...]) -> None:
        channel: Any = self.channel
        channel.no_reply_writer().send_many([("MULTI",), *commands, ("EXEC",)])


class Channel(redis.Channel):
    QoS = QoS
    _sync_client: Any = None
    _no_reply_writer: NoReplyWriter | None = None
    connection_errors: tuple[type[BaseException], ...]

    def _base(self) -> Any:
        return super()

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return self._base()._create_client(asynchronous=True)
        client = self._sync_client
        if client is None or client.connection_pool is not self.pool:  # a new pool after a reconnect
            client = self._sync_client = self._base()._create_client()
        return client

    def _put_fanout(self, exchange: Any, message: Any, routing_key: Any, **kwargs: Any) -> None:
        if kwargs.get("_publish_batch") is not None:  # kombu's batch publish pipelines it already
            self._base()._put_fanout(exchange, message, routing_key, **kwargs)
            return
        payload = dumps(message)
        writer = self.no_reply_writer()
        for topic in self._base()._get_publish_topics(exchange, routing_key):
            writer.send("PUBLISH", topic, payload)

    def no_reply_writer(self) -> NoReplyWriter:
        """This channel's connection with replies off: task events (``_put_fanout``) and kombu's
        unacked bookkeeping (``QoS``)."""
        client = self._create_client()
        writer = self._no_reply_writer
        if writer is None or writer.client is not client:  # a new client after a reconnect
            if writer is not None:
                writer.close()
            writer = self._no_reply_writer = NoReplyWriter(client)
        return writer

    def close(self) -> None:
        writer, self._no_reply_writer = self._no_reply_writer, None
        if writer is not None:
            with contextlib.suppress(Exception):  # a connection already gone has nothing to apply
                writer.sync()  # kombu's close restores the unacked messages next, on another connection
            writer.close()
        self._base().close()

    def _brpop_read(self, **options: Any) -> Any:
        try:
            return self._base()._brpop_read(**options)
        except self.connection_errors:
            raise
        except Empty:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            # The entry was already popped: it is dropped, with a line saying why.
            logger.error("dropped a malformed message from the broker (not a kombu JSON envelope): %r", exc)
            return True

    def _get_pool(self, asynchronous: bool = False) -> Any:
        # The worker forks pool processes; its pools must not hand them a held lock (forksafe).
        return fork_safe_pool(self._base()._get_pool(asynchronous))


class Transport(redis.Transport):
    Channel = Channel
