"""Writes that could not reach storage yet: kept in order and retried while storage is away.

One spool per process holds two kinds of writes, in the order they were made:

* **log lines.**  A task's log lines are written in batches; if the store is unreachable, the
  batch goes to the spool instead of blocking the task.  Bounded: past ``max_lines`` the oldest
  spooled batches are dropped (and counted in an error log), and a batch is given up after
  ``patience`` seconds.
* **outcomes** (``keep``): what a run writes when it ends (succeeded, failed, a retry, the
  chain steps that will never run).  An outcome is never dropped for age or size: it waits as
  long as the process lives, and is applied, still conditional on the run's dispatch token, once
  the store answers.  While it waits, ``holds`` (the worker registry in Redis) tells the
  scheduler's recovery that a live process holds it, so the task is not run again (``lease.py``).
  Kept in memory: an outcome spooled by a process that exits before storage returns is lost, and
  the record is recovered when its lease expires (the task runs again: at least once).

A background thread writes the spool out, in order, as soon as the store answers again.  While
anything is spooled, new writes queue behind it, so a task's lines are never reordered and its
outcome is never written before its lines.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from celery_ext.errors import StorageError
from celery_ext.model import TaskLog

logger = logging.getLogger("celery_ext.storage.spool")

Writer = Callable[[Sequence[TaskLog]], None]


class Holds(Protocol):
    """Where a spool says which tasks' outcomes it holds (``WorkerRegistry.hold``)."""

    def hold(self, task_ids: Sequence[str]) -> None: ...

    def release(self, task_ids: Sequence[str]) -> None: ...


@dataclass(frozen=True, slots=True)
class _Entry:
    since: float  # monotonic time it was spooled
    task_id: str
    lines: Sequence[TaskLog] = ()
    apply: Callable[[], None] | None = None  # an outcome (else: log lines)


class Spool:
    #: How often the drain thread renews the holds of the outcomes it keeps (seconds).
    HOLD_EVERY = 1.0

    def __init__(
        self, write: Writer, *, max_lines: int = 100_000, patience: float = 600.0, holds: Holds | None = None
    ) -> None:
        self.write = write
        self.max_lines = max_lines
        self.patience = patience
        self.holds = holds
        self._pending: collections.deque[_Entry] = collections.deque()
        self._lines = 0
        self._outcomes = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    @property
    def pending_lines(self) -> int:
        return self._lines

    @property
    def pending_outcomes(self) -> int:
        return self._outcomes

    @property
    def busy(self) -> bool:
        """Something waits: a new write must queue behind it."""
        with self._lock:
            self._forked()
            return bool(self._pending)

    def submit(self, lines: Sequence[TaskLog]) -> None:
        """Write ``lines`` now, or spool them if the store is away (never raises StorageError)."""
        if not lines:
            return
        with self._lock:
            self._forked()
            if self._pending:
                self._spool(_Entry(time.monotonic(), lines[0].task_id, lines))
                return
        try:
            self.write(lines)
        except StorageError as exc:
            logger.warning("storage unavailable, spooling %d log lines: %s", len(lines), exc)
            with self._lock:
                self._spool(_Entry(time.monotonic(), lines[0].task_id, lines))

    def keep(self, task_id: str, apply: Callable[[], None]) -> None:
        """Spool an outcome of ``task_id``: ``apply`` is called once the store answers (it raises
        StorageError while it does not), after everything spooled before it."""
        self._hold([task_id])
        with self._lock:
            self._forked()
            self._spool(_Entry(time.monotonic(), task_id, apply=apply))

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

    def _forked(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's spool and thread are not ours
            self._pending.clear()
            self._lines, self._outcomes, self._thread, self._pid = 0, 0, None, os.getpid()

    def _spool(self, entry: _Entry) -> None:
        self._pending.append(entry)
        self._lines += len(entry.lines)
        self._outcomes += entry.apply is not None
        while self._lines > self.max_lines:
            # The oldest log batch goes; outcomes are never dropped.
            oldest = next((e for e in self._pending if e.lines and e is not entry), None)
            if oldest is None:
                break
            self._pending.remove(oldest)
            self._lines -= len(oldest.lines)
            logger.error("log spool full: dropped %d log lines of task %s", len(oldest.lines), oldest.task_id)
        if self._thread is None:
            self._thread = threading.Thread(target=self._drain, name="celery_ext-spool", daemon=True)
            self._thread.start()

    def _drain(self) -> None:
        delay = 0.1
        held_at = time.monotonic()
        while True:
            with self._lock:
                if not self._pending:
                    self._thread = None  # under the lock: the next _spool starts a new drain
                    self._idle.notify_all()
                    return
                entry = self._pending[0]
                outcomes = [e.task_id for e in self._pending if e.apply is not None]
            if outcomes and time.monotonic() - held_at >= self.HOLD_EVERY:
                self._hold(outcomes)
                held_at = time.monotonic()
            try:
                if entry.apply is not None:
                    entry.apply()
                else:
                    self.write(entry.lines)
            except StorageError:
                if entry.apply is not None or time.monotonic() - entry.since <= self.patience:
                    time.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                logger.error(
                    "lost %d log lines of task %s: storage unavailable for %.0fs",
                    len(entry.lines),
                    entry.task_id,
                    self.patience,
                )
            except Exception:  # noqa: BLE001 - one broken write must not stop the ones behind it
                logger.exception("spooled write for task %s failed; dropped", entry.task_id)
            delay = 0.1
            with self._lock:
                # Still the head: only the drain thread removes from the left while draining.
                if self._pending and self._pending[0] is entry:
                    self._pending.popleft()
                    self._lines -= len(entry.lines)
                    self._outcomes -= entry.apply is not None
            if entry.apply is not None:
                self._release([entry.task_id])

    def _hold(self, task_ids: Sequence[str]) -> None:
        if self.holds is not None:
            try:
                self.holds.hold(task_ids)
            except Exception as exc:  # noqa: BLE001 - the hold protects; the outcome is kept regardless
                logger.warning("could not hold %d spooled outcome(s) in the registry: %s", len(task_ids), exc)

    def _release(self, task_ids: Sequence[str]) -> None:
        if self.holds is not None:
            try:
                self.holds.release(task_ids)
            except Exception as exc:  # noqa: BLE001 - a hold runs out by itself
                logger.warning("could not release %d outcome hold(s): %s", len(task_ids), exc)
