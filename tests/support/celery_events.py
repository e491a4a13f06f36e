"""Celery's own task events, captured from a real broker by a thread (what Flower reads)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from celery import Celery


class EventLog:
    """Every Celery event sent on ``app``'s broker while it runs, in order of arrival."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._receiver: Any = None
        self._thread = threading.Thread(target=self._run, name="celery-events", daemon=True)

    def _on_event(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.events.append(event)

    def _run(self) -> None:
        with self.app.connection_for_read() as conn:
            self._receiver = self.app.events.Receiver(conn, handlers={"*": self._on_event})
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def start(self, probe: Callable[[], str], timeout: float = 30.0) -> EventLog:
        """Start listening; ``probe()`` sends a task and returns its id, until one of its events
        arrives (events sent before the receiver subscribed are lost)."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            task_id = probe()
            for _ in range(20):
                if self.of(task_id):
                    return self
                time.sleep(0.1)
        raise AssertionError(f"no Celery event received within {timeout}s")

    def of(self, task_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e.get("uuid") == task_id and (kind is None or e["type"] == kind)]

    def stop(self) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(5)
