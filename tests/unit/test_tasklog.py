"""Per-task log capture (``celery_ext/tasklog.py``)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence

import pytest

from celery_ext import tasklog
from celery_ext.model import TaskLog


@pytest.fixture
def handler() -> Iterator[tasklog.TaskLogHandler]:
    h = tasklog.TaskLogHandler()
    log = logging.getLogger("tests.tasklog")
    log.addHandler(h)
    log.setLevel(logging.INFO)
    yield h
    log.removeHandler(h)


def test_a_write_that_logs_while_the_task_logs_does_not_deadlock(handler: tasklog.TaskLogHandler) -> None:
    """The flusher writes a buffer (holding its lock) and the write logs a warning (a storage
    outage), while the task's thread logs into that buffer.  With logging's handler lock this
    deadlocked: each thread held the lock the other waited for (seen in a pool process)."""
    log = logging.getLogger("tests.tasklog")
    task_logging = threading.Event()
    written: list[list[TaskLog]] = []

    def writer(lines: Sequence[TaskLog]) -> None:
        assert task_logging.wait(5)
        time.sleep(0.2)  # the task's thread is now inside emit, waiting for the buffer's lock
        log.warning("storage unavailable, spooling %d log lines", len(lines))  # through the handler
        written.append(list(lines))

    buffer = tasklog.TaskLogBuffer("t1", 1, writer, max_lines=100, max_bytes=1000)
    with tasklog.capture(buffer):
        log.info("first line")

    def task() -> None:
        with tasklog.capture(buffer):
            task_logging.set()
            log.info("second line")

    flusher = threading.Thread(target=buffer.flush, daemon=True)
    runner = threading.Thread(target=task, daemon=True)
    flusher.start()
    runner.start()
    flusher.join(5)
    runner.join(5)
    assert not flusher.is_alive() and not runner.is_alive(), "deadlocked"
    assert [line.message for line in written[0]] == ["tests.tasklog: first line"]
    assert [line.message for line in buffer.lines] == ["tests.tasklog: second line"]
    # Written here, not by the process's flusher thread after the test (its warning then went to
    # logging's last-resort handler, after pytest's summary).
    buffer.flush()
    assert [line.message for line in written[1]] == ["tests.tasklog: second line"] and not buffer.lines
