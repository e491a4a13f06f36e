"""Leases that mean something: the worker's main process renews the lease of every task it runs.

A claim gives the record ``lease_until = now + worker.task_lease``.  While the task runs, the main
process of its worker renews that lease every third of ``task_lease``, by a conditional update on
status RUNNING and the run's dispatch token.  So a lease expires only when the worker that holds it
stops renewing: it died, or its main process stalled for longer than ``task_lease``; the
scheduler's recovery then re-dispatches the task under a new token, whatever the name of any
worker online at the time (a worker restarted under the same name does not shield the tasks of
its previous incarnation).

A run whose renewal finds that its record moved on under another token (it was recovered while
this worker stalled) has been superseded: its pool process is terminated, so that it stops
instead of running beside the new attempt.  The window that remains is the time between the
recovery and the resumed main process's next renewal, at most a third of ``task_lease``.  (A run
cancelled without ``terminate`` keeps its token and goes on, as cancel promises.)

While storage is away, nothing can be renewed there: each renewal round then holds the running
tasks in the worker registry instead (``WorkerRegistry.hold``, for ``task_lease``), and a run
that ends keeps its outcome in its process's spool, held the same way (``storage/spool.py``).
Recovery leaves held tasks be, so a storage outage longer than ``task_lease`` does not make it
re-run the tasks of live workers when storage returns; a worker that dies stops renewing its
holds, and recovery takes its tasks once they run out.  Without a Redis registry there are no
holds: a late outcome is then refused if recovery re-dispatched the task first.

The token of a run: the message's celery_ext header holds it; a plain Celery message (recorded on
receipt) gets ``<incarnation>:<task id>``, where the incarnation names this worker process
(hostname, pid, start time), so a redelivery to a new incarnation is a new run.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from celery.worker import state

from celery_ext.errors import StorageError
from celery_ext.model import TaskStatus, utcnow
from celery_ext.runtime import Runtime
from celery_ext.task import ExecutorTask, delivery_of

logger = logging.getLogger("celery_ext.lease")


class LeaseKeeper:
    """The renewing thread of a worker's main process."""

    def __init__(self, rt: Runtime, pool: Any) -> None:
        self.rt = rt
        self.pool = pool
        self.lease = rt.config.worker.task_lease
        self.interval = self.lease / 3
        self.registry = rt.registry
        self._stop = threading.Event()
        # The runs (task id, start time) a renewal found RUNNING, with their token.
        self._seen_running: dict[tuple[str, float], str] = {}
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="celery_ext-lease", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.renew()
            except StorageError as exc:
                logger.warning("could not renew task leases (storage unavailable; %s): %s", self.hold_running(), exc)
            except Exception:  # noqa: BLE001 - the renewer must outlive any one failure
                logger.exception("lease renewal failed")

    def renew(self) -> int:
        """Renew the lease of every task this worker runs; returns how many were renewed."""
        renewed = 0
        until = utcnow() + timedelta(seconds=self.lease)
        active = list(state.active_requests)
        seen = self._seen_running
        for key in set(seen) - {(r.id, r.time_start) for r in active}:
            del seen[key]
        for request in active:
            if not isinstance(request.task, ExecutorTask) or not request.time_start:
                continue  # not ours, or not started in its pool process yet
            token = self.token_of(request)
            if token is None:
                continue
            key = (request.id, request.time_start)
            if self.rt.storage.tasks.update(request.id, (TaskStatus.RUNNING,), token=token, lease_until=until):
                seen[key] = token
                renewed += 1
            elif seen.get(key) == token and self._reclaimed(request, token, until):
                renewed += 1
            elif time.time() - request.time_start > self.interval:
                self._superseded(request, token)
        return renewed

    def _reclaimed(self, request: Any, token: str, until: datetime) -> bool:
        """The record of a run that goes on shows it not started, though an earlier renewal found
        it RUNNING under this run's token: a crash of the database undid its claim, which is
        committed without waiting for the disk (``Lifecycle.claim``).  Claim it again, so that
        the record tells the truth and nothing takes the task for waiting work (publishing it
        again would run it twice).  Only such a run: before its first renewal, a startable record
        may just be one its pool process has not claimed yet."""
        try:
            d = delivery_of(request.name, request, request.args, request.kwargs)
        except Exception:  # noqa: BLE001 - a malformed message never ran
            return False
        h = d.header
        if h is None:
            return False  # a plain message's receipt undone: its outcome makes the record again
        started = datetime.fromtimestamp(request.time_start, UTC)
        return self.rt.lifecycle.reclaim(
            request.id, token, h.attempt, h.run, request.hostname or "unknown", started, until
        )

    def hold_running(self) -> str:
        """Storage is away: hold the running tasks in the registry instead; says what it did."""
        if self.registry is None:
            return "no registry to hold them in"
        ids = [r.id for r in list(state.active_requests) if isinstance(r.task, ExecutorTask) and r.time_start]
        try:
            self.registry.hold(ids, self.lease)
        except Exception as exc:  # noqa: BLE001 - the registry may be away as well
            return f"could not hold them in the registry either: {exc}"
        return f"{len(ids)} held in the registry"

    def token_of(self, request: Any) -> str | None:
        try:
            return self.rt.runner.token_of(delivery_of(request.name, request, request.args, request.kwargs))
        except Exception:  # noqa: BLE001 - a malformed message never ran
            return None

    def _superseded(self, request: Any, token: str) -> None:
        record = self.rt.storage.tasks.get(request.id)
        if record is None or record.dispatch_token == token or record.status.terminal:
            return  # not claimed yet, cancelled and going on (same token), or already over
        logger.warning(
            "task %s[%s] was recovered under a new dispatch token while this worker stalled; "
            "stopping this run (its record is %s)",
            request.name,
            request.id,
            record.status,
        )
        request.terminate(self.pool, signal="SIGTERM")
