"""Marks in time along one task's path, in every process it crosses, for ``bench_stages.py``.

``mark(label, task_id)`` notes ``time.time_ns()`` (one clock for every process of the machine) in
a list of this process's; ``flush()`` appends the list to the file named by ``BENCH_STAGES`` in one
write.
A worker started with ``-A bench.stages_ext`` or ``-A bench.stages_bare`` loads its app with the
marks below installed (nothing of celery_ext's or Celery's code is changed: receivers of Celery's
own signals, and wrappers of a few methods):

- both sides: ``received`` (the worker's main process has the message: ``task_received``),
  ``handoff sent`` / ``handoff done`` (the main process writes it to a pool process), ``trace
  sent`` (the pool process has it: Celery's tracer is called), ``prerun`` (the task starts),
  ``postrun`` (the pool process is done with it);
- celery_ext: ``claim sent`` / ``claim done`` and ``outcome sent`` / ``outcome done`` (the two
  statements of a run), ``execute sent`` / ``execute done`` (the executor), ``push sent`` /
  ``push done`` (the completion's PUBLISH written);
- celery_ext's producer (``install_producer``, in the process that submits): ``insert sent`` /
  ``insert done`` (the record's INSERT sent, its result read later) and ``publish sent`` /
  ``publish done`` (the message written, the insert sent while its reply was on its way);
- bare Celery: ``result sent`` / ``result done`` (the Redis result backend's store: SET and
  PUBLISH, one round trip).

Without ``BENCH_STAGES`` nothing is installed.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

PATH = os.environ.get("BENCH_STAGES", "")
_marks: list[tuple[int, str, str]] = []


def mark(label: str, task_id: str, at: int | None = None) -> None:
    _marks.append((time.time_ns() if at is None else at, task_id, label))


def flush() -> None:
    if not PATH or not _marks:
        return
    pid = os.getpid()
    lines = "".join(f"{ts} {pid} {task_id} {label}\n" for ts, task_id, label in _marks)
    _marks.clear()
    with open(PATH, "a") as f:
        f.write(lines)


def read(path: str) -> dict[str, dict[str, int]]:
    """Every task's marks in a run: task id -> label -> time_ns (a label's first mark)."""
    out: dict[str, dict[str, int]] = {}
    with open(path) as f:
        for line in f:
            ts, _pid, task_id, label = line.rstrip("\n").split(" ", 3)
            out.setdefault(task_id, {}).setdefault(label, int(ts))
    return out


def around(owner: Any, name: str, label: Callable[..., tuple[str, str] | None]) -> None:
    """Wrap ``owner.name`` with a mark before the call and one after it: ``label`` of the call's
    arguments gives the task id and the stage (marked "<stage> sent" and "<stage> done"), or
    None for a call not marked."""
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        named = label(*args, **kwargs)
        if named is not None:
            mark(f"{named[1]} sent", named[0])
        try:
            return fn(*args, **kwargs)
        finally:
            if named is not None:
                mark(f"{named[1]} done", named[0])

    setattr(owner, name, wrapper)


def install_signals() -> None:
    """Both sides: Celery's own signals (the main process flushes at once; a pool process after
    the task, so that no write to the file lies on the task's path)."""
    from celery import signals

    def received(request: Any = None, **_: Any) -> None:
        mark("received", request.id)
        flush()

    def prerun(task_id: str = "", **_: Any) -> None:
        mark("prerun", task_id)

    def postrun(task_id: str = "", **_: Any) -> None:
        mark("postrun", task_id)
        flush()

    from celery.concurrency.base import BasePool

    def handoff(_pool: Any, _target: Any, args: Any = None, *_: Any, **kwargs: Any) -> tuple[str, str] | None:
        task_id = kwargs.get("correlation_id")  # a task's handoff (Celery's request.py)
        return (task_id, "handoff") if isinstance(task_id, str) else None

    around(BasePool, "apply_async", handoff)  # bound by each worker's Request class at its start
    import celery.app.trace as trace_module
    import celery.worker.request as request_module

    for name in ("fast_trace_task", "trace_task_ret"):  # the pool's entry (bound the same way)
        around(trace_module, name, lambda _task, task_id, *_, **__: (task_id, "trace"))
        # The function goes to the pool pickled by its name: the same object in both modules.
        setattr(request_module, name, getattr(trace_module, name))
    signals.task_received.connect(received, weak=False)
    signals.task_prerun.connect(prerun, weak=False)
    signals.task_postrun.connect(postrun, weak=False)


def install_ext() -> None:
    from celery_ext.completion import Completion
    from celery_ext.model import TaskStatus
    from celery_ext.runner import TaskRunner
    from celery_ext.storage.sql import SqlTaskRepository

    def statement(_self: Any, task_id: str, _expected: Any, **fields: Any) -> tuple[str, str] | None:
        status = fields.get("status")
        if status is TaskStatus.RUNNING:
            return task_id, "claim"
        return (task_id, "outcome") if isinstance(status, TaskStatus) and status.terminal else None

    install_signals()
    around(SqlTaskRepository, "update", statement)
    around(TaskRunner, "_execute", lambda _self, task: (task.task_id, "execute"))
    around(Completion, "notify", lambda _self, task_id, final=None: (task_id, "push"))


def install_producer() -> None:
    """celery_ext's producer side (``submit``): the insert sent without waiting, the publish."""
    from celery_ext.dispatch import Dispatcher
    from celery_ext.storage.sql import SqlTaskRepository

    around(SqlTaskRepository, "create_sent", lambda _self, task: (task.task_id, "insert"))
    around(Dispatcher, "publish", lambda _self, d, **_: (d.task.task_id, "publish"))


def install_bare(app: Any) -> None:
    install_signals()
    around(type(app.backend), "store_result", lambda _self, task_id, *a, **k: (task_id, "result"))
