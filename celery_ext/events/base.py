"""``EventBus``, the one bus class: publish off the hot path, handlers on a background thread.

A bus carries ``Event``s (``celery_ext.events.model``) over a ``Transport``
(``celery_ext.events.transport``: ``local``, ``kombu``, ``redis`` or a third party's), and does
three things per process:
  * ``publish(event)`` only enqueues; a sender thread hands batches to ``transport.send``, so a
    slow or absent broker never slows a task down (a full outbox drops and counts).
  * handlers subscribed in this process get this process's own events and, unless
    ``local_only``, events from other processes via ``transport.listen`` on a listener thread.
  * a failing handler is logged and counted in ``stats``; it never reaches the publisher.

Threads and connections are per process: after a fork they are rebuilt on first use.
``close()`` sends what is still queued first: a producer that exits right after publishing
(``Runtime.close``) loses no event.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery_ext.events import model
from celery_ext.events.local import LocalTransport
from celery_ext.events.model import ALL, Event, Handler
from celery_ext.events.transport import Transport

logger = logging.getLogger("celery_ext.events")


def __getattr__(name: str) -> Any:
    """The event model's names (``Event``, ``TASK_CREATED``, ...), for code that imports them from
    here, where they were before the model got a module of its own (``celery_ext.events.model``)."""
    if name.startswith("_") or not hasattr(model, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(model, name)


@dataclass
class BusStats:
    published: int = 0
    sent: int = 0
    dropped: int = 0
    send_errors: int = 0
    delivered: int = 0
    handler_errors: int = 0


_STOP = object()


class EventBus:
    """Publishes and subscribes over ``transport`` (default: a ``LocalTransport``, events stay
    in this process).  ``build_event_bus(config, broker_url)`` builds the configured one."""

    max_outbox = 10000

    def __init__(self, transport: Transport | None = None) -> None:
        self.transport = transport if transport is not None else LocalTransport()
        self.name = self.transport.name
        self.stats = BusStats()
        self.origin = uuid.uuid4().hex  # tells this bus's own events apart when they come back
        self._handlers: dict[str, list[tuple[Handler, bool]]] = {}
        self._lock = threading.Lock()
        self._forward: Callable[[Event], None] | None = None
        self._wants: Callable[[str], bool] = lambda _type: True
        self._on_subscriptions: Callable[[set[str]], None] | None = None
        self._pid: int | None = None
        self._closed = False
        # A fork while one of our threads holds the lock would leave the child's copy locked.
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _reinit_lock(ref))

    # --- public API -----------------------------------------------------------------------

    def publish(self, event: Event) -> None:
        """Enqueue ``event`` for local handlers and the transport; never blocks, never raises."""
        if self._closed:
            self.stats.dropped += 1
            return
        self._ensure_threads()
        self.stats.published += 1
        try:
            if self.transport.remote or self._forward is not None:
                self._outbox.put_nowait(event)
            if event.type in self._handlers or ALL in self._handlers:
                self._inbox.put_nowait((event, None, False))
        except queue.Full:
            self.stats.dropped += 1

    def delivers(self, event_type: str) -> bool:
        """Whether ``publish`` would deliver an event of ``event_type`` anywhere (the transport,
        a pool child's forward, a handler): a producer skips building one nobody receives (a
        batch submit's two events a task, with the default local bus and no handler)."""
        self._ensure_threads()
        if self._closed:
            return False
        return (
            self.transport.remote or self._forward is not None or event_type in self._handlers or ALL in self._handlers
        )

    def subscribe(self, event_type: str, handler: Handler, *, local_only: bool = False) -> None:
        """Call ``handler(event)`` for every event of ``event_type`` (``"*"``: all types)."""
        self._ensure_threads()
        with self._lock:
            self._handlers.setdefault(event_type, []).append((handler, local_only))
        self._subscriptions_changed()
        if not local_only:
            self._ensure_listener()

    def unsubscribe(self, event_type: str, handler: Handler) -> None:
        with self._lock:
            entries = self._handlers.get(event_type, [])
            entries[:] = [(h, lo) for h, lo in entries if h != handler]
            if not entries:
                self._handlers.pop(event_type, None)
        self._subscriptions_changed()

    def forward_to(self, forward: Callable[[Event], None] | None, wants: Callable[[str], bool] | None = None) -> None:
        """Also hand published events that ``wants(type)`` to ``forward`` (a pool child -> its
        parent's handlers).  The transport still gets every event, from this process."""
        self._forward = forward
        self._wants = wants or (lambda _type: True)

    def watch_subscriptions(self, callback: Callable[[set[str]], None]) -> None:
        """Call ``callback(types)`` with the subscribed event types whenever they change."""
        self._on_subscriptions = callback
        self._subscriptions_changed()

    def deliver_local(self, event: Event) -> None:
        """Give ``event`` to this process's handlers only (it was sent elsewhere already)."""
        if not self._closed and (event.type in self._handlers or ALL in self._handlers):
            self._ensure_threads()
            try:
                self._inbox.put_nowait((event, None, False))
            except queue.Full:
                self.stats.dropped += 1

    def _subscriptions_changed(self) -> None:
        if self._on_subscriptions is not None:
            self._on_subscriptions(set(self._handlers))

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything published so far was sent and handled; False on timeout."""
        if self._pid != os.getpid():
            return True
        deadline = time.monotonic() + timeout
        while self._outbox.unfinished_tasks or self._inbox.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout: float = 5.0) -> None:
        if self._pid != os.getpid():
            return
        self.flush(timeout)
        self._stop.set()
        self._outbox.put(_STOP)  # type: ignore[arg-type]
        self._inbox.put((_STOP, None, False))
        self.transport.close()
        self._closed = True

    # --- what the transport hands in --------------------------------------------------------

    def _received(self, event: Event, origin: str | None, ack: Callable[[], None] | None = None) -> None:
        if origin == self.origin:
            # Our own event came back over the transport: local handlers already had it.
            if ack:
                ack()
            return
        # Blocking here slows the listener down instead of losing events it already took.
        self._inbox.put((event, ack, True), block=True)

    # --- threads ----------------------------------------------------------------------------

    def _ensure_threads(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._outbox: queue.Queue[Event] = queue.Queue(self.max_outbox)
            self._inbox: queue.Queue[tuple[Any, Callable[[], None] | None, bool]] = queue.Queue(self.max_outbox)
            self._stop = threading.Event()
            self._listener: threading.Thread | None = None
            # Handlers subscribed in a parent process belong to it (a pool child must not run the
            # main process's plugins a second time).
            self._handlers = {}
            self.transport.after_fork()
            threading.Thread(target=self._send_loop, name=f"celery_ext-events-{self.name}-send", daemon=True).start()
            threading.Thread(
                target=self._handle_loop, name=f"celery_ext-events-{self.name}-handle", daemon=True
            ).start()
            self._pid = os.getpid()

    def _ensure_listener(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            ready = threading.Event()
            self._listener = threading.Thread(
                target=self._listen_forever, args=(ready,), name=f"celery_ext-events-{self.name}-listen", daemon=True
            )
            self._listener.start()
        # Subscribing returns once the transport delivers: events published after this are seen.
        if not ready.wait(10.0):
            logger.warning("event bus %s: listener not ready after 10s; continuing", self.name)

    def _listen_forever(self, ready: threading.Event) -> None:
        delay = 0.5
        while not self._stop.is_set():
            try:
                self.transport.listen(self._received, self._stop, ready)
                return
            except Exception as exc:  # noqa: BLE001 - a broker outage must not end the listener
                logger.warning("event bus %s: listener error, reconnecting in %.1fs: %s", self.name, delay, exc)
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)

    def _send_loop(self) -> None:
        outbox = self._outbox
        while True:
            batch = [outbox.get()]
            linger = self.transport.linger
            if linger and batch[0] is not _STOP and not self._stop.is_set():
                self._stop.wait(linger)
            while len(batch) < 500:
                try:
                    batch.append(outbox.get_nowait())
                except queue.Empty:
                    break
            stop = any(e is _STOP for e in batch)
            events = [e for e in batch if e is not _STOP]
            try:
                if events:
                    self._deliver_out(events)
            finally:
                for _ in batch:
                    outbox.task_done()
            if stop:
                return

    def _deliver_out(self, events: list[Event]) -> None:
        try:
            if self._forward is not None:
                for event in events:
                    if self._wants(event.type):
                        self._forward(event)
            if self.transport.remote:
                self.transport.send(events, self.origin)
            self.stats.sent += len(events)
        except Exception as exc:  # noqa: BLE001 - events are best effort; tasks go on
            self.stats.send_errors += 1
            self.stats.dropped += len(events)
            logger.warning("event bus %s: %d events not sent: %s", self.name, len(events), exc)

    def _handle_loop(self) -> None:
        inbox = self._inbox
        while True:
            event, ack, remote = inbox.get()
            try:
                if event is _STOP:
                    return
                self._dispatch(event, remote)
                if ack:
                    ack()
            except Exception:  # noqa: BLE001
                logger.exception("event bus %s: acknowledging %s failed", self.name, event)
            finally:
                inbox.task_done()

    def _dispatch(self, event: Event, remote: bool) -> None:
        with self._lock:
            entries = list(self._handlers.get(event.type, ())) + list(self._handlers.get(ALL, ()))
        for handler, local_only in entries:
            if remote and local_only:
                continue
            try:
                handler(event)
                self.stats.delivered += 1
            except Exception:  # noqa: BLE001 - a broken subscriber never fails a task or a worker
                self.stats.handler_errors += 1
                logger.exception("event handler %r failed on %s", handler, event.type)


def _reinit_lock(ref: weakref.ref[EventBus]) -> None:
    bus = ref()
    if bus is not None:
        bus._lock = threading.Lock()
