"""Pushed completion: waiting for a task's end costs no database polling.

When a record becomes terminal, the process that wrote it PUBLISHes on a Redis channel
(``<app>:done:<task_id>``), after the write is committed.  A run's outcome is pushed with what
its claim and its outcome wrote (status, result, error, attempt, worker, times: ``PUSHED``), as
JSON; any other end (a cancel, a step failed by its parent), or an outcome over ``MAX_PUSH``
bytes, is pushed as a bare wake-up.  A waiter (``TaskManager.wait``, ``AsyncResult.get()``)
subscribes first, then reads the record once, then sleeps on the subscription.  When the message
carries an outcome of the run it read, it lays those fields over that record and needs no
second read (``merged``); otherwise it reads the record again.  The record stays the truth: the
message is a copy of what was just committed.  A lost message costs at most ``fallback``
seconds: the waiter re-reads the record that often anyway.

A thread that waits for what it submits skips the subscription and the read: once it has waited,
``submit`` subscribes it to the task's channel before publishing the message (``expect``; Celery's
Redis result backend subscribes on publish the same way), and the record as submitted stands in
for the first read.  The SUBSCRIBE is sent before the message's LPUSH, so Redis has applied it
before any worker can have taken the message, let alone published its outcome.  Messages of other
expected tasks that a wait reads past are kept for their own waits.  A thread that submits
without waiting stops subscribing as soon as one expected task goes unwaited (``MAX_EXPECTED``).

The PUBLISH is written without waiting for Redis's reply (``NoReplyWriter``: nothing uses the
count of subscribers it returns), so a pool process does not sleep a round trip per task after
its outcome is committed.  The worker's routing slot is released in the same write (``also``):
one send a task instead of two.

The Redis is the worker registry's (``scheduler.registry_url``, else a Redis broker, else the
embedded one).  With no Redis (a RabbitMQ broker and no registry), waiting polls the record with
a growing interval, as before.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import redis

from celery_ext.forksafe import fork_safe_pool
from celery_ext.model import Task, TaskErrorInfo, TaskStatus
from celery_ext.nowait import NoReplyWriter

logger = logging.getLogger("celery_ext.completion")

R = TypeVar("R", Task, Task | None)
MAX_PUSH = 64 * 1024  # a larger outcome is read from the record
MAX_EXPECTED = 64  # tasks a thread is subscribed to before their wait (``expect``)
WAKE = b"1"
# What a run's claim and outcome write: all that can differ from a record read before the claim.
PUSHED = ("status", "attempt", "run", "worker_id", "dispatch_token", "result", "lease_until")
PUSHED_TIMES = ("queued_at", "started_at", "finished_at", "updated_at")


class Completion:
    def __init__(self, url: str | None, prefix: str, *, fallback: float = 1.0) -> None:
        self.url = url
        self.prefix = prefix
        self.fallback = fallback
        self._client: Any = None
        self._writer: NoReplyWriter | None = None
        self._lock = threading.Lock()
        self._local = threading.local()
        self._warned = 0.0
        #: Commands written after a run's pushed outcome, in the same write, given the task id:
        #: the worker's slot release (``routing/heartbeat.py``); none outside a worker's run.
        self.also: Callable[[str], list[tuple[Any, ...]]] | None = None

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

    def notify(self, task_id: str, final: Task | None = None) -> None:
        """Wake whoever waits for ``task_id``, with ``final`` (the record a run's outcome just
        committed) when given; never raises: the record is already written."""
        if not self.url:
            return
        try:
            if self._writer is None:
                self._writer = NoReplyWriter(self.client)
            commands: list[tuple[Any, ...]] = [
                ("PUBLISH", self.channel(task_id), WAKE if final is None else pushed(final))
            ]
            if final is not None and self.also is not None:
                commands += self.also(task_id)
            self._writer.send_many(commands)
        except Exception as exc:  # noqa: BLE001 - waiters fall back to reading the record
            now = time.monotonic()
            if now - self._warned > 10:
                self._warned = now
                logger.warning("could not publish the completion of %s (waiters poll instead): %s", task_id, exc)

    def expect(self, task: Task) -> None:
        """Subscribe this thread to ``task``'s channel before its message is published, so that
        a wait for it in this thread needs neither a subscription nor a read of the record: the
        record is ``task`` as submitted, and its outcome arrives as a message (Celery's Redis
        result backend subscribes on publish the same way).  Only in a thread that waits: it
        starts with a wait, and stops when a task expected was never waited for (then the
        thread submits without waiting, and subscribing would only cost it).  So at most
        ``MAX_EXPECTED`` messages wait unread on the thread's connection between two waits."""
        local = self._local
        if not getattr(local, "presubscribe", False) or getattr(local, "pid", None) != os.getpid():
            return
        pubsub = getattr(local, "pubsub", None)
        if pubsub is None:
            return
        expected: OrderedDict[str, list[Any]] = local.expected
        try:
            channel = self.channel(task.task_id)
            pubsub.subscribe(channel)  # sent before the publish: applied before any outcome's PUBLISH
            expected[channel] = [task, None]
            while len(expected) > MAX_EXPECTED:
                old, _ = expected.popitem(last=False)
                pubsub.unsubscribe(old)
                local.presubscribe = False  # expected and never waited for
        except Exception:  # noqa: BLE001 - a wait subscribes again, or polls
            self._drop(pubsub)

    def wait(self, task_id: str, read: Callable[[], R], timeout: float | None) -> R:
        """``read()`` until the record is terminal, or a pushed outcome of the run read ends it;
        returns the last record (not terminal, or None for no record yet: timed out).  For a task
        this thread ``expect``-ed, its submitted record stands in for the first read."""
        deadline = None if timeout is None else time.monotonic() + timeout
        channel = self.channel(task_id)
        early = self._expected(channel)
        pubsub = self._local.pubsub if early is not None else self._subscribe(channel)
        if pubsub is not None:
            self._local.presubscribe = True
        try:
            delay = 0.02
            task: R
            while True:
                if early is not None:
                    submitted, data = early
                    early = None
                    final = merged(submitted, data) if data is not None else None  # came before the wait
                    if final is not None:
                        return final
                    task = read() if data is not None else submitted
                else:
                    task = read()
                if task is not None and task.status.terminal:
                    return task
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return task
                if pubsub is not None:
                    pubsub, data = self._listen(
                        pubsub, channel, self.fallback if remaining is None else min(self.fallback, remaining)
                    )
                    final = merged(task, data) if task is not None else None
                    if final is not None:
                        return final
                else:
                    time.sleep(delay if remaining is None else min(delay, remaining))
                    delay = min(delay * 1.5, 0.5)
        finally:
            if pubsub is not None:
                self._release(pubsub, channel)

    def _expected(self, channel: str) -> tuple[Task, Any] | None:
        """The record submitted for ``channel``'s task and the message that came for it already,
        if this thread subscribed to it before the publish (and its connection still stands)."""
        local = self._local
        expected = getattr(local, "expected", None)
        if not expected or getattr(local, "pubsub", None) is None or getattr(local, "pid", None) != os.getpid():
            return None
        entry = expected.pop(channel, None)
        return None if entry is None else (entry[0], entry[1])

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
                pubsub = self.client.pubsub()
                self._local.pubsub, self._local.pid = pubsub, os.getpid()
                self._local.expected = OrderedDict()
            pubsub.subscribe(channel)
            return pubsub
        except Exception as exc:  # noqa: BLE001 - Redis away: poll the record
            logger.debug("completion channel unavailable, polling: %s", exc)
            self._drop(pubsub)
            return None

    def _listen(self, pubsub: Any, channel: str, timeout: float) -> tuple[Any, Any]:
        """Sleep until a message on ``channel`` or ``timeout``: the pubsub (None if it broke) and
        the message's data (None if none came)."""
        end = time.monotonic() + timeout
        try:
            while True:
                message = pubsub.get_message(timeout=max(0.0, end - time.monotonic()))
                if message is None:
                    return pubsub, None
                if message.get("type") != "message":
                    # A (un)subscribe confirmation: read past it.  (redis-py returns None for
                    # one it is told to ignore, the same as for no message: the wait would
                    # then read the record again at once, for nothing.)
                    continue
                got = _text(message.get("channel"))
                if got == channel:
                    return pubsub, message.get("data")
                self._keep(got, message.get("data"))
                if time.monotonic() >= end:
                    return pubsub, None  # a late message of an earlier wait on this connection is skipped
        except Exception:  # noqa: BLE001 - fall back to polling
            self._drop(pubsub)
            return None, None

    def _keep(self, channel: str, data: Any) -> None:
        """A message for a task expected and not waited for yet: kept for its wait."""
        entry = getattr(self._local, "expected", {}).get(channel)
        if entry is not None:
            entry[1] = data

    def _release(self, pubsub: Any, channel: str) -> None:
        try:
            pubsub.unsubscribe(channel)
        except Exception:  # noqa: BLE001
            self._drop(pubsub)

    def _drop(self, pubsub: Any) -> None:
        if getattr(self._local, "pubsub", None) is pubsub:
            self._local.pubsub = None
            self._local.expected = OrderedDict()  # its subscriptions went with it
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:  # noqa: BLE001, S110 - closing a dead connection
                pass

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._client is not None:
            self._client.close()
            self._client = None


def pushed(final: Task) -> bytes:
    """The message for a run's outcome: ``final``'s ``PUSHED`` fields as JSON (a bare wake-up if
    that is over ``MAX_PUSH`` bytes or not JSON)."""
    out: dict[str, Any] = {key: getattr(final, key) for key in PUSHED}
    out.update({key: _iso(getattr(final, key)) for key in PUSHED_TIMES})
    out["error"] = final.error.to_dict() if final.error else None
    if final.args:  # written by the claim only when the message carried some
        out["args"] = final.args
    try:
        data = json.dumps(out, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError, RecursionError):
        return WAKE
    return data if len(data) <= MAX_PUSH else WAKE


def merged(read: Task, data: Any) -> Task | None:
    """The terminal record a pushed outcome makes of the record ``read`` while waiting, or None
    (a bare wake-up, no message, or an outcome of another run or attempt: read it instead).
    The claim and the outcome of one attempt are all that can have changed since a read of the
    same attempt running, or of the record queued for it."""
    if not isinstance(data, bytes | str) or data in (WAKE, WAKE.decode()):
        return None
    try:
        out = json.loads(data)
        status = TaskStatus(out["status"])
        same = out["run"] == read.run and (
            out["attempt"] == read.attempt
            or (out["attempt"] == read.attempt + 1 and read.status in (TaskStatus.PENDING, TaskStatus.QUEUED))
        )
        if not status.terminal or not same:
            return None
        error = out["error"]
        return read.replace(
            **{key: out[key] for key in PUSHED if key != "status"},
            **{key: _time(out[key]) for key in PUSHED_TIMES},
            status=status,
            error=TaskErrorInfo(error["reason"], error["message"]) if error else None,
            **({"args": out["args"]} if "args" in out else {}),
        )
    except (ValueError, KeyError, TypeError):
        logger.warning("unreadable completion message %r; reading the record", data[:200])
        return None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value is not None else None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
