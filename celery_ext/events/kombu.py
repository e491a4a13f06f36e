"""The ``kombu`` event transport: a fanout exchange on the configured broker (Redis or RabbitMQ).

Every subscriber gets every event published after it subscribed.  On RabbitMQ a named ``queue``
keeps events for a subscriber that is away; on Redis, fanout is pub/sub and an absent subscriber
misses events (use the ``redis`` bus for catch-up).

Config keys (``events.config``):
  url:      broker URL (default: ``broker.url``)
  exchange: fanout exchange name (default ``<app.name>.events``)
  queue:    durable queue name for this subscriber (default: a private auto-deleted queue)
  linger:   how long a sender waits to batch events into one message (default 50ms)
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from kombu import Connection, Exchange, Producer, Queue
from pydantic import BaseModel, ConfigDict

from celery_ext.config import Duration, validate_section
from celery_ext.events.model import Event
from celery_ext.events.transport import Receive, Transport

logger = logging.getLogger("celery_ext.events")


class KombuBusSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    linger: Duration = 0.05
    url: str | None = None
    exchange: str | None = None
    queue: str | None = None


class KombuTransport(Transport):
    name = "kombu"

    def __init__(self, config: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.settings = validate_section(KombuBusSettings, self.config, "events.config")
        self.linger = self.settings.linger
        self.url = self.settings.url or self.broker_url
        self.exchange = Exchange(
            self.settings.exchange or f"{self.app_name}.events", type="fanout", durable=False, auto_delete=False
        )
        self._conn: Connection | None = None
        self._producer: Producer | None = None

    def after_fork(self) -> None:
        self._conn = self._producer = None

    def send(self, events: Sequence[Event], origin: str) -> None:
        if self._producer is None:
            self._conn = Connection(self.url, transport_options={"confirm_publish": False})
            self._producer = Producer(self._conn.default_channel, exchange=self.exchange, serializer="json")
            self.exchange(self._conn.default_channel).declare()
        try:
            # One message per batch: under load this is one broker round trip for many events.
            self._producer.publish(
                {"origin": origin, "events": [e.to_dict() for e in events]},
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.2},
            )
        except Exception:
            self.close()  # reconnect on the next batch
            raise

    def close(self) -> None:
        conn, self._conn, self._producer = self._conn, None, None
        if conn is not None:
            try:
                conn.release()
            except Exception:  # noqa: BLE001, S110 - closing a broken connection
                pass

    def listen(self, receive: Receive, stop: threading.Event, ready: threading.Event) -> None:
        name = self.settings.queue or f"{self.exchange.name}.{uuid.uuid4().hex[:12]}"
        private = self.settings.queue is None
        queue = Queue(name, exchange=self.exchange, durable=not private, exclusive=private, auto_delete=private)

        def on_message(body: Any, message: Any) -> None:
            try:
                for item in body["events"]:
                    receive(Event.from_dict(item), body.get("origin"), None)
            except (KeyError, TypeError, ValueError) as exc:
                logger.warning("event bus kombu: malformed message dropped: %s", exc)
            message.ack()

        with Connection(self.url) as conn, conn.Consumer(queue, callbacks=[on_message], accept=["json"]):
            while not stop.is_set():
                try:
                    conn.drain_events(timeout=0.2)
                except TimeoutError:
                    conn.heartbeat_check()
                ready.set()  # after the first poll: the binding (or Redis SUBSCRIBE) is in place
