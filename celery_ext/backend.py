"""A Celery result backend on the durable task store: ``AsyncResult`` reads the task record.

``result_backend = "celery_ext://"`` (the entry point ``celery_ext`` of the group
``celery.result_backends``), optionally with a config path: ``celery_ext:///etc/app/config.yaml``
(else ``$CELERY_EXT_CONFIG``, else ``./config.yaml``).  A producer that imports only ``celery``
can therefore say ``Celery(broker=..., backend="celery_ext://")`` and read results.

There is no second result store: ``AsyncResult.state``, ``.result`` and ``.get()`` read the record,
and waiting is woken by the worker (``completion``) instead of polling the store.  The record's
status maps to Celery's states:

    pending, scheduled, queued -> PENDING     succeeded    -> SUCCESS (the result)
    running                    -> STARTED     failed, dead -> FAILURE (TaskFailed("reason: message"))
    retrying                   -> RETRY       cancelled    -> REVOKED

Outcomes of celery_ext task types are written by the worker's state machine, so storing them
here is a no-op.  Any other task the worker runs (a plain ``@app.task`` of the same app) gets a
record from what Celery stores for it.  Chords use Celery's ``chord_unlock`` (no native join).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime
from functools import cached_property
from typing import Any

from celery import states
from celery.app.task import Context
from celery.backends.base import BaseBackend
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import result_from_tuple

from celery_ext.completion import Completion
from celery_ext.config import AppConfig, load_config
from celery_ext.errors import TaskFailed
from celery_ext.factory import broker_for, completion_for
from celery_ext.lifecycle import Lifecycle
from celery_ext.message import HEADER, ExtHeader, MalformedMessageError
from celery_ext.model import Task, TaskErrorInfo, TaskStatus, new_id, utcnow
from celery_ext.runtime import Runtime
from celery_ext.storage import open_storage
from celery_ext.storage.base import GroupRepository, Storage
from celery_ext.task import ExecutorTask, chain_ids
from celery_ext.validation import ValueProblem, encode_within

logger = logging.getLogger("celery_ext.backend")

TRACEBACK = "Traceback (most recent call last):"
RUNNER = "celery_ext.runner: "  # how the runner's lines start in a task's log (tasklog's format)

STATE_OF = {
    TaskStatus.PENDING: states.PENDING,
    TaskStatus.SCHEDULED: states.PENDING,
    TaskStatus.QUEUED: states.PENDING,
    TaskStatus.RUNNING: states.STARTED,
    TaskStatus.RETRYING: states.RETRY,
    TaskStatus.SUCCEEDED: states.SUCCESS,
    TaskStatus.FAILED: states.FAILURE,
    TaskStatus.DEAD: states.FAILURE,
    TaskStatus.CANCELLED: states.REVOKED,
}
STATUS_OF = {
    states.STARTED: TaskStatus.RUNNING,
    states.RETRY: TaskStatus.RETRYING,
    states.SUCCESS: TaskStatus.SUCCEEDED,
    states.FAILURE: TaskStatus.FAILED,
    states.REVOKED: TaskStatus.CANCELLED,
}


def celery_meta(
    task: Task | None, task_id: str, exception: Callable[[dict[str, Any]], BaseException] | None = None
) -> dict[str, Any]:
    """A record as Celery's task meta (what ``AsyncResult`` reads).  A plain Celery task's failure
    keeps Celery's encoding of its exception in ``result``; ``exception`` rebuilds it (so
    ``get()`` raises the task's own exception type, as with any Celery backend)."""
    if task is None:
        return {"task_id": task_id, "status": states.PENDING, "result": None, "traceback": None, "children": []}
    state = STATE_OF[task.status]
    result: Any = task.result
    if state in (states.FAILURE, states.RETRY) and exception is not None and _is_encoded_exception(result):
        result = exception(result)
    elif state in (states.FAILURE, states.RETRY) and task.error is not None:
        result = TaskFailed.of(task.error.reason, task.error.message)
    elif state == states.REVOKED:
        result = TaskFailed.of("cancelled", "the task was cancelled")
    elif state == states.STARTED and (reported := task.reported) is not None:
        state, result = reported["state"], reported["meta"]  # update_state's custom state
    elif state == states.STARTED:
        result = {"hostname": task.worker_id}
    return {
        "task_id": task.task_id,
        "status": state,
        "result": result,
        "traceback": None,
        "children": [],
        "date_done": task.finished_at,
        "name": task.task_type,
        "args": task.args or [],
        "kwargs": task.payload,
        "worker": task.worker_id,
        "retries": max(0, task.attempt - 1),
    }


class RecordBackend(BaseBackend):
    app: Any
    supports_native_join = False  # chords: Celery's chord_unlock polls the members' states
    supports_autoexpire = False
    persistent = True

    def __init__(self, app: Any, url: str | None = None, **kwargs: Any) -> None:
        super().__init__(app, url=url, **kwargs)
        self.url = url
        self._local = threading.local()

    def as_uri(self, include_password: bool = False) -> str:
        """As given (``celery_ext://``, or with a config path): it holds no password."""
        return self.url or "celery_ext://"

    # --- where the records are ------------------------------------------------------------

    @cached_property
    def _parts(self) -> tuple[Storage, Completion]:
        runtime = getattr(self.app, "celery_ext", None)
        if isinstance(runtime, Runtime):
            return runtime.storage, runtime.lifecycle.completion
        # A plain Celery app (a producer that does not import celery_ext): open the store that
        # config.yaml names, read-only in spirit, and the completion channel.
        path = (self.url or "").partition("://")[2] or None
        config = load_config(path)
        broker_url, _ = broker_for(config)
        return open_storage(config.storage, config.data_dir), completion_for(config, broker_url)

    @property
    def storage(self) -> Storage:
        return self._parts[0]

    # --- reading --------------------------------------------------------------------------

    def _get_task_meta_for(self, task_id: str) -> dict[str, Any]:
        return self._meta(self.storage.tasks.get(task_id), task_id)

    def _meta(self, task: Task | None, task_id: str) -> dict[str, Any]:
        meta = celery_meta(task, task_id, self.exception_to_python)
        if task is not None and task.error is not None and task.error.reason == "exception":
            if meta["status"] in (states.FAILURE, states.RETRY):
                meta["traceback"] = self._traceback(task)
        return meta

    def _traceback(self, task: Task) -> str | None:
        """``AsyncResult.traceback`` of a failed attempt: the executor's exception as the worker
        logged it in the attempt's log (only an unexpected exception has one)."""
        try:
            lines = self.storage.logs.list(task.task_id, run=task.run, attempt=task.attempt)
        except Exception:  # noqa: BLE001 - a missing traceback must not fail the result's read
            logger.warning("could not read the log of task %s for its traceback", task.task_id, exc_info=True)
            return None
        for line in reversed(lines):
            start = line.message.find(TRACEBACK)
            if line.message.startswith(RUNNER) and start >= 0:
                return line.message[start:]
        return None

    def wait_for(
        self,
        task_id: str,
        timeout: float | None = None,
        interval: float = 0.5,
        no_ack: bool = True,
        on_interval: Any = None,
    ) -> dict[str, Any]:
        self._ensure_not_eager()  # type: ignore[attr-defined]
        storage, completion = self._parts

        def read() -> Task | None:
            if on_interval:
                on_interval()
            return storage.tasks.get(task_id)

        # Terminal statuses are exactly Celery's ready states; a pushed outcome spares a read.
        task = completion.wait(task_id, read, timeout)
        if task is None or not task.status.terminal:
            raise CeleryTimeoutError("The operation timed out.")
        return self._meta(task, task_id)

    # --- writing --------------------------------------------------------------------------

    def _store_result(
        self, task_id: str, result: Any, state: str, traceback: Any = None, request: Any = None, **kwargs: Any
    ) -> Any:
        if request is None:
            # Celery failing a chord's body from chord_unlock: it passes no request, only the id.
            callback = getattr(self._local, "callback", None)
            if callback is not None and callback.id == task_id:
                request = Context(
                    {
                        "task": callback.task,
                        "id": task_id,
                        "args": callback.args,
                        "kwargs": callback.kwargs,
                        **callback.options,
                    }
                )
        name = getattr(request, "task", None) if request is not None else None
        if state == states.FAILURE and name and self._is_celery_ext_task(name):
            # A step that never ran fails because one before it did (chain, chord).
            self._fail_waiting(task_id, result, name, request)
        if not name or self._is_celery_ext_task(name):
            if state == states.REVOKED and name:
                self._cancel_discarded(task_id, str(name), result, request)
            elif state not in states.ALL_STATES and name:
                self._record_progress(task_id, state, result)
            return result  # celery_ext's own types are recorded by the worker's state machine
        status = STATUS_OF.get(state)
        if status is None:
            return result
        try:
            self._record_plain(task_id, str(name), status, result, request)
        except Exception:  # noqa: BLE001 - never fail a plain task on its bookkeeping
            logger.exception("could not record the %s of task %s[%s]", state, name, task_id)
        return result

    def _record_progress(self, task_id: str, state: str, meta: Any) -> None:
        """Celery's ``update_state`` with a custom state (``PROGRESS``, with ``meta``) from a
        running task: kept on its record, as Celery's state while this attempt runs.  Meta that is
        not storable JSON within the payload limits raises ``ValueError`` naming what is wrong."""
        runtime = getattr(self.app, "celery_ext", None)
        limits = runtime.config.app if isinstance(runtime, Runtime) else AppConfig()
        try:
            encode_within(meta, "meta", limits.max_payload_depth, limits.max_payload_bytes)
        except ValueProblem as exc:
            raise ValueError(f"update_state({state!r}) of task {task_id}: {exc}") from None
        tasks = self.storage.tasks
        task = tasks.get(task_id)
        if task is None or task.status is not TaskStatus.RUNNING:
            logger.info("update_state(%r) of task %s ignored: it is not running", state, task_id)
            return
        progress = {"state": state, "meta": meta, "attempt": task.attempt, "run": task.run, "at": utcnow().isoformat()}
        # Not durable: a report lost with a crash of the database is replaced by the next one.
        if tasks.update(task_id, [TaskStatus.RUNNING], token=task.dispatch_token, durable=False, progress=progress):
            if isinstance(runtime, Runtime):
                runtime.observer.task_progress(task.replace(progress=progress))

    def chord_error_from_stack(self, callback: Any, exc: Any = None) -> Any:
        self._local.callback = callback
        try:
            return super().chord_error_from_stack(callback, exc)
        finally:
            self._local.callback = None

    def _fail_waiting(self, task_id: str, result: Any, name: str, request: Any) -> None:
        """Record as failed (``parent_failed``) a step that will never run: its record waits
        SCHEDULED (TaskManager's canvas), or it has none yet (a plain Celery chain or chord)."""
        storage, completion = self._parts
        error = TaskErrorInfo("parent_failed", _exception_text(result))
        now = utcnow()
        try:
            if not storage.tasks.update(
                task_id, (TaskStatus.SCHEDULED,), status=TaskStatus.FAILED, error=error, finished_at=now
            ):
                if storage.tasks.get(task_id) is not None:
                    return  # it ran, or is running: its own outcome stands
                storage.tasks.create(_plain_task(task_id, name, TaskStatus.FAILED, request, now).replace(error=error))
            completion.notify(task_id)
        except Exception:  # noqa: BLE001 - Celery's own bookkeeping must go on
            logger.exception("could not record the failure of waiting task %s", task_id)

    def _cancel_discarded(self, task_id: str, name: str, why: Any, request: Any) -> None:
        """Celery's worker discarded a message of a celery_ext type without running it: revoked
        (``celery control revoke``, Flower's button, ``AsyncResult.revoke``) or expired; or it is
        terminating the pool process that runs it (``terminated``).  Celery reports it REVOKED, so
        its record says CANCELLED too, its waiters are woken, and the chain steps that waited for
        it fail (``parent_failed``), as when it is cancelled.  A record that runs keeps its status
        unless this is its run being terminated, and one that has ended keeps its status.  A plain
        message of the type that was never recorded gets its record now."""
        runtime = getattr(self.app, "celery_ext", None)
        if not isinstance(runtime, Runtime):
            return  # only a worker discards messages
        if _is_encoded_exception(why) and isinstance(why["exc_message"], list | tuple):
            why = ", ".join(map(str, why["exc_message"]))  # Celery's TaskRevokedError("revoked")
        if why not in ("revoked", "expired", "terminated"):
            return
        try:
            header = ExtHeader.parse({HEADER: getattr(request, HEADER, None)})
        except MalformedMessageError:
            return
        try:
            if why == "terminated":
                # A running message whose pool process Celery is stopping.
                cancelled = runtime.runner.stopping(task_id, header)
            else:
                cancelled = self._cancel_record(runtime.lifecycle, task_id, name, request, header)
            if cancelled is None:
                return
            done = "terminated by Celery" if why == "terminated" else f"discarded by Celery ({why})"
            logger.info("task %s[%s] %s: its record is cancelled", name, task_id, done)
            runtime.lifecycle.fail_waiting(chain_ids(getattr(request, "chain", None)), cancelled, "was cancelled")
        except Exception:  # noqa: BLE001 - Celery's own bookkeeping must go on
            logger.exception("could not record that task %s was revoked", task_id)

    @staticmethod
    def _cancel_record(
        lifecycle: Lifecycle, task_id: str, name: str, request: Any, header: ExtHeader | None
    ) -> Task | None:
        """The record of ``task_id`` as cancelled by this call; None if it runs or has ended, or if
        the message was of an older dispatch than the record's (its header's token)."""
        for _ in range(5):
            task = lifecycle.storage.tasks.get(task_id)
            if task is None:
                record = _plain_task(task_id, name, TaskStatus.CANCELLED, request, utcnow()).replace(started_at=None)
                if not lifecycle.storage.tasks.create(record)[1]:
                    continue  # made meanwhile: cancel that one
                lifecycle.observer.task_cancelled(record)
                lifecycle.completion.notify(task_id)
                return record
            if task.status.terminal or task.status is TaskStatus.RUNNING:
                return None
            if header is not None and header.token != task.dispatch_token:
                return None
            if lifecycle.cancel(task):
                return task.replace(status=TaskStatus.CANCELLED)
        return None

    def _is_celery_ext_task(self, name: str) -> bool:
        return isinstance(self.app.tasks.get(name), ExecutorTask)

    def _record_plain(self, task_id: str, name: str, status: TaskStatus, result: Any, request: Any) -> None:
        now = utcnow()
        error = None
        if status in (TaskStatus.FAILED, TaskStatus.RETRYING):
            # Celery's own encoding of the exception stays in ``result``, so AsyncResult rebuilds it.
            error = TaskErrorInfo("exception", _exception_text(result))
        keep = status in (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.RETRYING)
        fields: dict[str, Any] = {
            "status": status,
            "result": result if keep else None,
            "error": error,
            "worker_id": getattr(request, "hostname", None),
            "attempt": int(getattr(request, "retries", 0) or 0) + 1,
        }
        if status is TaskStatus.RUNNING:
            fields["started_at"] = now
        elif status.terminal:
            fields.update(finished_at=now, lease_until=None)
        tasks = self.storage.tasks
        if tasks.update(task_id, [s for s in TaskStatus if not s.terminal], **fields):
            return
        task = _plain_task(task_id, name, status, request, now)
        task = task.replace(
            **{k: v for k, v in fields.items() if k not in ("status", "started_at", "finished_at", "lease_until")}
        )
        tasks.create(task)

    def _forget(self, task_id: str) -> None:
        """Records are durable; ``storage.retention`` removes them."""

    def cleanup(self) -> None:
        """Retention is ``storage.retention``, applied by the scheduler."""

    # --- groups saved by GroupResult.save() ----------------------------------------------
    # The members' records hold their group id, but not their order, and a member that has not
    # started has no record yet: the saved group keeps the ordered ids, as Celery's backends do.

    def _groups(self) -> GroupRepository:
        groups = self.storage.groups
        if groups is None:
            raise NotImplementedError(
                f"the task store {self.storage.description} keeps no saved groups, so "
                "GroupResult.save() / restore() / delete() cannot be used with it "
                "(the sqlite, postgresql, mysql and mongodb stores keep them)"
            )
        return groups

    def _save_group(self, group_id: str, result: Any) -> Any:
        self._groups().save(group_id, result.as_tuple())
        return result

    def _restore_group(self, group_id: str) -> dict[str, Any] | None:
        saved = self._groups().get(group_id)
        if saved is None:
            return None
        return {"result": result_from_tuple(saved.result, self.app), "date_done": saved.saved_at}

    def _delete_group(self, group_id: str) -> None:
        self._groups().delete(group_id)


def _plain_task(task_id: str, name: str, status: TaskStatus, request: Any, now: datetime) -> Task:
    """A record for a task celery_ext first hears of from Celery's own bookkeeping."""
    kwargs = getattr(request, "kwargs", None)
    args = getattr(request, "args", None)
    return Task(
        task_id=task_id,
        task_type=name,
        payload=dict(kwargs) if isinstance(kwargs, dict) else {},
        args=list(args) if isinstance(args, list | tuple) and args else None,
        status=status,
        created_at=now,
        queued_at=now,
        started_at=now if getattr(request, "hostname", None) else None,  # it ran on a worker
        finished_at=now if status.terminal else None,
        dispatch_token=new_id(),
        parent_id=getattr(request, "parent_id", None),
        root_id=getattr(request, "root_id", None),
        group_id=getattr(request, "group", None) or getattr(request, "group_id", None),
    )


def _is_encoded_exception(value: Any) -> bool:
    return isinstance(value, dict) and {"exc_type", "exc_message"} <= value.keys()


def _exception_text(result: Any) -> str:
    if isinstance(result, dict) and "exc_type" in result:
        message = result.get("exc_message")
        if isinstance(message, list | tuple):
            message = ", ".join(str(m) for m in message)
        return f"{result['exc_type']}: {message}"
    return str(result)
