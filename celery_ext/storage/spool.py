"""Log lines that could not be written yet: kept in order and retried while storage is away.

A task's log lines are written in batches; if the store is unreachable, the batch goes to this
spool instead of blocking the task, and a background thread writes the spool out, in order,
as soon as the store answers again.  While anything is spooled, new batches queue behind it so a
task's lines are never reordered.  Bounded: past ``max_lines`` the oldest spooled batches are
dropped (and counted in an error log), and a batch is given up after ``patience`` seconds.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence

from celery_ext.errors import StorageError
from celery_ext.model import TaskLog

logger = logging.getLogger("celery_ext.storage.spool")

Writer = Callable[[Sequence[TaskLog]], None]


class LogSpool:
    def __init__(self, write: Writer, *, max_lines: int = 100_000, patience: float = 600.0) -> None:
        self.write = write
        self.max_lines = max_lines
        self.patience = patience
        self._pending: collections.deque[tuple[float, Sequence[TaskLog]]] = collections.deque()
        self._lines = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    @property
    def pending_lines(self) -> int:
        return self._lines

    def submit(self, lines: Sequence[TaskLog]) -> None:
        """Write ``lines`` now, or spool them if the store is away (never raises StorageError)."""
        if not lines:
            return
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's spool and thread are not ours
                self._pending.clear()
                self._lines, self._thread, self._pid = 0, None, os.getpid()
            if self._pending:
                self._spool(lines)
                return
        try:
            self.write(lines)
        except StorageError as exc:
            logger.warning("storage unavailable, spooling %d log lines: %s", len(lines), exc)
            with self._lock:
                self._spool(lines)

    def flush(self, timeout: float) -> bool:
        """Wait until the spool is written out; returns whether it is empty."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
            return True

    def _spool(self, lines: Sequence[TaskLog]) -> None:
        self._pending.append((time.monotonic(), lines))
        self._lines += len(lines)
        while self._lines > self.max_lines and len(self._pending) > 1:
            _, dropped = self._pending.popleft()
            self._lines -= len(dropped)
            logger.error("log spool full: dropped %d log lines of task %s", len(dropped), dropped[0].task_id)
        if self._thread is None:
            self._thread = threading.Thread(target=self._drain, name="celery_ext-log-spool", daemon=True)
            self._thread.start()

    def _drain(self) -> None:
        delay = 0.1
        while True:
            with self._lock:
                if not self._pending:
                    self._thread = None  # under the lock: the next _spool starts a new drain
                    self._idle.notify_all()
                    return
                since, lines = self._pending[0]
            try:
                self.write(lines)
            except StorageError:
                if time.monotonic() - since > self.patience:
                    logger.error(
                        "lost %d log lines of task %s: storage unavailable for %.0fs",
                        len(lines),
                        lines[0].task_id,
                        self.patience,
                    )
                else:
                    time.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
            delay = 0.1
            with self._lock:
                # Still the head: only the drain thread removes from the left while draining.
                if self._pending and self._pending[0][1] is lines:
                    self._pending.popleft()
                    self._lines -= len(lines)
