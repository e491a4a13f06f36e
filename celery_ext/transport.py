"""A Redis transport that survives garbage on its queues, and reaches a unix socket by option.

kombu's Redis channel decodes each popped message with ``json.loads`` inside the worker's event
loop; a single non-JSON entry pushed onto a queue raises there and stops the whole worker
("Unrecoverable error").  This channel logs and drops such an entry instead.

Transport option ``unix_socket_path`` connects over a unix socket (used by the embedded broker:
kombu only honours sockets in ``redis+socket://`` URLs, which bypass a custom transport class).

kombu builds a new ``redis.Redis`` for every synchronous command it sends (each event published,
each message's unacked bookkeeping and ack): ~75 us of Python apiece, four or more per task in
the worker's main process.  This channel keeps one per connection pool; a Redis client is
thread-safe and stateless apart from its pool, and pipelines are still made per call.
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis

from celery_ext.forksafe import fork_safe_pool

logger = logging.getLogger("celery_ext.transport")


class Channel(redis.Channel):  # type: ignore[misc]
    _sync_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._sync_client
        if client is None or client.connection_pool is not self.pool:  # a new pool after a reconnect
            client = self._sync_client = super()._create_client()
        return client

    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)
        except self.connection_errors:
            raise
        except redis.Empty:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            # The entry was already popped: it is dropped, with a line saying why.
            logger.error("dropped a malformed message from the broker (not a kombu JSON envelope): %r", exc)
            return True

    def _get_pool(self, asynchronous: bool = False) -> Any:
        # The worker forks pool processes; its pools must not hand them a held lock (forksafe).
        return fork_safe_pool(super()._get_pool(asynchronous))

    def _connparams(self, asynchronous: bool = False) -> Any:
        path = self.connection.client.transport_options.get("unix_socket_path")
        if not path:
            return super()._connparams(asynchronous)
        # kombu wraps connection_class for its event loop; give it the socket class to wrap.
        self.connection_class = redis.redis.UnixDomainSocketConnection
        params = self._filter_tcp_connparams(**super()._connparams(asynchronous))
        for key in ("host", "port", "socket_connect_timeout"):
            params.pop(key, None)
        params["path"] = path
        return params


class Transport(redis.Transport):  # type: ignore[misc]
    Channel = Channel
