"""The task state machine in one place: every transition of a record goes through ``Lifecycle``.

Each method is one arrow of ``model.TRANSITIONS``, applied as a conditional update on the
statuses the arrow starts from (and, for moves driven by a message, the dispatch token), so a
duplicated, stale or cancelled message can never move a record backwards.  After a transition is
recorded, the observer hears of it (events and metrics) and, when the record became terminal,
waiters are woken (``completion``).  The manager, the runner, recovery and the scheduler only
call these methods; none of them writes a status itself.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from celery_ext.completion import Completion
from celery_ext.errors import StorageError
from celery_ext.model import (
    STARTABLE,
    TERMINAL,
    Task,
    TaskErrorInfo,
    TaskFilter,
    TaskStatus,
    can_transition,
    new_id,
    sources_of,
    utcnow,
)
from celery_ext.observer import NULL_OBSERVER, TaskObserver
from celery_ext.storage.base import Fence, Storage
from celery_ext.storage.spool import Holds, Spool

logger = logging.getLogger("celery_ext.lifecycle")

T = TypeVar("T")
Then = Callable[[bool], None] | None  # called once a spooled outcome was applied: whether it took
RUNNING = (TaskStatus.RUNNING,)
DUE = (TaskStatus.SCHEDULED, TaskStatus.RETRYING)  # what waits in storage for its run_at
REOPENABLE = (TaskStatus.FAILED, TaskStatus.DEAD, TaskStatus.CANCELLED)


class QueuedMarks:
    """The PENDING -> QUEUED writes of tasks submitted one at a time (on a broker where records
    are not written QUEUED before their publish, ``Lifecycle.queued_before_publish``), made by a
    thread of the producer: off the caller's path (submit-to-result latency loses a database round trip), and
    the submits of a burst (many threads, a web process) share one conditional ``UPDATE``.
    Readers in this process see their own submits queued (``flush`` before reading).  If the
    process dies before a batch is written, its records stay PENDING with their messages
    published: the worker claims them from PENDING all the same, and the scheduler republishes
    the ones still waiting after ``scheduler.publish_grace`` under a fresh token (the first
    message is then stale), so nothing is lost or run twice.
    """

    MARK_DELAY = 0.002

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._pending: dict[str, datetime] = {}
        self._lock = threading.Lock()
        # Held while a batch is written: a reader's flush waits for the thread's write in progress.
        self._writing = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def add(self, task_ids: Sequence[str], queued_at: datetime) -> None:
        if not task_ids:
            return
        with self._lock:
            for task_id in task_ids:
                self._pending[task_id] = queued_at
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()  # a forked child starts its own thread
                self._thread = threading.Thread(target=self._run, name="celery_ext-queued-marks", daemon=True)
                self._thread.start()
                atexit.register(self.flush)
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(self.MARK_DELAY)  # let a burst of submits join the batch
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Write every pending mark now (before reading records, and at exit); returns once the
        marks of every submit made before the call are written, including a batch that the
        thread is writing."""
        with self._writing:
            self._write()

    def _write(self) -> None:
        with self._lock:
            if not self._pending:
                return
            pending, self._pending = self._pending, {}
        by_time: dict[datetime, list[str]] = {}
        for task_id, at in pending.items():
            by_time.setdefault(at, []).append(task_id)
        try:
            for at, ids in by_time.items():
                if len(ids) == 1:  # the per-task fast path of the backends
                    self.storage.tasks.update(
                        ids[0], (TaskStatus.PENDING,), durable=False, status=TaskStatus.QUEUED, queued_at=at
                    )
                else:
                    self.storage.tasks.update_many(
                        ids, (TaskStatus.PENDING,), durable=False, status=TaskStatus.QUEUED, queued_at=at
                    )
        except StorageError as exc:
            # Published all the same: the worker claims them from PENDING (see the class doc).
            logger.warning("could not mark %d published task(s) queued: %s", len(pending), exc)
        except Exception:  # noqa: BLE001 - a marker thread must not die
            logger.exception("could not mark published tasks queued")


class Lifecycle:
    #: Pages of 500 waiting steps read for one workflow by ``fail_dependents``.
    DEPENDENT_PAGES = 20

    def __init__(
        self,
        storage: Storage,
        completion: Completion | None = None,
        observer: TaskObserver = NULL_OBSERVER,
        *,
        holds: Holds | None = None,
        queued_before_publish: bool = False,
    ) -> None:
        self.storage = storage
        # A Redis broker: records published now are written QUEUED (with ``queued_at``) by the
        # same statement that writes them (a submit's insert, the due take), and no mark follows.
        # A record whose message never went out (its producer died in between) is then found by
        # the scheduler's purged-queue duty, which looks into Redis queues (``_purged``); on
        # another broker nothing can look, so they are written PENDING and marked after.
        self.queued_before_publish = queued_before_publish
        self.completion = completion or Completion(None, "")
        self.observer = observer  # events and metrics (events.bridge)
        # Writes made for the scheduler and the main process (not a run's outcome, which is
        # spooled) are retried this long when storage is away.
        self.write_patience = 30.0
        self.marks = QueuedMarks(storage)
        # A run's log lines and, while storage is away, its outcome (``settle``).
        self.spool = Spool(storage.logs.append, holds=holds)

    # --- producer side --------------------------------------------------------------------

    def created(self, tasks: Sequence[Task]) -> None:
        for t in tasks:
            self.observer.task_created(t)
            if t.status is TaskStatus.SCHEDULED and t.run_at is not None:  # a chain step has none
                self.observer.task_scheduled(t)

    def mark_queued(self, tasks: Sequence[Task], queued_at: datetime) -> list[Task]:
        """PENDING -> QUEUED after a publish; a record written QUEUED before it
        (``queued_before_publish``) is only announced.  One task's mark is written off the submit
        path (``QueuedMarks``): the producer returns as soon as the message is out.  A batch's is
        written at once, in one statement (``write_queued``), before its workers get far: written
        later, it would hold the row locks of hundreds of records their claims are waiting for.
        A worker that claims first moves the record PENDING -> RUNNING and sets ``queued_at``
        from the message, so nothing is lost either way."""
        pending = [t.task_id for t in tasks if t.status is TaskStatus.PENDING]
        if len(pending) == 1:
            self.marks.add(pending, queued_at)
        elif pending:
            self.write_queued(pending, queued_at)
        return self.announce_queued(tasks, queued_at)

    def write_queued(self, task_ids: Sequence[str], queued_at: datetime) -> int:
        """The mark of a published batch: PENDING -> QUEUED in one statement.  Not waiting for
        the disk, as a single task's mark (``QueuedMarks``): a mark that a crash of the database
        loses leaves the record PENDING, which a worker claims all the same (or the outbox duty
        publishes again under a fresh token, the first message then dropped as stale)."""
        return self.storage.tasks.update_many(
            task_ids, (TaskStatus.PENDING,), durable=False, status=TaskStatus.QUEUED, queued_at=queued_at
        )

    def announce_queued(self, tasks: Sequence[Task], queued_at: datetime) -> list[Task]:
        """``tasks`` as published: the PENDING ones as marked queued at ``queued_at``, the ones
        written QUEUED before the publish as they are; each QUEUED one announced
        (``task_queued``), once: the caller calls this once per publish."""
        out = [
            t.replace(status=TaskStatus.QUEUED, queued_at=queued_at) if t.status is TaskStatus.PENDING else t
            for t in tasks
        ]
        for t in out:
            if t.status is TaskStatus.QUEUED:
                self.observer.task_queued(t)
        return out

    def publish_failed(self, tasks: Sequence[Task]) -> None:
        """The publish of ``tasks`` raised: the ones written QUEUED before it
        (``queued_before_publish``) go back to PENDING, conditional on QUEUED and their dispatch
        token, waiting for the disk, so that the outbox duty publishes them after
        ``scheduler.publish_grace`` (one a worker claimed meanwhile, its message out after all,
        stays claimed).  If this write fails too (storage away as well), it is logged: the records
        stay QUEUED without a message, and the scheduler's purged-queue duty publishes them again
        after ``scheduler.lost_after``.  PENDING records need nothing: the outbox finds them."""
        queued = [t for t in tasks if t.status is TaskStatus.QUEUED]
        if not queued:
            return
        back: dict[str, Any] = {"status": TaskStatus.PENDING, "queued_at": None}
        ids, tokens = [t.task_id for t in queued], [t.dispatch_token or "" for t in queued]
        try:
            self.storage.tasks.update_many(ids, (TaskStatus.QUEUED,), tokens=tokens, **back)
        except Exception as exc:  # noqa: BLE001 - the publish's error is the one raised
            logger.warning(
                "could not put %d unpublished task(s) back to pending; the scheduler publishes them "
                "after scheduler.lost_after: %s: %s",
                len(queued),
                exc.__class__.__name__,
                exc,
            )

    def cancel(self, task: Task) -> bool:
        """Any non-terminal status -> CANCELLED.  A running task keeps its lease: the run still
        holds it until it ends (``release``), which a manual retry waits for.  False, and nothing
        written, from a status that may not be cancelled."""
        if not can_transition(task.status, TaskStatus.CANCELLED):
            return False
        keep_lease = task.status is TaskStatus.RUNNING
        lease: dict[str, Any] = {} if keep_lease else {"lease_until": None}
        changed = self.storage.tasks.update(
            task.task_id, (task.status,), status=TaskStatus.CANCELLED, finished_at=utcnow(), **lease
        )
        if changed:
            self.observer.task_cancelled(task.replace(status=TaskStatus.CANCELLED))
            self.completion.notify(task.task_id)
        return changed

    def reopen(self, task: Task, now: datetime | None = None) -> Task | None:
        """FAILED, DEAD or CANCELLED -> PENDING for a manual retry: a new run, attempts from 1.

        Returns the reopened record, whose dispatch token is new when it may be published at
        once.  When a cancelled run is still going (its lease is live), the record is reopened
        under the old run's token and not published: the old run publishes it when it ends
        (``release``), or the scheduler does once the lease has expired.  So the same task never
        runs twice at once.  None, and nothing written, from a status that may not be reopened.
        """
        if not can_transition(task.status, TaskStatus.PENDING):
            return None
        now = now or utcnow()
        still_running = task.status is TaskStatus.CANCELLED and task.lease_until is not None and task.lease_until > now
        token = task.dispatch_token if still_running else new_id()
        changes: dict[str, Any] = {
            "status": TaskStatus.PENDING,
            "dispatch_token": token,
            "attempt": 0,
            "run": task.run + 1,
            **dict.fromkeys(("error", "result", "started_at", "finished_at", "run_at", "worker_id", "queued_at")),
        }
        fresh = task.replace(**changes)
        lease: dict[str, Any] = {} if still_running else {"lease_until": None}
        changed = self.storage.tasks.update(
            task.task_id,
            (task.status,),
            token=task.dispatch_token,
            **changes,
            **lease,
        )
        if not changed:
            return None
        return fresh if not still_running else fresh.replace(lease_until=task.lease_until)

    # --- worker side ----------------------------------------------------------------------

    def claim(
        self,
        task: Task,
        token: str,
        worker_id: str,
        lease: float,
        queued_at: datetime | None,
        *,
        new_token: str | None = None,
    ) -> Task | None:
        """A startable record -> RUNNING for the attempt ``task.attempt`` of the message holding
        ``token`` (the run then holds ``new_token``, when given).  ``None`` when the message is
        stale, a duplicate, or its task was cancelled."""
        now = utcnow()
        # The publish time the message carries (a chain step published by its previous step
        # carries none: it was queued just now).
        queued_at = queued_at or now
        lease_until = now + timedelta(seconds=lease)
        # A chain or chord step learns its positional arguments (the previous result) only now.
        extra: dict[str, Any] = {"args": task.args} if task.args else {}
        if new_token is not None:
            extra["dispatch_token"] = new_token
        # Not waiting for the disk (``durable=False``): a claim that a database crash loses is
        # repaired by the run's outcome (``_end``); the message, still unacked, stays the task.
        if not self.storage.tasks.update(
            task.task_id,
            STARTABLE,
            token=token,
            durable=False,
            status=TaskStatus.RUNNING,
            attempt=task.attempt,
            worker_id=worker_id,
            started_at=now,
            finished_at=None,
            lease_until=lease_until,
            queued_at=queued_at,
            **extra,
        ):
            return None
        running = task.replace(
            status=TaskStatus.RUNNING,
            worker_id=worker_id,
            started_at=now,
            dispatch_token=new_token or token,
            lease_until=lease_until,
            queued_at=queued_at,
        )
        self.observer.task_started(running)
        return running

    def received(self, task: Task, lease: float) -> Task | None:
        """A message without a record (a plain Celery producer, or a record that a crash of the
        database lost): create the record RUNNING, without waiting for the disk (a lost one is
        made again by the run's outcome, ``_end``).  ``None`` when a record with this id exists
        already (a redelivery): claim that instead."""
        now = utcnow()
        running = task.replace(
            status=TaskStatus.RUNNING,
            started_at=now,
            queued_at=task.queued_at or now,
            lease_until=now + timedelta(seconds=lease),
            dispatch_token=task.dispatch_token or new_id(),
        )
        stored, created = self.storage.tasks.create(running, durable=False)
        if not created:
            return None
        self.observer.task_created(running)
        self.observer.task_started(running)
        return running

    def held(self, task: Task) -> Task | None:
        """A plain message that a worker holds until its eta: create its record QUEUED (``run_at``
        the eta), without waiting for the disk (a lost one is made by the run, as ``received``
        makes it).  ``None`` when a record with this id exists already."""
        now = utcnow()
        queued = task.replace(status=TaskStatus.QUEUED, created_at=now, queued_at=now)
        _, created = self.storage.tasks.create(queued, durable=False)
        if not created:
            return None
        self.observer.task_created(queued)
        return queued

    def succeed(self, task: Task, data: object, *, spool: bool = False, then: Then = None) -> bool | None:
        """RUNNING -> SUCCEEDED.  With ``spool``, the run's outcome: see ``settle``."""
        now = utcnow()

        def write(late: bool) -> bool:
            outcome: dict[str, Any] = {
                "status": TaskStatus.SUCCEEDED,
                "result": data,
                "error": None,
                "finished_at": now,
                "updated_at": now,
                "lease_until": None,
            }
            changed = self._end(task, None, outcome)
            if changed:
                self.completion.notify(task.task_id, task.replace(**outcome))  # waiters first: nobody waits on events
                self.observer.task_completed(task, _since(task.started_at, now))
            return changed

        return self.settle(task.task_id, write, then) if spool else self._write(lambda: write(False))

    def fail(
        self,
        task: Task,
        error: TaskErrorInfo,
        data: object = None,
        *,
        dead: bool = False,
        fence: Fence | None = None,
        spool: bool = False,
        then: Then = None,
    ) -> bool | None:
        """RUNNING -> FAILED (or DEAD, after the worker was lost on the last attempt).  With
        ``spool``, the run's outcome: see ``settle``."""
        now = utcnow()
        status = TaskStatus.DEAD if dead else TaskStatus.FAILED

        def write(late: bool) -> bool:
            outcome: dict[str, Any] = {
                "status": status,
                "result": data,
                "error": error,
                "finished_at": now,
                "updated_at": now,
                "lease_until": None,
            }
            changed = self._end(task, fence, outcome)
            if changed:
                self.completion.notify(task.task_id, task.replace(**outcome))
                self.observer.task_failed(task, error, _since(task.started_at, now))
            return changed

        return self.settle(task.task_id, write, then) if spool else self._write(lambda: write(False))

    def retry_later(
        self,
        task: Task,
        error: TaskErrorInfo | None,
        delay: float,
        data: object = None,
        *,
        hold: bool = False,
        fence: Fence | None = None,
    ) -> str | None:
        """RUNNING -> RETRYING under a new dispatch token (returned), due in ``delay`` seconds.

        With ``hold`` the next attempt waits in storage (``run_at`` set) and the scheduler's
        leader publishes it when due; otherwise the caller publishes it at once with a countdown,
        and ``run_at`` stays empty: the message holds the time, and the due scan leaves it be."""
        token, _ = self.retry_settle(task, error, delay, data, hold=hold, fence=fence)
        return token

    def retry_settle(
        self,
        task: Task,
        error: TaskErrorInfo | None,
        delay: float,
        data: object = None,
        *,
        hold: bool = False,
        fence: Fence | None = None,
        spool: bool = False,
        then: Then = None,
    ) -> tuple[str | None, bool]:
        """``retry_later``, and with ``spool`` the run's outcome (``settle``): returns the token
        and whether the write was spooled.  A spooled retry is always held (it waits in storage
        for the scheduler): no message may carry a token that its record does not hold yet."""
        token = new_id()

        def write(late: bool) -> bool:
            outcome: dict[str, Any] = {
                "status": TaskStatus.RETRYING,
                "dispatch_token": token,
                "error": error,
                "result": data,
                "run_at": utcnow() + timedelta(seconds=delay) if hold or late else None,
                "lease_until": None,
            }
            changed = self._end(task, fence, outcome)
            if changed:
                self.observer.task_retrying(task, error, delay)
            return changed

        if not spool:
            return (token if self._write(lambda: write(False)) else None), False
        changed = self.settle(task.task_id, write, then)
        return (token if changed is not False else None), changed is None

    def release(self, task: Task) -> str | None:
        """The run of ``task`` ended but its outcome was not recorded (the task was cancelled
        while it ran).  Give up its lease; if a manual retry was waiting for this run to end,
        hand the record a new token and return it: the caller publishes the new run."""
        tasks = self.storage.tasks
        try:
            if tasks.update(task.task_id, (TaskStatus.CANCELLED,), token=task.dispatch_token, lease_until=None):
                return None
            token = new_id()
            if tasks.update(
                task.task_id, (TaskStatus.PENDING,), token=task.dispatch_token, dispatch_token=token, lease_until=None
            ):
                return token
        except StorageError as exc:
            logger.warning(
                "could not release task %s (the scheduler will, once its lease expires): %s", task.task_id, exc
            )
        return None

    def fail_waiting(self, task_ids: Sequence[str], parent: Task, why: str) -> None:
        """Chain or chord steps still waiting for ``parent`` (SCHEDULED, never run) fail without
        running, because ``parent`` ended ``why`` (failed, dead or cancelled).  Part of the
        parent's outcome: spooled behind it while storage is away (``settle``)."""
        if not task_ids:
            return
        error = TaskErrorInfo("parent_failed", f"previous step {parent.task_type}[{parent.task_id}] {why}")
        now = utcnow()

        def write(late: bool) -> bool:
            changed = self.storage.tasks.update_many(
                list(task_ids), (TaskStatus.SCHEDULED,), status=TaskStatus.FAILED, error=error, finished_at=now
            )
            for task_id in task_ids:
                self.completion.notify(task_id)
            return changed > 0

        self.settle(parent.task_id, write, None)

    def fail_dependents(self, parent: Task, why: str) -> None:
        """``fail_waiting`` for the chain steps that wait for ``parent``, found through the
        records rather than a message: SCHEDULED without ``run_at`` in ``parent``'s workflow (its
        ``root_id``), whose ``parent_id`` is ``parent`` or a step found so.  For an end decided
        where no message names the steps: a run declared dead because its worker was lost."""
        root = parent.root_id or parent.task_id
        waiting: dict[str, list[str]] = {}
        cursor = None
        try:
            for _ in range(self.DEPENDENT_PAGES):
                page = self.storage.tasks.list(
                    TaskFilter(status=(TaskStatus.SCHEDULED,), root_id=root, limit=500, cursor=cursor)
                )
                for t in page.items:
                    if t.run_at is None and t.parent_id is not None:
                        waiting.setdefault(t.parent_id, []).append(t.task_id)
                cursor = page.next_cursor
                if cursor is None:
                    break
        except StorageError as exc:
            logger.warning("could not find the steps waiting for task %s: %s", parent.task_id, exc)
            return
        found: list[str] = []
        frontier = [parent.task_id]
        while frontier:
            frontier = [step for p in frontier for step in waiting.pop(p, [])]
            found += frontier
        self.fail_waiting(found, parent, why)

    # --- recovery (scheduler) -------------------------------------------------------------

    def lost(
        self, task: Task, error: TaskErrorInfo, delay: float, *, hold: bool = False, fence: Fence | None = None
    ) -> tuple[bool, str | None]:
        """A RUNNING task whose worker was lost: RETRYING under a new token while attempts are
        left (returned, for the caller to publish unless ``hold``), else DEAD.  Returns
        (changed, token)."""
        if task.attempt <= task.max_retries:
            token = self.retry_later(task, error, delay, hold=hold, fence=fence)
            return token is not None, token
        dead = bool(self.fail(task, error, dead=True, fence=fence))
        if dead:
            self.fail_dependents(task, f"failed ({error.reason})")
        return dead, None

    def reclaim(
        self, task_id: str, token: str, attempt: int, run: int, worker_id: str, started_at: datetime, lease: datetime
    ) -> bool:
        """RUNNING again for a run that goes on though its record shows it startable under the
        same token, run and an earlier attempt: a crash of the database undid its claim (see
        ``claim``).  Anything else (cancelled, recovered under a new token) is not touched."""
        record = self.storage.tasks.get(task_id)
        if record is None or not _start_lost(record, token, run, attempt):
            return False
        if not self.storage.tasks.update(
            task_id,
            (record.status,),
            token=token,
            status=TaskStatus.RUNNING,
            attempt=attempt,
            worker_id=worker_id,
            started_at=started_at,
            finished_at=None,
            lease_until=lease,
        ):
            return False
        logger.warning("task %s: its claim was lost while it ran; claimed again", task_id)
        return True

    def fresh_token(self, task: Task, *, fence: Fence | None = None) -> str | None:
        """The same status under a new dispatch token, for a record whose message is gone or
        never was (lost by the broker; a PENDING record nobody published).  It is published
        again by the caller: a copy of an earlier message, if one exists after all, is stale."""
        token = new_id()
        if self.storage.tasks.update(
            task.task_id,
            (task.status,),
            token=task.dispatch_token,
            fence=fence,
            dispatch_token=token,
            lease_until=None,
        ):
            return token
        return None

    def due(
        self, before: datetime, limit: int, fence: Fence | None = None, now: datetime | None = None
    ) -> tuple[str, list[tuple[Task, TaskStatus]]]:
        """Up to ``limit`` SCHEDULED or RETRYING records whose ``run_at`` is not after ``before``,
        the earliest due first -> QUEUED (``queued_before_publish``) or PENDING, all under one
        new dispatch token, with ``queued_at`` ``now``: taken in one statement where the backend
        can (``TaskRepository.take_due``).  Returns the token and each record moved with the
        status it waited in (for ``undue``); the caller publishes them, then marks the PENDING
        ones queued (``write_queued``).  As a submit's record before its publish: a leader that
        dies in between leaves them to the outbox duty (PENDING: published again after
        ``publish_grace``) or to the purged-queue duty (QUEUED: after ``lost_after``), so none is
        lost.  A record cancelled or started meanwhile does not move, nor one another taker
        holds; with a ``fence`` that storage refuses (a newer leader), none does."""
        token, now = new_id(), now or utcnow()
        status = TaskStatus.QUEUED if self.queued_before_publish else TaskStatus.PENDING
        taken = self.storage.tasks.take_due(
            DUE, before, limit, fence=fence, status=status, dispatch_token=token, queued_at=now
        )
        return token, taken

    def undue(self, moved: Sequence[tuple[Task, TaskStatus]]) -> None:
        """Put records ``due`` moved back to the status they waited in (the publish failed), so
        that the next round publishes them, conditional on the status and token ``due`` gave
        them; one a worker claimed meanwhile stays claimed."""
        for status in {s for _, s in moved}:
            back = [t for t, s in moved if s is status]
            self.storage.tasks.update_many(
                [t.task_id for t in back],
                (TaskStatus.PENDING, TaskStatus.QUEUED),
                tokens=sorted({t.dispatch_token or "" for t in back}),
                status=status,
                queued_at=None,
            )

    # --- helpers --------------------------------------------------------------------------

    def _end(self, task: Task, fence: Fence | None, outcome: dict[str, Any]) -> bool:
        """Write the outcome of the run of ``task`` over its RUNNING record, conditional on the
        run's dispatch token (and ``fence``).  If the record is not RUNNING, its run's start may
        have been lost: the claim and a plain message's receipt are committed without waiting for
        the disk, and a crash of the database within that fraction of a second undoes them while
        the run goes on.  The record is then as the message found it (startable, the same token,
        run and an earlier attempt), or missing (a receipt): the outcome is written over that, or
        the record created ended.  Anything else (cancelled, reopened, recovered under a new
        token) moved on, and the outcome is refused as before."""
        tasks = self.storage.tasks
        if tasks.update(task.task_id, RUNNING, token=task.dispatch_token, fence=fence, **outcome):
            return True
        if fence is not None:  # recovery's write, not a run's: nothing of this applies
            return False
        record = tasks.get(task.task_id)
        if record is None:
            if task.started_at is None:  # not a run that started here: nothing to make again
                return False
            _, created = tasks.create(task.replace(**outcome))
            if created:
                logger.warning("task %s: its record was lost with its start; made again with its outcome", task.task_id)
            return created
        if task.dispatch_token is None or not _start_lost(record, task.dispatch_token, task.run, task.attempt):
            return False
        started = {k: getattr(task, k) for k in ("attempt", "worker_id", "started_at", "queued_at")}
        if task.args:
            started["args"] = task.args
        if tasks.update(task.task_id, (record.status,), token=task.dispatch_token, **started, **outcome):
            logger.warning("task %s: its claim was lost; the outcome of its run is written over it", task.task_id)
            return True
        return False

    def settle(self, task_id: str, write: Callable[[bool], bool], then: Then) -> bool | None:
        """Write an outcome of a run of ``task_id`` now: returns whether the record took it (a
        conditional update on the run's dispatch token).  If storage is away, or earlier writes
        wait in the spool, the write is spooled instead (returns ``None``): it is applied in order
        when storage returns, as ``write(True)``, still conditional, so it never overwrites a newer
        dispatch; then ``then(changed)`` is called.  Never raises StorageError."""
        if not self.spool.busy:
            try:
                return write(False)
            except StorageError as exc:
                logger.warning("storage unavailable: outcome of task %s spooled until it returns: %s", task_id, exc)

        def late() -> None:
            changed = write(True)
            if not changed:
                logger.warning("spooled outcome of task %s refused: the record moved on meanwhile", task_id)
            if then is not None:
                try:
                    then(changed)
                except Exception:  # noqa: BLE001 - the outcome is written; what follows may fail alone
                    logger.exception("after the spooled outcome of task %s", task_id)

        self.spool.keep(task_id, late)
        return None

    def _write(self, fn: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.write_patience
        delay = 0.1
        while True:
            try:
                return fn()
            except StorageError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                logger.warning("storage unavailable, retrying in %.1fs: %s", delay, exc)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)


def _start_lost(record: Task, token: str, run: int, attempt: int) -> bool:
    """Whether ``record`` is as the message of a run (``token``, ``run``, ``attempt``) found it
    before its claim: startable, the same token and run, an earlier attempt.  A crash of the
    database undid that run's claim (committed without waiting for the disk)."""
    return (
        record.status in STARTABLE and record.dispatch_token == token and record.run == run and record.attempt < attempt
    )


def publish_time(task: Task, now: datetime) -> datetime:
    """The ``queued_at`` the message of ``task`` carries: the record's, when it was written
    QUEUED before its publish (``Lifecycle.queued_before_publish``), else ``now``."""
    return task.queued_at if task.status is TaskStatus.QUEUED and task.queued_at is not None else now


def _since(start: datetime | None, now: datetime) -> float | None:
    return (now - start).total_seconds() if start else None


# Each arrow the methods above take must be one of model.TRANSITIONS (checked at import).
for _src, _dst in (
    (TaskStatus.PENDING, TaskStatus.QUEUED),
    (TaskStatus.QUEUED, TaskStatus.PENDING),
    (TaskStatus.RUNNING, TaskStatus.SUCCEEDED),
    (TaskStatus.RUNNING, TaskStatus.FAILED),
    (TaskStatus.RUNNING, TaskStatus.DEAD),
    (TaskStatus.RUNNING, TaskStatus.RETRYING),
    (TaskStatus.SCHEDULED, TaskStatus.FAILED),
    *((s, TaskStatus.PENDING) for s in DUE),
    *((TaskStatus.PENDING, s) for s in DUE),
    *((s, TaskStatus.QUEUED) for s in DUE),
    *((TaskStatus.QUEUED, s) for s in DUE),
    *((s, TaskStatus.RUNNING) for s in STARTABLE),
    *((s, TaskStatus.PENDING) for s in REOPENABLE),
    *((s, TaskStatus.CANCELLED) for s in TaskStatus if s not in TERMINAL),
):
    assert _src in sources_of(_dst), f"lifecycle uses {_src} -> {_dst}, which TRANSITIONS does not allow"
