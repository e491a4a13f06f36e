"""Pushed completion: waiting for a task's end costs no database polling.

When a record becomes terminal, the process that wrote it PUBLISHes the task id on a Redis
channel (``<app>:done:<task_id>``).  A waiter (``TaskManager.wait``, ``AsyncResult.get()``)
subscribes first, then reads the record once, then sleeps on the subscription until the message
comes, and reads the record again.  A lost message costs at most ``fallback`` seconds: the
waiter re-reads the record that often anyway.

The Redis is the worker registry's (``scheduler.registry_url``, else a Redis broker, else the
embedded one).  With no Redis (a RabbitMQ broker and no registry), waiting polls the record with
a growing interval, as before.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis

from celery_ext.forksafe import fork_safe_pool

logger = logging.getLogger("celery_ext.completion")

T = TypeVar("T")


class Completion:
    def __init__(self, url: str | None, prefix: str, *, fallback: float = 1.0) -> None:
        self.url = url
        self.prefix = prefix
        self.fallback = fallback
        self._client: Any = None
        self._lock = threading.Lock()
        self._local = threading.local()
        self._warned = 0.0

    def channel(self, task_id: str) -> str:
        return f"{self.prefix}:done:{task_id}"

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    client = redis.Redis.from_url(self.url or "", socket_timeout=5, socket_connect_timeout=2)
                    fork_safe_pool(client.connection_pool)
                    self._client = client
        return self._client

    def notify(self, task_id: str) -> None:
        """Wake whoever waits for ``task_id`` (never raises: the record is already written)."""
        if not self.url:
            return
        try:
            self.client.publish(self.channel(task_id), b"1")
        except Exception as exc:  # noqa: BLE001 - waiters fall back to reading the record
            now = time.monotonic()
            if now - self._warned > 10:
                self._warned = now
                logger.warning("could not publish the completion of %s (waiters poll instead): %s", task_id, exc)

    def wait(self, task_id: str, read: Callable[[], T], done: Callable[[T], bool], timeout: float | None) -> T:
        """``read()`` until ``done(value)``; returns the last value read (not done: timed out)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        channel = self.channel(task_id)
        pubsub = self._subscribe(channel)
        try:
            delay = 0.02
            while True:
                value = read()
                if done(value):
                    return value
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return value
                if pubsub is not None:
                    pubsub = self._listen(
                        pubsub, channel, self.fallback if remaining is None else min(self.fallback, remaining)
                    )
                else:
                    time.sleep(delay if remaining is None else min(delay, remaining))
                    delay = min(delay * 1.5, 0.5)
        finally:
            if pubsub is not None:
                self._release(pubsub, channel)

    # Each thread keeps one subscriber connection and reuses it: opening one per wait would cost
    # a TCP connect, since redis-py disconnects a PubSub when it is closed.

    def _subscribe(self, channel: str) -> Any:
        if not self.url:
            return None
        pubsub = getattr(self._local, "pubsub", None)
        if pubsub is None or getattr(self._local, "pid", None) != os.getpid():
            pubsub = None
        try:
            if pubsub is None:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                self._local.pubsub, self._local.pid = pubsub, os.getpid()
            pubsub.subscribe(channel)
            return pubsub
        except Exception as exc:  # noqa: BLE001 - Redis away: poll the record
            logger.debug("completion channel unavailable, polling: %s", exc)
            self._drop(pubsub)
            return None

    def _listen(self, pubsub: Any, channel: str, timeout: float) -> Any:
        """Sleep until a message on ``channel`` or ``timeout``; the pubsub, or None if it broke."""
        end = time.monotonic() + timeout
        try:
            while True:
                message = pubsub.get_message(timeout=max(0.0, end - time.monotonic()))
                if message is None or _text(message.get("channel")) == channel or time.monotonic() >= end:
                    return pubsub  # a late message of an earlier wait on this connection is skipped
        except Exception:  # noqa: BLE001 - fall back to polling
            self._drop(pubsub)
            return None

    def _release(self, pubsub: Any, channel: str) -> None:
        try:
            pubsub.unsubscribe(channel)
        except Exception:  # noqa: BLE001
            self._drop(pubsub)

    def _drop(self, pubsub: Any) -> None:
        if getattr(self._local, "pubsub", None) is pubsub:
            self._local.pubsub = None
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:  # noqa: BLE001, S110 - closing a dead connection
                pass

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
