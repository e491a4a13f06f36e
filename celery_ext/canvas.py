"""Celery canvas through ``TaskManager``: groups, chains and chords of recorded tasks.

Every step gets its record before anything is published (the outbox order of ``submit``; the
steps published now written QUEUED on a Redis broker, as a submit's record, and put back to
PENDING if the publish fails):

- a group's members are ordinary tasks sharing a ``group_id``;
- a chain's first step is published now; each later step waits ``scheduled`` (``run_at`` empty:
  it is due when its previous step succeeds) and is published by the worker that finishes the
  previous step, as Celery does, given that step's result as its first positional argument;
- a chord's header members share a ``group_id`` and its body waits ``scheduled`` until Celery's
  ``chord_unlock`` publishes it with the list of the members' results.

When a step ends failed or cancelled, the steps waiting for it end ``failed`` with reason
``parent_failed`` without running.  Each message carries the celery_ext header with the step's
dispatch token, so the steps are claimed like any celery_ext task.  Delays and idempotency keys
apply to whole tasks only: they are refused inside a chain or a chord.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from celery import chain, chord
from celery.canvas import Signature

from celery_ext.dispatch import Dispatch
from celery_ext.errors import PublishError
from celery_ext.lifecycle import publish_time
from celery_ext.model import Task, TaskStatus, new_id, utcnow

if TYPE_CHECKING:
    from celery_ext.manager import TaskManager

NOT_IN_CANVAS = frozenset({"delay", "run_at", "idempotency_key"})
#: A later step: it waits in storage until its previous step publishes it (not queued yet).
WAITING: dict[str, Any] = {"status": TaskStatus.SCHEDULED, "queued_at": None}


def submit_group(manager: TaskManager, specs: Iterable[Mapping[str, Any]]) -> list[Task]:
    group_id = new_id()
    built = [(t.replace(group_id=group_id), c) for t, c in manager.build_specs(specs)]
    return manager.submit_built(built)


def submit_chain(manager: TaskManager, specs: Iterable[Mapping[str, Any]]) -> list[Task]:
    built = [t for t, _ in manager.build_specs(specs, forbid=NOT_IN_CANVAS)]
    if not built:
        return []
    root = built[0].task_id
    steps = [built[0].replace(root_id=root)]
    for t in built[1:]:
        steps.append(t.replace(root_id=root, parent_id=steps[-1].task_id, **WAITING))
    now = _record(manager, steps)
    first = steps[:1]
    sigs = [signature(manager, t, publish_time(t, now) if i == 0 else None) for i, t in enumerate(steps)]
    _apply(manager, chain(*sigs), first)
    return manager.lifecycle.mark_queued(first, now) + steps[1:]


def submit_chord(manager: TaskManager, header: Iterable[Mapping[str, Any]], body: Mapping[str, Any]) -> list[Task]:
    group_id = new_id()
    members = [t.replace(group_id=group_id) for t, _ in manager.build_specs(header, forbid=NOT_IN_CANVAS)]
    if not members:
        raise ValueError("a chord needs at least one header task")
    ((callback, _),) = manager.build_specs([body], forbid=NOT_IN_CANVAS)
    callback = callback.replace(**WAITING)
    now = _record(manager, [*members, callback])
    sigs = [signature(manager, t, publish_time(t, now)) for t in members]
    _apply(manager, chord(sigs, signature(manager, callback, None)), members, group_id=group_id)
    return [*manager.lifecycle.mark_queued(members, now), callback]


def signature(manager: TaskManager, task: Task, queued_at: datetime | None) -> Signature:
    """The Celery signature of a recorded task, with its celery_ext header."""
    options = manager.dispatcher.options(Dispatch(task, task.dispatch_token or "", 1, queued_at=queued_at))
    args, kwargs = options.pop("args"), options.pop("kwargs")
    return manager.dispatcher.app.signature(task.task_type, args=args, kwargs=kwargs, options=options)


def _record(manager: TaskManager, tasks: Sequence[Task]) -> datetime:
    manager.ensure_schema()
    manager.storage.tasks.create_many(tasks)  # fresh ids, no idempotency keys: all are new
    manager.lifecycle.created(tasks)
    return utcnow()


def _apply(manager: TaskManager, canvas: Signature, published: Sequence[Task], **options: Any) -> None:
    try:
        canvas.apply_async(**options)
    except Exception as exc:
        manager.lifecycle.publish_failed(published)  # back to PENDING: the outbox publishes them
        raise PublishError(published[0].task_id, exc) from exc
