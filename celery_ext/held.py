"""Plain Celery messages that a worker holds for their ``countdown``/``eta``: recorded on receipt.

Celery's worker keeps a message with an eta (``send_task(..., countdown=60)``, ``celery call
--countdown``, ``apply_async(eta=...)`` from a producer that imports only celery) in its main
process's timer until it is due.  celery_ext records a plain message when it starts, so such a task
had no record for its whole delay: ``celery-ext get`` answered "no task with id" while Flower
showed it received, and ``celery-ext cancel`` could not reach it.

The worker's main process now records it ``queued`` on receipt (Celery's ``task_received``
signal), with ``run_at`` its eta and ``worker_id`` the worker that holds it.  The write is made by
a thread of its own, so Celery's event loop never waits for the task store.  When the message is
due, its run claims that record as the same attempt (``TaskRunner.start``).  A ``celery-ext
cancel`` in between is for good: the message is dropped when due and Celery reports it REVOKED.
A message that carries the celery_ext header (a submit or a retry) has its record already.  If
the store is away, nothing is lost: the run records the task as before.
"""

from __future__ import annotations

import logging
import queue
import threading
from datetime import datetime
from typing import Any

from celery import Celery
from celery.signals import task_received

from celery_ext.errors import StorageError
from celery_ext.message import HEADER
from celery_ext.runtime import runtime_of
from celery_ext.task import ExecutorTask, delivery_of

logger = logging.getLogger("celery_ext.held")


class HeldRecorder:
    """Records held plain messages from a daemon thread of the worker's main process."""

    #: Receipts waiting for their write; past this many (the store is slow or away) the rest are
    #: left to be recorded when they run.
    MAX_WAITING = 10_000

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._queue: queue.Queue[tuple[Any, str, datetime] | None] = queue.Queue(self.MAX_WAITING)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.skipped = 0

    def received(self, request: Any = None, **_: Any) -> None:
        """``task_received`` (main process, every message): keep only a plain message of a
        celery_ext type with an eta; the rest return at once."""
        eta = getattr(request, "eta", None)
        if eta is None or getattr(request, "app", None) is not self.app:
            return
        if not isinstance(request.task, ExecutorTask) or request.request_dict.get(HEADER) is not None:
            return
        try:
            self._queue.put_nowait((request, request.hostname or "unknown", eta))
        except queue.Full:
            self.skipped += 1
            if self.skipped % 1000 == 1:
                logger.warning("%d held task(s) not recorded on receipt (the task store is behind)", self.skipped)
            return
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="celery_ext-held", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            request, worker_id, eta = item
            try:
                self.record(request, worker_id, eta)
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def record(self, request: Any, worker_id: str, eta: datetime) -> None:
        rt = runtime_of(self.app)
        try:
            d = delivery_of(request.name, request, request.args, request.kwargs)
            if rt.runner.hold(d, worker_id, eta) is not None:
                logger.info("task %s[%s] held until %s: recorded queued", d.task_type, d.task_id, eta.isoformat())
        except StorageError as exc:
            logger.warning("task %s held until %s not recorded yet (it is when it runs): %s", request.id, eta, exc)
        except Exception:  # noqa: BLE001 - the message still runs, and is recorded then
            logger.exception("could not record held task %s", getattr(request, "id", "?"))

    def stop(self, timeout: float = 2.0) -> None:
        """Write what is waiting (for up to ``timeout`` seconds), then end the thread."""
        if self._thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)


def install_held(app: Celery) -> HeldRecorder:
    recorder = HeldRecorder(app)
    task_received.connect(recorder.received, weak=False, dispatch_uid=f"celery_ext.held.{id(app)}")
    return recorder
