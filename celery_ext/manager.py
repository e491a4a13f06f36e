"""``TaskManager``: submit, inspect, cancel, retry and wait for tasks.

The record is written before the message is published (outbox order), so a published message
always has its record, and a crash or a broker outage between the two never loses one.  On
PostgreSQL a single ``submit`` sends the insert while the publish waits for its reply and reads
the insert's answer after it (``create_sent``, ``Dispatcher.publish``'s ``meanwhile``: the
message leaves first, and the round trips overlap); a worker whose claim finds no record yet
makes it from the message, its insert waiting for the submit's (``TaskRunner.start``), and so
does one whose record the database never wrote (it failed after the send: the submit logs it
and returns).  A publish that fails before the insert is sent sends it then, for the outbox.
On a Redis broker the record is written QUEUED, the time its message will carry as
``queued_at`` (``Lifecycle.queued_before_publish``: no second write after the publish); a
publish that fails puts it back to PENDING, for the scheduler's outbox duty to publish after
``scheduler.publish_grace``, and a producer that dies between the two leaves it QUEUED without a
message, for the scheduler's purged-queue duty to publish after ``scheduler.lost_after``.  On
RabbitMQ it is written PENDING (the outbox case) and marked QUEUED after the publish.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

import orjson

from celery_ext import canvas
from celery_ext.config import Config
from celery_ext.dispatch import MAX_PRIORITY, Dispatch, Dispatcher
from celery_ext.errors import (
    InvalidPayloadError,
    InvalidTransitionError,
    PublishError,
    StorageError,
    TaskNotFoundError,
    TaskWaitTimeoutError,
    UnknownTaskTypeError,
)
from celery_ext.executors.base import ExecutorSettings
from celery_ext.executors.pool import ExecutorSet
from celery_ext.lifecycle import Lifecycle, publish_time
from celery_ext.model import (
    TERMINAL,
    Task,
    TaskFilter,
    TaskLog,
    TaskPage,
    TaskStatus,
    new_id,
    utcnow,
)
from celery_ext.routing.router import TaskRouter
from celery_ext.schedules import admin as schedule_admin
from celery_ext.schedules.model import Schedule
from celery_ext.validation import (
    MAX_DELAY,
    MAX_KEY_LENGTH,
    MAX_RETRIES,
    MAX_TIMEOUT,
    ValueProblem,
    check_filter,
    check_key,
    check_number,
    encode_within,
    storable_id,
)

logger = logging.getLogger(__name__)

_SUBMIT_KEYS = frozenset(
    {"task_type", "payload", "priority", "delay", "run_at", "max_retries", "timeout", "idempotency_key"}
)


class TaskManager:
    """The public front door of celery_ext."""

    def __init__(
        self,
        config: Config,
        lifecycle: Lifecycle,
        executors: ExecutorSet,
        dispatcher: Dispatcher,
        router: TaskRouter | None = None,
    ) -> None:
        self.config = config
        self.router = router  # what live workers advertise (None: only this process's executors)
        self.lifecycle = lifecycle
        self.storage = lifecycle.storage
        self.executors = executors
        self.dispatcher = dispatcher
        self._schema_ready = False

    # --- submitting -----------------------------------------------------------------------

    def submit(
        self,
        task_type: str,
        payload: Mapping[str, Any] | None = None,
        *,
        priority: int = 0,
        delay: float | None = None,
        run_at: datetime | None = None,
        max_retries: int | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> Task:
        """Record and publish one task; with a known ``idempotency_key``, return the first task."""
        task, countdown = self._build(
            task_type, payload, priority, delay, run_at, max_retries, timeout, idempotency_key
        )
        self.ensure_schema()
        if task.status is TaskStatus.SCHEDULED or task.idempotency_key is not None:
            # A delayed task has no message yet, so its record waits for the disk; a key's
            # task is published only if its record is the one written.
            stored, created = self.storage.tasks.create(task, durable=task.status is TaskStatus.SCHEDULED)
            if not created:
                return stored
            self.lifecycle.created([task])
            if task.status is TaskStatus.SCHEDULED:
                return task  # waits in storage: the scheduler's leader publishes it when due
            self.lifecycle.completion.expect(task)  # a thread that waits for what it submits
            return self._publish([(task, countdown)])[0]
        # The insert is sent while the publish waits for its reply, and its outcome read after
        # it: the message leaves first, and the round trips overlap.  Not waiting for the disk
        # either: a record that the database lost, or never got, is made by the worker from its
        # message (``TaskRunner.start``).
        self.lifecycle.completion.expect(task)  # a thread that waits for what it submits
        insert = _SentInsert(self.storage.tasks, task)
        if not self.storage.tasks.sends_after_publish():
            insert.send(raising=True)  # first: a store known to be away fails the submit, nothing published
        return self._publish([(task, countdown)], insert.outcome, insert.send)[0]

    def submit_many(self, specs: Iterable[Mapping[str, Any]]) -> list[Task]:
        """Submit several tasks with one insert and one producer; each spec holds ``submit``'s
        arguments (``task_type`` required).  All are validated before anything is written."""
        return self.submit_built(self.build_specs(specs))

    def submit_built(self, built: builtins.list[tuple[Task, float | None]]) -> builtins.list[Task]:
        """Record and publish tasks made by ``build_specs`` (one insert, one producer)."""
        if not built:
            return []
        self.ensure_schema()
        if all(t.idempotency_key is None and t.status is not TaskStatus.SCHEDULED for t, _ in built):
            # As a single submit: the insert overlaps the publish (a batch has no key to check).
            sent = self.storage.tasks.create_many_sent([t for t, _ in built])  # read by _publish
            return self._publish(built, sent)
        results = self.storage.tasks.create_many([t for t, _ in built])
        fresh = [(t, c) for (t, c), (_, created) in zip(built, results, strict=True) if created]
        self.lifecycle.created([t for t, _ in fresh])
        now = [(t, c) for t, c in fresh if t.status is not TaskStatus.SCHEDULED]  # the rest wait in storage
        published = {t.task_id: t for t in self._publish(now)} if now else {}
        return [published.get(stored.task_id, stored) if created else stored for stored, created in results]

    def build_specs(
        self, specs: Iterable[Mapping[str, Any]], *, forbid: frozenset[str] = frozenset()
    ) -> list[tuple[Task, float | None]]:
        """Validate ``submit`` arguments given as dicts (``task_type`` required); nothing written."""
        built = []
        for i, spec in enumerate(specs):
            refused = sorted(set(spec) & forbid)
            if refused:
                raise InvalidPayloadError(
                    f"{', '.join(refused)} cannot be given inside a chain or chord", field=f"[{i}]"
                )
            unknown = set(spec) - _SUBMIT_KEYS
            if unknown or "task_type" not in spec:
                raise InvalidPayloadError(
                    f"unknown keys {sorted(unknown)}" if unknown else "task_type is required", field=f"[{i}]"
                )
            built.append(
                self._build(
                    spec["task_type"],
                    spec.get("payload"),
                    spec.get("priority", 0),
                    spec.get("delay"),
                    spec.get("run_at"),
                    spec.get("max_retries"),
                    spec.get("timeout"),
                    spec.get("idempotency_key"),
                )
            )
        return built

    # --- canvas (celery_ext/canvas.py) ------------------------------------------------------

    def submit_group(self, specs: Iterable[Mapping[str, Any]]) -> builtins.list[Task]:
        """Tasks that run in parallel under one ``group_id`` (Celery's ``group``)."""
        return canvas.submit_group(self, specs)

    def submit_chain(self, specs: Iterable[Mapping[str, Any]]) -> builtins.list[Task]:
        """Tasks that run one after another, each given the previous one's result (Celery's
        ``chain``); every step is recorded now, the later ones ``scheduled`` until their turn."""
        return canvas.submit_chain(self, specs)

    def submit_chord(self, header: Iterable[Mapping[str, Any]], body: Mapping[str, Any]) -> builtins.list[Task]:
        """A group whose results, as a list, are given to ``body`` (Celery's ``chord``); returns
        the header's records, then the body's."""
        return canvas.submit_chord(self, header, body)

    def _build(
        self,
        task_type: str,
        payload: Any,
        priority: int,
        delay: float | None,
        run_at: datetime | None,
        max_retries: int | None,
        timeout: float | None,
        idempotency_key: str | None,
    ) -> tuple[Task, float | None]:
        check_key(task_type, "task_type", 128)
        executor = self.executors.get(task_type)
        if executor is None:
            # Not run here, but maybe by a live worker: this process need not import the users'
            # task modules.  That worker validates the payload against the function.
            advertised = self._advertised_types()
            if task_type not in advertised:
                raise UnknownTaskTypeError(task_type, sorted({*self.executors.task_types, *advertised}))
        payload = self._check_payload({} if payload is None else payload)
        if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= MAX_PRIORITY:
            raise InvalidPayloadError(f"must be an integer 0..{MAX_PRIORITY} (got {priority!r})", field="priority")
        if delay is not None and run_at is not None:
            raise InvalidPayloadError("give delay or run_at, not both", field="delay")
        # Finite and bounded (celery_ext/validation.py): refused here, before anything is written,
        # rather than failing later in the worker or the store.
        if delay is not None:
            check_number(delay, "delay", low=0, high=MAX_DELAY, unit=" seconds")
        if max_retries is not None:
            check_number(max_retries, "max_retries", low=0, high=MAX_RETRIES, integer=True)
        if timeout is not None:
            check_number(timeout, "timeout", low=0, high=MAX_TIMEOUT, strict_low=True, unit=" seconds")
        if idempotency_key is not None:
            check_key(idempotency_key, "idempotency_key")
        now = utcnow()
        if run_at is not None:
            if not isinstance(run_at, datetime) or run_at.tzinfo is None:
                raise InvalidPayloadError("must be a timezone-aware datetime", field="run_at")
            delay = max(0.0, (run_at - now).total_seconds())
            check_number(delay, "run_at", low=0, high=MAX_DELAY, unit=" seconds from now")
        elif delay:
            run_at = now + timedelta(seconds=delay)
        # A type this process has no executor for gets the defaults of the worker section.
        settings = executor.settings if executor is not None else ExecutorSettings()
        status = self._first_status(delay)
        task = Task(
            task_id=new_id(),
            task_type=task_type,
            payload=payload,
            status=status,
            priority=priority,
            max_retries=max_retries
            if max_retries is not None
            else (settings.max_retries if settings.max_retries is not None else self.config.worker.default_max_retries),
            timeout=timeout or settings.timeout or self.config.worker.default_timeout,
            run_at=run_at,
            idempotency_key=idempotency_key,
            created_at=now,
            # Published now and written QUEUED: the time its message carries (``publish_time``).
            queued_at=now if status is TaskStatus.QUEUED else None,
            dispatch_token=new_id(),
        )
        return task, delay or None

    def _first_status(self, delay: float | None) -> TaskStatus:
        """SCHEDULED past ``scheduler.max_countdown`` (held in storage until due: no message
        yet); else published now, and written QUEUED on a Redis broker (no mark after the
        publish, ``Lifecycle.queued_before_publish``), PENDING elsewhere."""
        if delay and delay > self.config.scheduler.max_countdown:
            return TaskStatus.SCHEDULED
        return TaskStatus.QUEUED if self.lifecycle.queued_before_publish else TaskStatus.PENDING

    def _advertised_types(self) -> frozenset[str]:
        """The task types live workers advertise in the registry (the router's snapshot, read at
        most once per ``scheduler.routing_cache``); empty without a registry."""
        return self.router.advertised() if self.router is not None else frozenset()

    def _check_payload(self, payload: Any) -> dict[str, Any]:
        if not isinstance(payload, Mapping):
            raise InvalidPayloadError(f"must be a JSON object (got {type(payload).__name__})", field="payload")
        limits = self.config.app
        try:
            encoded = encode_within(payload, "payload", limits.max_payload_depth, limits.max_payload_bytes)
        except ValueProblem as exc:
            limit = " (app.max_payload_depth)" if "nested deeper" in str(exc) else ""
            raise InvalidPayloadError(exc.message + limit, field=exc.path) from exc.__cause__
        result: dict[str, Any] = orjson.loads(encoded)  # a copy of plain JSON types (5x json.loads's speed)
        return result

    def publish_pending(self, task: Task) -> Task:
        """Publish a PENDING record under its dispatch token and mark it queued (the scheduler's
        outbox duty: a record whose producer never published it, or whose publish failed)."""
        return self._publish([(task, None)])[0]

    def _publish(
        self,
        batch: list[tuple[Task, float | None]],
        written: Callable[[], builtins.list[tuple[Task, bool]]] | None = None,
        meanwhile: Callable[[], None] | None = None,
    ) -> list[Task]:
        """Publish ``batch``, whose records are written, or, with ``written``, whose insert is on
        the way (``create_sent``, ``create_many_sent``), or is sent by ``meanwhile`` during the
        publish (a single message: ``Dispatcher.publish``): its outcome is read after the
        publish."""
        # Taken before publishing (or at the build, for a record written QUEUED), so queued_at
        # never comes after a fast worker's started_at; the message carries it, so a worker that
        # claims first records it too.
        now = utcnow()
        tasks = [t for t, _ in batch]
        try:
            dispatches = [
                Dispatch(t, t.dispatch_token or "", t.attempt + 1, countdown=c, queued_at=publish_time(t, now))
                for t, c in batch
            ]
            if len(dispatches) == 1:
                self.dispatcher.publish(dispatches[0], meanwhile=meanwhile)
            else:
                if meanwhile is not None:
                    meanwhile()
                self.dispatcher.publish_many(dispatches)
        except BaseException as exc:
            mine = tasks if written is None else self._written(tasks, written, published=False)
            if mine:
                self.lifecycle.publish_failed(mine)  # back to PENDING: the outbox publishes them
            if not isinstance(exc, Exception):
                raise
            raise PublishError(batch[0][0].task_id, exc) from exc
        if written is None:
            return self.lifecycle.mark_queued(tasks, now)
        mine = self._written(tasks, written, published=True)
        queued = {t.task_id: t for t in self.lifecycle.mark_queued(mine, now)} if mine else {}
        return [queued.get(t.task_id, t) for t in tasks]

    def _written(
        self, tasks: list[Task], written: Callable[[], builtins.list[tuple[Task, bool]]], *, published: bool
    ) -> list[Task]:
        """The outcome of an insert read after its publish: the records this producer wrote.
        Not the ones a worker made first, from their messages (``TaskRunner.start``), and none
        when the write failed: unpublished, the submit raises the publish's error (nothing
        written, nothing sent); published, the tasks are out, and the workers make their records
        on receipt, as for records that a crash of the database lost."""
        try:
            outcomes = written()
        except StorageError as exc:
            if published and len(tasks) == 1:
                logger.warning(
                    "task %s: published, but its record could not be written (%s); the worker that "
                    "receives it makes it",
                    tasks[0].task_id,
                    exc,
                )
            elif published:
                logger.warning(
                    "%d tasks (the first %s): published, but their records could not be written (%s); "
                    "the workers that receive them make them",
                    len(tasks),
                    tasks[0].task_id,
                    exc,
                )
            return []
        mine = [stored for stored, created in outcomes if created]
        self.lifecycle.created(mine)
        return mine

    def ensure_schema(self) -> None:
        if not self._schema_ready:
            self.storage.migrate()
            self._schema_ready = True

    # --- reading --------------------------------------------------------------------------

    def get(self, task_id: str) -> Task:
        self.lifecycle.marks.flush()  # this process's submits read back as queued
        return self._read(task_id)

    def _read(self, task_id: str) -> Task:
        if not storable_id(task_id, MAX_KEY_LENGTH):  # NUL, a lone surrogate: no record has such an id
            raise TaskNotFoundError(task_id)
        task = self.storage.tasks.get(task_id)
        if task is None:
            raise TaskNotFoundError(task_id)
        return task

    def list(self, flt: TaskFilter | None = None, **filters: Any) -> TaskPage:
        if flt is None:
            for key in ("status", "task_type"):
                value = filters.get(key)
                if isinstance(value, str | TaskStatus):
                    filters[key] = (value,)
            if "status" in filters:
                filters["status"] = tuple(TaskStatus(s) for s in filters["status"])
            flt = TaskFilter(**filters)
        check_filter(flt)
        self.lifecycle.marks.flush()
        return self.storage.tasks.list(flt)

    def logs(
        self, task_id: str, *, attempt: int | None = None, run: int | None = None, limit: int = 1000
    ) -> builtins.list[TaskLog]:
        """Log lines in the order written; each carries its ``run`` (manual retries) and
        ``attempt`` (automatic retries within a run)."""
        self.get(task_id)
        return self.storage.logs.list(task_id, attempt=attempt, run=run, limit=limit)

    def wait(self, task_id: str, timeout: float | None = None) -> Task:
        """Block until the task reaches a terminal status (woken by its worker, see
        ``completion``; no polling of the store while Redis is there).  The wait reads without
        ``get``'s flush of this process's queued marks (an UPDATE on the waiter's path, taking the
        row lock the worker's claim wants); a timeout reports the status as ``get`` sees it."""
        task = self.lifecycle.completion.wait(task_id, lambda: self._read(task_id), timeout)
        if task.status not in TERMINAL:
            task = self.get(task_id)
            if task.status not in TERMINAL:
                raise TaskWaitTimeoutError(task_id, timeout or 0.0, task.status.value)
        return task

    # --- changing -------------------------------------------------------------------------

    def cancel(self, task_id: str, *, terminate: bool = False) -> Task:
        """Cancel a task that has not finished.  A running task's outcome is discarded; with
        ``terminate`` its pool process is also sent SIGTERM."""
        for _ in range(5):
            task = self.get(task_id)
            if task.status in TERMINAL:
                raise InvalidTransitionError(task_id, task.status.value, "cancel")
            if self.lifecycle.cancel(task):
                break
        else:
            raise InvalidTransitionError(task_id, self.get(task_id).status.value, "cancel")
        if terminate and task.status is TaskStatus.RUNNING:
            # Only on request: a revoked id stays in the workers' revoked set for hours, which
            # would also discard a later manual retry of this task.  The record alone already
            # stops a queued message from running (its claim fails).
            try:
                self.dispatcher.app.control.revoke(task_id, terminate=True)
            except Exception:  # noqa: BLE001, S110 - the record is authoritative; revoke only saves work
                pass
        return self.get(task_id)

    def retry(self, task_id: str) -> Task:
        """Run a failed, dead or cancelled task again: a new run (``run`` + 1) with a fresh
        attempt budget.  If the task was cancelled while running and that run has not ended
        yet, the new run is published when it ends, never alongside it."""
        task = self.get(task_id)
        if task.status not in (TaskStatus.FAILED, TaskStatus.DEAD, TaskStatus.CANCELLED):
            raise InvalidTransitionError(task_id, task.status.value, "retry")
        fresh = self.lifecycle.reopen(task)
        if fresh is None:
            raise InvalidTransitionError(task_id, self.get(task_id).status.value, "retry")
        if fresh.lease_until is not None:
            return fresh  # PENDING until the cancelled run ends
        # The record as this call left it (QUEUED), as submit returns it: read back, a fast
        # worker may already have claimed or finished the new run.
        return self._publish([(fresh, None)])[0]

    # --- periodic schedules (celery_ext/schedules) ----------------------------------------

    def add_schedule(
        self,
        name: str,
        task_type: str,
        payload: Mapping[str, Any] | None = None,
        *,
        cron: str | None = None,
        every: float | None = None,
        timezone: str = "UTC",
        catch_up: str = "skip",
        paused: bool = False,
        priority: int = 0,
        max_retries: int | None = None,
        timeout: float | None = None,
    ) -> Schedule:
        """Create or replace a schedule firing ``task_type`` on ``cron`` (5 fields, wall-clock time
        in ``timezone``) or ``every`` N seconds; ``catch_up`` ``skip`` or ``once``.  The task is
        checked as a submit's is.  A replaced schedule keeps its next fire time if its timing is
        unchanged.  Stored durably: the scheduler's leader fires it."""
        options: dict[str, Any] = {"priority": priority, "max_retries": max_retries, "timeout": timeout}
        task, _ = self.build_specs([{"task_type": task_type, "payload": payload, **options}])[0]
        schedule = Schedule(name, task_type, task.payload, cron, every, timezone, catch_up, paused, **options)
        self.ensure_schema()
        return schedule_admin.add(self.storage, schedule, utcnow())

    def remove_schedule(self, name: str) -> None:
        self.ensure_schema()
        schedule_admin.remove(self.storage, name)

    def pause_schedule(self, name: str) -> Schedule:
        self.ensure_schema()
        return schedule_admin.set_paused(self.storage, name, True)

    def resume_schedule(self, name: str) -> Schedule:
        """Fire again; times missed while paused are handled by its ``catch_up``."""
        self.ensure_schema()
        return schedule_admin.set_paused(self.storage, name, False)

    def get_schedule(self, name: str) -> Schedule:
        self.ensure_schema()
        return schedule_admin.get(self.storage, name)

    def list_schedules(self) -> builtins.list[Schedule]:
        self.ensure_schema()
        return self.storage.schedules.list()


class _SentInsert:
    """A single submit's insert (``create_sent``), sent by ``send`` while the publish waits for
    its reply, its outcome read by ``outcome`` after the publish.  An error of the send is raised
    by ``outcome`` (a StorageError: the record was not written, ``_written``).  ``outcome`` sends
    the insert if the publish failed before it was sent, so that the record is written for the
    outbox to publish."""

    __slots__ = ("repository", "task", "read", "error")

    def __init__(self, repository: Any, task: Task) -> None:
        self.repository = repository
        self.task = task
        self.read: Callable[[], tuple[Task, bool]] | None = None
        self.error: Exception | None = None

    def send(self, *, raising: bool = False) -> None:
        """Send the insert (once); its error is kept for ``outcome``, or raised now (``raising``)."""
        if self.read is not None or self.error is not None:
            return
        try:
            self.read = self.repository.create_sent(self.task)
        except Exception as exc:
            if raising:
                raise
            self.error = exc  # raised by ``outcome``, after the publish's reply is read

    def outcome(self) -> list[tuple[Task, bool]]:
        self.send()
        if self.read is None:
            raise self.error or StorageError("the record's insert was not sent")
        return [self.read()]
