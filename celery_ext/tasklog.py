"""Per-task log capture: every log record written while a task runs is stored with the task.

A ``TaskLogHandler`` on the root logger tags records through a context variable set by the
runner; lines are buffered and written in batches (at the end of the task, or every
``flush_every`` lines), capped per task and per line.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime

from celery_ext.model import TaskLog

Writer = Callable[[Sequence[TaskLog]], None]


class TaskLogBuffer:
    """The log lines of one running attempt, written in batches: every ``flush_every`` lines, at
    the end of the attempt, and, while the task runs, within ``linger`` seconds of a line being
    logged (by a per-process flusher thread), so a running task's logs can be read as it runs."""

    def __init__(
        self,
        task_id: str,
        attempt: int,
        writer: Writer,
        *,
        max_lines: int,
        max_bytes: int,
        flush_every: int = 200,
        run: int = 1,
        linger: float = 1.0,
    ) -> None:
        self.task_id = task_id
        self.attempt = attempt
        self.run = run
        self.writer = writer
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.flush_every = flush_every
        self.linger = linger
        self.lines: list[TaskLog] = []
        self.kept = 0
        self.dropped = 0
        self.oldest = 0.0  # monotonic time of the oldest unwritten line
        self._lock = threading.Lock()

    def add(self, level: str, message: str, created: float) -> None:
        if self.kept >= self.max_lines:
            self.dropped += 1
            return
        if len(message) > self.max_bytes:
            message = message[: self.max_bytes] + f"... [truncated, {len(message)} chars]"
        with self._lock:
            self.kept += 1
            if not self.lines:
                self.oldest = time.monotonic()
                _FLUSHER.watch(self)
            self.lines.append(
                TaskLog(self.task_id, self.attempt, datetime.fromtimestamp(created, UTC), level, message, run=self.run)
            )
            full = len(self.lines) >= self.flush_every
        if full:
            self.flush()

    def due(self, now: float) -> bool:
        return bool(self.lines) and now - self.oldest >= self.linger

    def flush(self) -> None:
        with self._lock:
            if self.dropped and self.kept >= self.max_lines:
                now = datetime.now(UTC)
                self.lines.append(
                    TaskLog(
                        self.task_id,
                        self.attempt,
                        now,
                        "WARNING",
                        f"{self.dropped} more log lines dropped (cap {self.max_lines})",
                        run=self.run,
                    )
                )
                self.dropped = 0
            lines, self.lines = self.lines, []
            # Under the lock: the flusher thread and the task never write a batch out of order.
            if lines:
                self.writer(lines)


class _Flusher:
    """One daemon thread per process that writes out lines that have lingered (started on the
    first line logged in a process, so a forked pool process starts its own)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffers: set[TaskLogBuffer] = set()
        self._pid = 0

    def watch(self, buffer: TaskLogBuffer) -> None:
        with self._lock:
            if self._pid != os.getpid():
                self._buffers, self._pid = set(), os.getpid()
                threading.Thread(target=self._loop, name="celery_ext-tasklog", daemon=True).start()
            self._buffers.add(buffer)

    def _loop(self) -> None:
        while True:
            time.sleep(0.25)
            now = time.monotonic()
            with self._lock:
                buffers = [b for b in self._buffers if not b.lines or b.due(now)]
                self._buffers.difference_update(b for b in buffers if not b.lines)
            for b in buffers:
                if b.lines:
                    try:
                        b.flush()
                    except Exception:  # noqa: BLE001 - the spool already keeps what cannot be written
                        logging.getLogger("celery_ext.storage.tasklog").exception("could not write task log lines")


_FLUSHER = _Flusher()


_current: contextvars.ContextVar[TaskLogBuffer | None] = contextvars.ContextVar("celery_ext_task_log", default=None)


class TaskLogHandler(logging.Handler):
    """Routes records emitted while a task runs into that task's buffer."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def createLock(self) -> None:  # noqa: N802 - logging's name
        """No handler lock: ``emit`` only appends to the task's buffer, which has its own.  With
        logging's lock, a task thread logging (handler lock held, waiting for its buffer's lock)
        and the flusher writing that buffer (buffer lock held, the write logging a storage
        warning, waiting for the handler lock) deadlocked the pool process."""
        self.lock = None

    def emit(self, record: logging.LogRecord) -> None:
        buf = _current.get()
        if buf is None or record.name.startswith("celery_ext.storage"):
            return
        try:
            buf.add(record.levelname, self.format(record), record.created)
        except Exception:  # noqa: BLE001 - logging must never fail the task
            self.handleError(record)


@contextlib.contextmanager
def capture(buffer: TaskLogBuffer) -> Iterator[TaskLogBuffer]:
    token = _current.set(buffer)
    try:
        yield buffer
    finally:
        _current.reset(token)


_installed: TaskLogHandler | None = None


def install(level: int) -> TaskLogHandler:
    """Attach the handler to the root and Celery task loggers; let ``level`` records through
    without making the console noisier than the worker's ``--loglevel``."""
    global _installed
    if _installed is not None:
        return _installed
    _installed = TaskLogHandler()
    for logger in (logging.getLogger(), logging.getLogger("celery.task")):
        console_level = logger.getEffectiveLevel()
        if level < console_level:
            for handler in logger.handlers:
                if handler.level == logging.NOTSET:
                    handler.setLevel(console_level)
            logger.setLevel(level)
        logger.addHandler(_installed)
    return _installed
