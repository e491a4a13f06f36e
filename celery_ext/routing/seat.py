"""``Seat``: a worker's place in the registry, and ``Progress``: is its consumer taking messages?

The registration bootstep (``routing/heartbeat.py``) makes the seat before the pool forks, so pool
children share it; it lives on the runtime (``Runtime.worker.seat``), where the in-flight
accounting signals and a config reload find it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from celery.worker import state

from celery_ext.routing.stranded import move_stranded
from celery_ext.routing.workers import WorkerInfo, WorkerRegistry

logger = logging.getLogger("celery_ext.routing")


@dataclass
class Seat:
    """This worker's place in the registry (set before the pool forks, so children share it)."""

    registry: WorkerRegistry
    info: WorkerInfo
    ttl: float
    interval: float
    keys: list[str]
    types: frozenset[str]
    stop: threading.Event = field(default_factory=threading.Event)
    warned_at: float = 0.0
    delta: int = 0
    # Non-Redis brokers: how many messages wait in the direct queue (Redis: LLEN in the script).
    queued: Callable[[], int] | None = None
    progress: Progress | None = None

    def beat(self) -> None:
        try:
            if self.progress is not None:
                self.progress.check(self.registry.client, self.info, len(state.reserved_requests))
            held = len(state.reserved_requests) + (self.queued() if self.queued else 0)
            _, self.delta = self.registry.heartbeat(self.info, self.ttl, held, self.keys, self.delta)
        except Exception as exc:  # noqa: BLE001 - a registry outage must not stop the worker
            if time.monotonic() - self.warned_at > 10:
                self.warned_at = time.monotonic()
                logger.warning("worker registry heartbeat failed (will retry): %s", exc)

    def adjust(self, delta: int) -> None:
        try:
            self.registry.adjust_nowait(self.info.id, delta)
        except Exception as exc:  # noqa: BLE001 - the next heartbeat corrects the count
            logger.debug("in-flight update failed: %s", exc)

    def loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            self.beat()

    # --- the service a bootstep starts and stops ----------------------------------------------

    def start(self) -> None:
        """Register now (before the worker reports ready), then beat on a thread of its own."""
        # A fresh event per start: a consumer restart must not revive the previous thread.
        self.stop = threading.Event()
        self.beat()
        threading.Thread(target=self.loop, args=(self.stop,), name="celery_ext-heartbeat", daemon=True).start()

    def pause(self) -> None:
        """Stop beating (the consumer stops; it may start again)."""
        self.stop.set()

    def leave(self, app_name: str, transport_options: Mapping[str, Any]) -> None:
        """The worker shuts down warm: offline at once, and its direct queue handed back to the
        shared queues (failing that, the scheduler's sweep does both later)."""
        self.stop.set()
        try:
            self.registry.mark_offline(self.info.id)
            moved = move_stranded(self.registry.client, self.info.queue, app_name, transport_options)
            if moved:
                logger.info("handed %d queued task(s) back to the shared queues", moved)
        except Exception as exc:  # noqa: BLE001 - the scheduler's sweep does this later
            logger.warning("could not deregister cleanly (the scheduler will): %s", exc)


@dataclass
class Progress:
    """Is the consumer taking messages?  ``taken`` counts the messages it received (main
    process); each heartbeat compares it with the last one while work waits in ``keys`` (every
    list of the queues it consumes) and pool slots are free."""

    keys: list[str]
    stall_after: float
    taken: int = 0
    _seen: int = 0
    _since: float | None = None  # when it was last seen stuck without a stall before

    def check(self, client: Any, info: WorkerInfo, reserved: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        free = info.capacity - reserved
        waiting = 0
        if free > 0 and self.taken == self._seen:
            pipe = client.pipeline(transaction=False)
            for key in self.keys:
                pipe.llen(key)
            waiting = sum(int(n) for n in pipe.execute())
        if self.taken != self._seen or waiting == 0 or free <= 0:
            self._seen, self._since = self.taken, None
            if not info.healthy:
                logger.warning("the consumer is taking messages again: healthy")
                info.healthy, info.problem = True, ""
            return
        if self._since is None:
            self._since = now
        elif info.healthy and now - self._since >= self.stall_after:
            info.healthy = False
            info.problem = (
                f"consumer stalled: took no message for {self.stall_after:g}s while messages waited "
                "and pool slots were free"
            )
            logger.error(
                "worker unhealthy: its consumer took no message for %.0fs while %d message(s) wait in its "
                "queues and %d of %d pool slot(s) are free (a silent broker connection?)",
                now - self._since,
                waiting,
                free,
                info.capacity,
            )
