"""The Celery adapter: one Celery task per supported task type, running through ``TaskRunner``.

Flower sees each celery_ext task type under its own name, and Celery's states tell the truth:
a success returns the executor's result, a failure raises ``TaskFailed("reason: message")``
(FAILURE), a retry is Celery's own ``Task.retry`` (RETRY, ``retries`` + 1), and a task cancelled
in celery_ext is reported REVOKED.  ``ExtRequest`` runs in the worker's main process and records
what a pool child cannot: a hard time limit, or the child's death.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from billiard.exceptions import Terminated, WorkerLostError
from celery import Celery, Task
from celery.exceptions import Ignore, Reject, Retry, TimeLimitExceeded
from celery.utils.saferepr import saferepr
from celery.worker.request import Request

from celery_ext.dispatch import queue_name
from celery_ext.errors import StorageError, TaskFailed
from celery_ext.message import HEADER, ExtHeader, MalformedMessageError, check_call, soft_limit
from celery_ext.model import TaskErrorInfo, utcnow
from celery_ext.runner import Delivery, Outcome
from celery_ext.runtime import Runtime, runtime_of

logger = logging.getLogger("celery_ext.task")


def delivery_of(name: str, request: Any, args: Any, kwargs: Any) -> Delivery:
    """What celery_ext reads of a message: the header and Celery's fields, from a task's
    ``self.request`` (a Context) or from the worker's ``Request`` (its message headers)."""
    args, kwargs = check_call(args, kwargs)
    fields = getattr(request, "request_dict", None)
    if not isinstance(fields, dict):
        fields = vars(request)
    task_id = fields.get("id") or request.id
    parent = fields.get("parent_id")
    return Delivery(
        task_id=task_id,
        task_type=name,
        args=args,
        kwargs=kwargs,
        header=ExtHeader.parse(fields),
        retries=retries if isinstance(retries := fields.get("retries"), int) and retries >= 0 else 0,
        timeout=soft_limit(fields.get("timelimit")),
        # A message re-sent from inside its own task (a forward) is given itself as parent by Celery.
        parent_id=parent if parent != task_id else None,
        root_id=fields.get("root_id"),
        group_id=fields.get("group"),
    )


def chain_ids(chain: Any) -> list[str]:
    """Task ids of the steps left in a message's ``chain`` (signatures as dicts)."""
    ids = []
    for sig in chain or ():
        task_id = (sig.get("options") or {}).get("task_id") if isinstance(sig, dict) else None
        if isinstance(task_id, str):
            ids.append(task_id)
    return ids


class ExtRequest(Request):
    def on_timeout(self, soft: bool, timeout: float) -> None:
        if not soft:
            self._record(
                lambda rt, d: rt.runner.fail_running(d, "timeout", f"hard time limit of {timeout:g}s exceeded")
            )
        super().on_timeout(soft, timeout)

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        exc = getattr(exc_info.exception, "exc", exc_info.exception)  # unwrap ExceptionWithTraceback
        if isinstance(exc, WorkerLostError) and not isinstance(exc, TimeLimitExceeded):
            self._record(lambda rt, d: rt.runner.worker_lost(d))
            # Celery requeues the message without a word to Flower; say that it is retried.
            self.send_event("task-retried", exception=saferepr(exc), traceback="")
        elif isinstance(exc, Terminated):
            # Cancelled with terminate=True: give up the lease (publishing a waiting retry).
            self._record(lambda rt, d: rt.runner.terminated(d))
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def _record(self, fn: Any) -> None:
        try:
            d = delivery_of(self.name, self, self.args, self.kwargs)
            fn(runtime_of(self.task.app), d)
        except Exception:  # noqa: BLE001 - never break the worker's main process
            logger.exception("could not record the fate of task %s", self.id)


class ExecutorTask(Task):  # type: ignore[type-arg]
    """Base of every celery_ext task type; ``name`` is the task type."""

    Request = ExtRequest  # type: ignore[assignment]
    typing = False
    ignore_result = False  # the result backend reads the record: storing costs nothing
    acks_late = True
    reject_on_worker_lost = True
    max_retries = None  # celery_ext counts attempts against the record's max_retries
    # No ``throws``: a final failure is Celery's unexpected error, logged with its traceback (the
    # executor's exception is its cause) and reported by error trackers, which skip whatever a
    # task lists in ``throws`` (Sentry's Celery integration does).

    def run(self, *args: Any, **kwargs: Any) -> Any:
        rt = runtime_of(self.app)
        request = self.request
        if request.called_directly:
            return self._call_directly(rt, args, kwargs)
        supported = rt.worker.supported_types
        if supported is not None and self.name not in supported:
            self._forward(rt, request, args, kwargs)
        try:
            delivery = delivery_of(self.name, request, args, kwargs)
        except MalformedMessageError as exc:
            # Rejected, not requeued: a malformed message can never succeed.
            logger.error("malformed message %s for %s rejected: %s", request.id, self.name, exc)
            rt.metrics.message_rejected(self.name, "malformed")
            raise Reject(str(exc), requeue=False) from exc
        try:
            outcome = rt.runner.run(delivery, request.hostname or "unknown")
        except StorageError as exc:
            # Storage is away before the task could be claimed: put the message back for later.
            logger.warning("task %s postponed: %s", delivery.task_id, exc)
            headers: Any = delivery.header.to_header() if delivery.header else None
            # At least a second: while storage is away, a shorter wait only spins (receive, fail
            # the claim, publish again) several times a second per waiting task.
            wait = max(1.0, rt.config.worker.retry_backoff_max / 10)
            raise self.retry(countdown=wait, exc=exc, headers=headers) from exc
        return self._celery_outcome(rt, delivery, outcome)

    def _call_directly(self, rt: Runtime, args: Any, kwargs: Any) -> Any:
        """``task(*args, **kwargs)``: Celery runs the function in the caller, and so does this,
        with the executor (a failure raises ``TaskFailed``).  Nothing is published or recorded."""
        result = rt.runner.call(self.name, list(args), dict(kwargs))
        if result.success:
            return result.data
        error = result.error or TaskErrorInfo("exception", "failed without an error")
        raise TaskFailed.of(error.reason, error.message) from result.cause

    def _forward(self, rt: Runtime, request: Any, args: Any, kwargs: Any) -> None:
        """A message from Celery's default queue of a type this worker does not run
        (``worker.supported_types``): hand it, unchanged, to the type's shared queue."""
        queue = queue_name(rt.config.app.name, self.name)
        header = getattr(request, HEADER, None)
        logger.info("task %s[%s] is not run here; handed to queue %s", self.name, request.id, queue)
        self.signature_from_request(
            request, args, kwargs, queue=queue, **({"headers": {HEADER: header}} if header else {})
        ).apply_async()
        raise Ignore(f"handed to {queue}")

    def _celery_outcome(self, rt: Runtime, d: Delivery, outcome: Outcome) -> Any:
        if outcome.kind == "succeeded":
            return outcome.data
        error = outcome.error
        if outcome.kind in ("failed", "revoked") and outcome.task is not None:
            # The rest of its chain will never run: its waiting records fail (parent_failed).
            why = f"failed ({error.reason})" if outcome.kind == "failed" and error else "was cancelled"
            rt.lifecycle.fail_waiting(chain_ids(self.request.chain), outcome.task, why)
        if outcome.kind == "failed" and error is not None:
            raise TaskFailed.of(error.reason, error.message) from outcome.cause
        if outcome.kind == "retry" and error is not None and outcome.task is not None and outcome.held:
            # Celery's RETRY (state, task-retried event, message acked) without the ETA message
            # Task.retry would publish: the next attempt waits in storage (RETRYING with run_at)
            # and the scheduler's leader publishes it when due.
            raise Retry(
                exc=TaskFailed.of(error.reason, error.message), when=utcnow() + timedelta(seconds=outcome.delay)
            ) from outcome.cause
        if outcome.kind == "retry" and error is not None and outcome.task is not None:
            t = outcome.task
            header = ExtHeader(outcome.token or "", t.attempt + 1, t.run, t.max_retries, utcnow(), t.idempotency_key)
            headers: Any = header.to_header()
            raise self.retry(
                exc=TaskFailed.of(error.reason, error.message),
                countdown=outcome.delay,
                headers=headers,
                queue=queue_name(rt.config.app.name, self.name),
                throw=False,  # raised here, with the executor's exception as its cause
            ) from outcome.cause
        if outcome.kind == "revoked":
            self.send_event("task-revoked", terminated=False, signum=None, expired=False)
        raise Ignore(outcome.why)


def register_task_types(app: Celery, task_types: list[str]) -> None:
    for name in task_types:
        if name in app.tasks:
            continue
        cls = type(f"ExecutorTask[{name}]", (ExecutorTask,), {"name": name, "__module__": __name__})
        app.register_task(cls())
