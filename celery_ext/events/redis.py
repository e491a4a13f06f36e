"""The ``redis`` event transport: a Redis Stream, bounded with ``MAXLEN ~``.

Without ``group`` a subscriber reads events published after it subscribed.  With ``group`` it
reads through a consumer group: a subscriber that was down gets what it missed on restart (as
far back as the stream's length allows), and unacknowledged events are delivered again.  Several
subscribers with the same group share the events; different groups each get all of them.

Config keys (``events.config``):
  url:      Redis URL (default: ``broker.url`` when it is a Redis URL)
  stream:   stream key (default ``<app.name>.events``)
  maxlen:   approximate bound on the stream length (default 100000)
  group:    consumer group of this subscriber (default: none, live events only)
  consumer: consumer name within the group (default: host name)
  linger:   how long a sender waits to batch events into one pipeline (default 50ms)
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from celery_ext.config import Duration, validate_section
from celery_ext.errors import ConfigError
from celery_ext.events.model import Event
from celery_ext.events.transport import Receive, Transport
from celery_ext.forksafe import fork_safe
from celery_ext.transport import is_redis_url, redis_py_url

logger = logging.getLogger("celery_ext.events")


class RedisBusSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    linger: Duration = 0.05
    url: str | None = None
    stream: str | None = None
    maxlen: int = Field(100_000, ge=1)
    group: str | None = None
    consumer: str | None = None


class RedisTransport(Transport):
    name = "redis"

    def __init__(self, config: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.settings = validate_section(RedisBusSettings, self.config, "events.config")
        self.linger = self.settings.linger
        url = self.settings.url or self.broker_url
        if not (is_redis_url(url) or url.startswith("unix://")):  # kombu's or redis-py's spelling
            raise ConfigError(f"events.config.url: the redis event bus needs a Redis URL (got {url!r})")
        self.url = redis_py_url(url)
        self.stream = self.settings.stream or f"{self.app_name}.events"
        self._client: Any = None

    def _redis(self) -> Any:
        import redis

        # fork_safe: the sender thread may be inside the pool when the worker forks a pool process.
        return fork_safe(redis.Redis.from_url(self.url, socket_timeout=10, socket_connect_timeout=5))

    def after_fork(self) -> None:
        self._client = None

    def send(self, events: Sequence[Event], origin: str) -> None:
        if self._client is None:
            self._client = self._redis()
        pipe = self._client.pipeline(transaction=False)
        for event in events:
            pipe.xadd(
                self.stream,
                {"origin": origin, "event": event.to_json()},
                maxlen=self.settings.maxlen,
                approximate=True,
            )
        pipe.execute()

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def listen(self, receive: Receive, stop: threading.Event, ready: threading.Event) -> None:
        client = self._redis()
        try:
            if self.settings.group:
                self._listen_group(client, self.settings.group, receive, stop, ready)
            else:
                self._listen_live(client, receive, stop, ready)
        finally:
            client.close()

    def _listen_live(self, client: Any, receive: Receive, stop: threading.Event, ready: threading.Event) -> None:
        last = self._last_id(client)
        ready.set()
        while not stop.is_set():
            for _stream, entries in client.xread({self.stream: last}, count=500, block=500) or ():
                for entry_id, fields in entries:
                    last = entry_id
                    _take(receive, fields)

    def _listen_group(
        self, client: Any, group: str, receive: Receive, stop: threading.Event, ready: threading.Event
    ) -> None:
        import redis

        consumer = self.settings.consumer or socket.gethostname()
        try:
            client.xgroup_create(self.stream, group, id="$", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        ready.set()
        # First what this consumer took but never acknowledged, then new entries.
        pending, cursor = True, "0"
        while not stop.is_set():
            reply = client.xreadgroup(
                group, consumer, {self.stream: cursor if pending else ">"}, count=500, block=None if pending else 500
            )
            entries = reply[0][1] if reply else []
            if pending and not entries:
                pending = False
                continue
            for entry_id, fields in entries:
                if pending:
                    cursor = entry_id
                _take(receive, fields, lambda i=entry_id: client.xack(self.stream, group, i))

    def _last_id(self, client: Any) -> Any:
        entries = client.xrevrange(self.stream, count=1)
        return entries[0][0] if entries else "0-0"


def _take(receive: Receive, fields: Mapping[bytes, bytes], ack: Any = None) -> None:
    try:
        event = Event.from_json(fields[b"event"])
    except (KeyError, ValueError) as exc:
        logger.warning("event bus redis: malformed entry dropped: %s", exc)
        if ack:
            ack()
        return
    origin = fields.get(b"origin")
    receive(event, origin.decode() if origin else None, ack)
