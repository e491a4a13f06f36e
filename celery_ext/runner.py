"""Running one delivered message: claim (or create) the record, execute, decide the outcome.

This is the worker-side half of the state machine, independent of Celery's Task class
(``task.py`` turns each ``Outcome`` into Celery's own: a result, a FAILURE, a RETRY, or
REVOKED).  Every move goes through ``Lifecycle``, a conditional update on status and dispatch
token, so a duplicated, stale or cancelled message does nothing.
"""

from __future__ import annotations

import json
import logging
import random
import traceback
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from celery.exceptions import SoftTimeLimitExceeded

from celery_ext.config import WorkerConfig
from celery_ext.dispatch import Dispatch, Dispatcher
from celery_ext.errors import ExecutorError, StorageError
from celery_ext.executors.base import payload_of
from celery_ext.executors.pool import ExecutorSet
from celery_ext.lifecycle import Lifecycle
from celery_ext.message import ExtHeader, new_incarnation, plain_token
from celery_ext.model import STARTABLE, Task, TaskErrorInfo, TaskResult, TaskStatus, new_id, utcnow
from celery_ext.tasklog import TaskLogBuffer, capture

logger = logging.getLogger("celery_ext.runner")


@dataclass(frozen=True, slots=True)
class Delivery:
    """One Celery message as celery_ext reads it (``message.py`` defines the header)."""

    task_id: str
    task_type: str
    args: list[Any]
    kwargs: dict[str, Any]
    header: ExtHeader | None
    retries: int = 0
    timeout: float | None = None
    priority: int = 0
    parent_id: str | None = None
    root_id: str | None = None
    group_id: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of a delivery: ``kind`` is one of

    - ``succeeded`` (``data`` is the result), ``failed`` (``error``),
    - ``retry`` (``token``, ``delay``: the next attempt must be published with that countdown,
      unless ``held``: it waits in storage and the scheduler publishes it when due),
    - ``revoked`` (the task was cancelled; nothing of this run is recorded),
    - ``dropped`` (a stale or duplicate message; ``why`` says which).
    """

    kind: str
    task: Task | None = None
    data: Any = None
    error: TaskErrorInfo | None = None
    token: str | None = None
    delay: float = 0.0
    why: str = ""
    held: bool = False
    cause: BaseException | None = None  # the exception behind a failure (TaskResult.cause)


Verdict = Literal["succeed", "retry", "fail"]


def verdict(task: Task, result: TaskResult) -> Verdict:
    """What the result of a run asks of its record: ``succeed``; ``retry`` for a retryable failure
    while attempts are left (``attempt <= max_retries``: a task runs at most ``max_retries + 1``
    times); else ``fail``."""
    if result.success:
        return "succeed"
    if result.retryable and task.attempt <= task.max_retries:
        return "retry"
    return "fail"


def dropped(task_id: str, record: Task | None) -> Outcome:
    """The outcome of a message that started no run, given its task's record as it now is."""
    if record is None:
        logger.error("message for unknown task %s dropped (no such record)", task_id)
        return Outcome("dropped", why="no such record")
    if record.status is TaskStatus.CANCELLED:
        logger.info("task %s was cancelled; its message is dropped", task_id)
        return Outcome("revoked", record, why="cancelled")
    logger.info("task %s is %s; duplicate or stale message dropped", task_id, record.status)
    return Outcome("dropped", record, why=f"task is {record.status}")


class TaskRunner:
    def __init__(
        self,
        lifecycle: Lifecycle,
        executors: ExecutorSet,
        dispatcher: Dispatcher,
        config: WorkerConfig,
        *,
        default_max_retries: int,
        default_timeout: float | None,
        max_countdown: float = 1.0,
        kept_for: float | None = None,
    ) -> None:
        self.lifecycle = lifecycle
        self.storage = lifecycle.storage
        self.executors = executors
        self.dispatcher = dispatcher
        self.config = config
        self.default_max_retries = default_max_retries
        self.default_timeout = default_timeout
        # A retry due later than this waits in storage for the scheduler (scheduler.max_countdown).
        self.max_countdown = max_countdown
        # Finished records may be purged after this long (storage.retention; None: kept forever).
        self.kept_for = kept_for
        # Log lines and outcomes that could not be written yet, in order (storage/spool.py).
        self.spool = lifecycle.spool
        # This worker process's name for its runs of plain messages (lease.py); the worker's
        # bootstep sets it before the pool forks.
        self.incarnation = new_incarnation()

    # --- the happy path -------------------------------------------------------------------

    def run(self, d: Delivery, worker_id: str) -> Outcome:
        task = self.start(d, worker_id)
        if task is None:
            return self._dropped(d)
        buffer = TaskLogBuffer(
            task.task_id,
            task.attempt,
            self._write_logs,
            max_lines=self.config.max_log_lines_per_task,
            max_bytes=self.config.max_log_line_bytes,
            run=task.run,
        )
        try:
            with capture(buffer):
                result = self._execute(task)
                # Lines first: whoever sees the final status can read every line of the attempt.
                buffer.flush()
                return self.finish(task, result)
        finally:
            buffer.flush()

    def call(self, task_type: str, args: list[Any], kwargs: dict[str, Any]) -> TaskResult:
        """A direct call, as Celery runs a task's function when it is called (``add(2, 2)``, and
        each item of canvas ``chunks``, ``starmap`` and ``map`` inside their one task): the
        executor runs here and now, with no message, no record, no retries and no time limit."""
        now = utcnow()
        task = Task(
            task_id=new_id(),
            task_type=task_type,
            payload=kwargs,
            args=args or None,
            status=TaskStatus.RUNNING,
            attempt=1,
            created_at=now,
            started_at=now,
        )
        return self._execute(task)

    def start(self, d: Delivery, worker_id: str) -> Task | None:
        """Claim the record the message names, or create it for a plain Celery message."""
        if d.header is not None:
            h = d.header
            task = Task(
                task_id=d.task_id,
                task_type=d.task_type,
                payload=d.kwargs,
                args=d.args or None,
                attempt=h.attempt,
                run=h.run,
                max_retries=h.max_retries,
                timeout=d.timeout,
                priority=d.priority,
                idempotency_key=h.idempotency_key,
                parent_id=d.parent_id,
                root_id=d.root_id,
                group_id=d.group_id,
            )
            running = self.lifecycle.claim(task, h.token, worker_id, self.lease(task), h.queued_at)
            if running is not None or not self._lost_record(h):
                return running
            # A single submit publishes while its record's insert is on the way, committed
            # without waiting for the disk (``TaskManager.submit``): the claim may have run before
            # that insert committed, or a crash of the database may have lost it.
            if self.storage.tasks.get(d.task_id) is None:
                made = self.lifecycle.received(
                    task.replace(dispatch_token=h.token, queued_at=h.queued_at, worker_id=worker_id), self.lease(task)
                )
                if made is not None:
                    logger.info(
                        "task %s: no record for its first message (not written yet, or lost by the "
                        "database); made again from the message",
                        d.task_id,
                    )
                    return made
            # The submit's insert committed since the claim (this insert waited for it, or the
            # read found it): claimed now.  A duplicate or stale message fails this claim too.
            return self.lifecycle.claim(task, h.token, worker_id, self.lease(task), h.queued_at)
        # A plain Celery message: record it on receipt, keyed by its Celery task id.
        task = self.plain_task(d, worker_id)
        running = self.lifecycle.received(task, self.lease(task))
        if running is not None:
            return running
        # Redelivered, sent again with the same id, or held for its eta and recorded then (``hold``).
        record = self.storage.tasks.get(d.task_id)
        if record is None or record.status not in STARTABLE or record.dispatch_token is None:
            return None
        # A record that never started (held for its eta, here or by a worker that died or stopped
        # before it was due) is this attempt; one that ran before is claimed by the next.
        fresh = record.started_at is None
        return self.lifecycle.claim(
            record.replace(attempt=record.attempt if fresh else record.attempt + 1),
            record.dispatch_token,
            worker_id,
            self.lease(record),
            record.queued_at if fresh else None,
            new_token=task.dispatch_token,
        )

    def plain_task(self, d: Delivery, worker_id: str) -> Task:
        """The record of a plain Celery message (one without the celery_ext header), as this
        worker process's run of it: its type's retry cap and time limit, and its plain token."""
        executor = self.executors.get(d.task_type)
        settings = executor.settings if executor is not None else None
        max_retries = self.default_max_retries
        if settings is not None and settings.max_retries is not None:
            max_retries = settings.max_retries
        timeout = d.timeout or (settings.timeout if settings else None) or self.default_timeout
        return Task(
            task_id=d.task_id,
            task_type=d.task_type,
            payload=d.kwargs,
            args=d.args or None,
            attempt=d.retries + 1,
            max_retries=max(max_retries, d.retries),
            timeout=timeout,
            priority=d.priority,
            worker_id=worker_id,
            parent_id=d.parent_id,
            root_id=d.root_id,
            group_id=d.group_id,
            created_at=utcnow(),
            dispatch_token=plain_token(self.incarnation, d.task_id),
        )

    def hold(self, d: Delivery, worker_id: str, eta: datetime) -> Task | None:
        """A plain Celery message that the worker's main process holds until its ``eta`` (a
        ``countdown``): recorded QUEUED now, with ``run_at`` its eta (``Lifecycle.held``).  None
        when a record with its id exists (a redelivery, or it ran already)."""
        return self.lifecycle.held(self.plain_task(d, worker_id).replace(run_at=eta))

    def _lost_record(self, h: ExtHeader) -> bool:
        """Whether a message with this header whose record is missing may be a submit whose
        record the database lost: the first message of a task's first run (a later one's record
        was written durably before it), published within the time finished records are kept (a
        stale copy of an older one may find its record purged)."""
        if h.attempt != 1 or h.run != 1 or h.queued_at is None:
            return False
        return self.kept_for is None or (utcnow() - h.queued_at).total_seconds() < self.kept_for

    def lease(self, task: Task) -> float:
        """A running task's lease: its worker's main process renews it while the task runs
        (``lease.py``), so it need not cover the task's whole time limit."""
        return self.config.task_lease

    def token_of(self, d: Delivery) -> str:
        """The dispatch token the run of ``d`` holds on this worker."""
        return self._token(d.task_id, d.header)

    def _token(self, task_id: str, header: ExtHeader | None) -> str:
        return header.token if header is not None else plain_token(self.incarnation, task_id)

    def _execute(self, task: Task) -> TaskResult:
        executor = self.executors.get(task.task_type)
        if executor is None:
            return TaskResult.fail("unknown_task_type", f"no executor supports {task.task_type!r} on this worker")
        why = self.executors.ready(executor)
        if why:
            return TaskResult.fail("executor_unavailable", why)
        try:
            if task.args and not executor.accepts_args:
                task = task.replace(payload=payload_of(task), args=None)
            result = executor.execute(task)
        # An attempt's failure is logged as a WARNING (into the task's log, with the traceback of
        # an unexpected exception): Celery itself reports the task's failure when it is final,
        # as bare Celery does, and error trackers (Sentry's Celery integration) take it from there.
        except SoftTimeLimitExceeded as exc:
            logger.warning("time limit of %ss exceeded", task.timeout)
            return TaskResult.fail("timeout", f"time limit of {task.timeout or 0:g}s exceeded", cause=exc)
        except ExecutorError as exc:
            logger.warning("%s: %s", exc.reason, exc)
            return TaskResult.fail(exc.reason, str(exc), retryable=exc.retryable, data=exc.data, cause=exc)
        except Exception as exc:  # noqa: BLE001 - any executor bug becomes a recorded failure
            logger.warning("%s: %s\n%s", exc.__class__.__name__, exc, traceback.format_exc())
            return TaskResult.fail("exception", f"{exc.__class__.__name__}: {exc}", retryable=True, cause=exc)
        if not isinstance(result, TaskResult):
            return TaskResult.fail("invalid_result", f"executor returned {type(result).__name__}, not TaskResult")
        try:
            json.dumps(result.data, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:  # RecursionError: nested ~1,000 deep
            return TaskResult.fail("invalid_result", f"result is not JSON-serializable: {exc}")
        return result

    # --- outcomes -------------------------------------------------------------------------

    def finish(self, task: Task, result: TaskResult) -> Outcome:
        """Record the outcome of the run.  With storage away, it is spooled (``Lifecycle.settle``)
        and reported to Celery as if written: it is applied, fenced by the run's token, when
        storage returns (a refused one then gives up the lease like a cancelled run)."""
        error = result.error or TaskErrorInfo("exception", "failed without an error")
        lifecycle = self.lifecycle

        def then(changed: bool) -> None:
            if not changed:
                self.discarded(task)

        decision = verdict(task, result)
        if decision == "succeed":
            if lifecycle.succeed(task, result.data, spool=True, then=then) is not False:
                return Outcome("succeeded", task, data=result.data)
        elif decision == "retry":
            delay = self.backoff(task.attempt)
            logger.warning("attempt %d failed (%s); retrying in %.2fs", task.attempt, error.reason, delay)
            hold = delay > self.max_countdown
            token, spooled = lifecycle.retry_settle(task, error, delay, result.data, hold=hold, spool=True, then=then)
            if token is not None:
                return Outcome(
                    "retry", task, error=error, token=token, delay=delay, held=hold or spooled, cause=result.cause
                )
        elif lifecycle.fail(task, error, result.data, spool=True, then=then) is not False:
            return Outcome("failed", task, data=result.data, error=error, cause=result.cause)
        return self.discarded(task)

    def discarded(self, task: Task) -> Outcome:
        """The record changed while the task ran (it was cancelled): nothing of this run is kept.
        If a manual retry waits for this run to end, publish it now."""
        logger.warning("task %s changed while it ran (cancelled?); outcome not recorded", task.task_id)
        token = self.lifecycle.release(task)
        if token is not None:
            record = self.storage.tasks.get(task.task_id)
            if record is not None:
                self.publish(record.replace(dispatch_token=token), attempt=1)
        return Outcome("revoked", task, why="cancelled while it ran")

    def backoff(self, attempt: int) -> float:
        delay = min(self.config.retry_backoff_max, self.config.retry_backoff * 2 ** max(0, attempt - 1))
        return random.uniform(0, delay) if self.config.retry_jitter else delay

    def fail_running(self, d: Delivery, reason: str, message: str) -> bool:
        """Record a failure decided outside the task (hard time limit)."""
        task = self._running_task(d)
        return task is not None and bool(self.lifecycle.fail(task, TaskErrorInfo(reason, message)))

    def worker_lost(self, d: Delivery) -> None:
        """The pool process running ``d`` died: retry it under a new token, or declare it dead."""
        task = self._running_task(d)
        if task is None:
            return
        error = TaskErrorInfo("worker_lost", f"the worker process died during attempt {task.attempt}")
        delay = self.backoff(task.attempt)
        hold = delay > self.max_countdown  # else published now, with the backoff as countdown
        changed, token = self.lifecycle.lost(task, error, delay, hold=hold)
        if token is not None and not hold:
            self.publish(task.replace(dispatch_token=token), attempt=task.attempt + 1, countdown=delay or None)
        elif not changed:
            # Cancelled while it ran: give up the lease, publishing a retry that waited for it.
            self.discarded(task)

    def stopping(self, task_id: str, header: ExtHeader | None) -> Task | None:
        """Celery is terminating the pool process that runs this message here (``celery control
        terminate``, ``revoke --terminate``, ``cancel --terminate``) and reports it REVOKED now;
        the pool reports the process's end (``terminated``) only at its next maintenance, seconds
        later.  So the record is cancelled now, if this message's run holds it.  Returns it,
        cancelled (by this call or by the cancel that asked for the termination); ``None`` when
        the run no longer held it (superseded, ``lease.py``) or it ended first."""
        record = self.storage.tasks.get(task_id)
        if record is None or record.dispatch_token != self._token(task_id, header):
            return None
        if record.status is TaskStatus.RUNNING and self.lifecycle.cancel(record):
            return record.replace(status=TaskStatus.CANCELLED)
        return record if record.status is TaskStatus.CANCELLED else None

    def terminated(self, d: Delivery) -> None:
        """The pool process running ``d`` was terminated on request (cancel with terminate, or
        Celery's ``revoke --terminate``): the task ends cancelled and gives up its lease.  Its
        record was cancelled when Celery stopped the process (``stopping``), unless that failed."""
        record = self.stopping(d.task_id, d.header)
        if record is not None:
            self.discarded(record)

    def publish(self, task: Task, *, attempt: int, countdown: float | None = None) -> None:
        try:
            self.dispatcher.publish(
                Dispatch(task, task.dispatch_token or "", attempt, countdown=countdown, queued_at=utcnow())
            )
        except Exception:  # noqa: BLE001
            # A retry waits in storage instead (run_at set): the scheduler publishes it when due.
            held = self._hold(task, countdown)
            logger.exception(
                "could not publish task %s; %s", task.task_id, "the scheduler will" if held else "left for recovery"
            )

    def _hold(self, task: Task, countdown: float | None) -> bool:
        due = utcnow() + timedelta(seconds=countdown or 0.0)
        try:
            return self.storage.tasks.update(
                task.task_id, (TaskStatus.RETRYING,), token=task.dispatch_token, run_at=due
            )
        except StorageError:
            return False

    # --- helpers --------------------------------------------------------------------------

    def _running_task(self, d: Delivery) -> Task | None:
        """The record of a delivery that was running, as the run knew it."""
        record = self.storage.tasks.get(d.task_id)
        if record is None or record.status is not TaskStatus.RUNNING or record.dispatch_token != self.token_of(d):
            return None
        return record

    def _dropped(self, d: Delivery) -> Outcome:
        return dropped(d.task_id, self.storage.tasks.get(d.task_id))

    def _write_logs(self, lines: Any) -> None:
        # Never blocks the task on an outage: the spool keeps the lines in order and retries.
        self.spool.submit(lines)
