"""Recovering work from workers that died: stranded queues and expired leases.

``recover_offline_workers`` sweeps the worker registry for workers that stopped heartbeating
and moves the messages left in their direct queues back to the shared queues.
``recover_expired_leases`` re-dispatches RUNNING records whose lease expired (their worker was
killed outright or stalled, so nothing renewed the lease or recorded the loss): a new dispatch
token, RETRYING, and a publish, as the runner does for a failed attempt; past the attempt cap the
record becomes DEAD.  A stale message of the old attempt is then dropped by the token check.
The scheduler calls both on its interval; they are safe to call from several processes at once
(conditional updates, atomic sweeps).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from celery_ext.model import STARTABLE, TaskErrorInfo, TaskStatus, utcnow
from celery_ext.routing.stranded import move_stranded, restore_unclaimed
from celery_ext.routing.workers import WorkerInfo
from celery_ext.runtime import Runtime
from celery_ext.storage.base import Fence

logger = logging.getLogger("celery_ext.recovery")


def recover_offline_workers(rt: Runtime) -> list[tuple[WorkerInfo, int]]:
    """Sweep offline workers (firing ``worker_offline`` handlers) and hand back their queues;
    returns each worker found offline with the number of messages moved."""
    registry = rt.registry
    if registry is None:
        return []
    out = []
    options = rt.celery.conf.broker_transport_options
    for worker in registry.sweep_offline():
        moved = move_stranded(registry.client, worker.queue, rt.config.app.name, options, rt.executors.task_types)
        logger.warning("worker %s is offline; moved %d queued task(s) to the shared queues", worker.id, moved)
        out.append((worker, moved))
    if out:
        # What a dead worker fetched from a shared queue but never claimed waits in kombu's
        # unacked hash, not in its direct queue.
        live = {w.id for w in registry.online()}
        restore_unclaimed(
            registry.client,
            rt.config.app.name,
            options,
            # Not offline_threshold: the dead worker may have fetched its last message after its
            # last heartbeat, so at the sweep that message can be younger than the threshold, and
            # it would never be restored (this runs once per dead worker).  One heartbeat
            # interval still leaves be a live worker's message fetched a moment ago; an older
            # one it holds for a free slot comes back as a copy that the first claim wins.
            rt.config.worker.heartbeat_interval,
            lambda task_id: _unclaimed(rt, task_id, live),
        )
    return out


def _unclaimed(rt: Runtime, task_id: str, live: set[str]) -> bool:
    record = rt.storage.tasks.get(task_id)
    if record is None or record.status not in STARTABLE:
        return False
    # A plain message that a live worker holds for its eta (held.py): recorded, never started,
    # under that worker's name.  Its copy would only be held again elsewhere.
    return record.started_at is not None or record.worker_id not in live


def recover_expired_leases(
    rt: Runtime,
    *,
    now: datetime | None = None,
    limit: int = 100,
    fence: Fence | None = None,
    check: Callable[[], None] | None = None,
) -> list[str]:
    """Re-dispatch (or declare DEAD) RUNNING tasks whose lease expired; returns their ids.

    A running task's worker renews its lease (``lease.py``), so an expired lease means that worker
    process is gone or stalled, whatever worker is online under its name now.  A stalled one that
    resumes finds its run superseded and stops it.  A task a live worker holds in the registry
    (storage was away: its outcome waits in a spool, or its lease could not be renewed) is left
    be until the hold runs out.
    """
    now = now or utcnow()
    recovered = []
    expired = rt.storage.tasks.scan((TaskStatus.RUNNING,), lease_expired_before=now, limit=limit)
    registry = rt.registry
    held = registry.held([t.task_id for t in expired]) if registry is not None and expired else set()
    if held:
        logger.info("%d task(s) with an expired lease are held by a live worker (storage was away)", len(held))
    for task in expired:
        if task.task_id in held:
            continue
        error = TaskErrorInfo(
            "worker_lost", f"worker {task.worker_id} stopped renewing its lease during attempt {task.attempt}"
        )
        changed, token = rt.lifecycle.lost(task, error, 0.0, fence=fence)
        if token is not None:
            rt.runner.publish(task.replace(dispatch_token=token), attempt=task.attempt + 1)
        if changed:
            recovered.append(task.task_id)
        elif check is not None:
            check()  # refused: a newer leader (the caller's check raises), or it moved on
    if recovered:
        logger.warning("recovered %d task(s) whose worker was lost", len(recovered))
    return recovered
