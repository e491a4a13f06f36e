"""Per-task log capture: every log record written while a task runs is stored with the task.

A ``TaskLogHandler`` on the root logger tags records through a context variable set by the
runner; lines are buffered and written in batches (at the end of the task, or every
``flush_every`` lines), capped per task and per line.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime

from celery_ext.model import TaskLog

Writer = Callable[[Sequence[TaskLog]], None]


class TaskLogBuffer:
    def __init__(self, task_id: str, attempt: int, writer: Writer, *, max_lines: int, max_bytes: int,
                 flush_every: int = 200, run: int = 1) -> None:
        self.task_id = task_id
        self.attempt = attempt
        self.run = run
        self.writer = writer
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.flush_every = flush_every
        self.lines: list[TaskLog] = []
        self.kept = 0
        self.dropped = 0

    def add(self, level: str, message: str, created: float) -> None:
        if self.kept >= self.max_lines:
            self.dropped += 1
            return
        if len(message) > self.max_bytes:
            message = message[: self.max_bytes] + f"... [truncated, {len(message)} chars]"
        self.kept += 1
        self.lines.append(TaskLog(self.task_id, self.attempt, datetime.fromtimestamp(created, UTC), level, message,
                                  run=self.run))
        if len(self.lines) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if self.dropped and self.kept >= self.max_lines:
            now = datetime.now(UTC)
            self.lines.append(TaskLog(self.task_id, self.attempt, now, "WARNING",
                                      f"{self.dropped} more log lines dropped (cap {self.max_lines})",
                                      run=self.run))
            self.dropped = 0
        if self.lines:
            lines, self.lines = self.lines, []
            self.writer(lines)


_current: contextvars.ContextVar[TaskLogBuffer | None] = contextvars.ContextVar("celery_ext_task_log", default=None)


class TaskLogHandler(logging.Handler):
    """Routes records emitted while a task runs into that task's buffer."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

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
