"""The Celery adapter: one Celery task per supported task type, running through ``TaskRunner``.

Flower sees each celery_ext task type under its own name.  ``ExtRequest`` runs in the worker's
main process and records what a pool child cannot: a hard time limit, or the child's death.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from billiard.exceptions import WorkerLostError
from celery import Celery, Task
from celery.exceptions import TimeLimitExceeded
from celery.worker.request import Request

from celery_ext.errors import StorageError
from celery_ext.runner import Delivery, MalformedMessageError

if TYPE_CHECKING:
    from celery_ext.factory import Runtime

logger = logging.getLogger("celery_ext.task")


def runtime_of(app: Celery) -> Runtime:
    return app.celery_ext  # type: ignore[attr-defined, no-any-return]


class ExtRequest(Request):  # type: ignore[misc]
    def on_timeout(self, soft: bool, timeout: float) -> None:
        if not soft:
            self._record(lambda rt, d: rt.runner.fail_running(
                d.task_id, d.token, "timeout", f"hard time limit of {timeout:g}s exceeded"))
        super().on_timeout(soft, timeout)

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        exc = getattr(exc_info.exception, "exc", exc_info.exception)  # unwrap ExceptionWithTraceback
        if isinstance(exc, WorkerLostError) and not isinstance(exc, TimeLimitExceeded):
            self._record(lambda rt, d: rt.runner.worker_lost(self.name, d))
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def _record(self, fn: Any) -> None:
        try:
            d = Delivery.parse(self.kwargs)
            fn(runtime_of(self.task.app), d)
        except Exception:  # noqa: BLE001 - never break the worker's main process
            logger.exception("could not record the fate of task %s", self.id)


class ExecutorTask(Task):  # type: ignore[misc,type-arg]
    """Base of every celery_ext task type; ``name`` is the task type."""

    Request = ExtRequest  # type: ignore[assignment]
    typing = False
    ignore_result = True
    acks_late = True
    reject_on_worker_lost = True
    max_retries = None

    def run(self, *args: Any, **kwargs: Any) -> Any:
        rt = runtime_of(self.app)
        try:
            if args:
                raise MalformedMessageError(f"positional arguments are not accepted (got {len(args)})")
            delivery = Delivery.parse(kwargs)
        except MalformedMessageError as exc:
            # Acknowledged and dropped: retrying a malformed message can never succeed.
            logger.error("malformed message %s for %s dropped: %s", self.request.id, self.name, exc)
            return None
        try:
            result = rt.runner.run(self.name, delivery, self.request.hostname or "unknown")
        except StorageError as exc:
            # Storage is away before the task could be claimed: put the message back for later.
            logger.warning("task %s postponed: %s", delivery.task_id, exc)
            raise self.retry(countdown=rt.config.worker.retry_backoff_max / 10 or 5, exc=exc) from exc
        return None if result is None else {"success": result.success}


def register_task_types(app: Celery, task_types: list[str]) -> None:
    for name in task_types:
        if name in app.tasks:
            continue
        cls = type(f"ExecutorTask[{name}]", (ExecutorTask,), {"name": name, "__module__": __name__})
        app.register_task(cls())
