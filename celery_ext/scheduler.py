"""The scheduler: ``celery -A celery_ext scheduler``.  Several may run; one leads at a time.

Leadership is a lease in Redis (``<app>.scheduler.leader``, ``scheduler.leader_lease`` long),
taken with ``SET NX`` and renewed by its holder on every tick; each new leader gets a fencing
token from a counter that only grows, even across a Redis restart that lost it (it is never below
the server's clock in milliseconds).  If the leader dies, another takes over once the lease
runs out.  Every action below is a conditional update on the task record (expected status and
dispatch token), so a deposed leader that acts late can not run a task twice.

Each tick (``scheduler.interval``), the leader records its token in storage as the newest
(``storage.fences``), then makes every write below carrying it: storage refuses a write whose
token is older than the stored one, so a leader that was paused past its lease (GC, SIGSTOP) and
resumes mid-round has its late writes refused, and stops.

Each tick, the leader:
  - sweeps the worker registry for workers that stopped heartbeating (``worker_offline``) and
    moves the messages stranded in their direct queues back to the shared queues;
  - re-dispatches RUNNING tasks whose lease expired, their worker gone (a new attempt, or
    ``dead`` past the attempt cap);
  - publishes the delayed work that waits in storage (SCHEDULED tasks and RETRYING ones waiting
    out a backoff) once due, ``scheduler.max_countdown`` ahead with the rest as a countdown: in
    batches of ``scheduler.due_batch``, each taken on the ``run_at`` index and moved on by one
    statement (PostgreSQL; a query and a conditional update elsewhere), QUEUED at once on a
    Redis broker (else PENDING, marked queued after), and published as one producer batch, the
    database work beside the publish (``_due``);
  - publishes PENDING records older than ``scheduler.publish_grace``: the producer wrote the
    record and died (RabbitMQ) or lost the broker before its publish, the outbox case;
  - publishes again, under fresh tokens, the records whose messages a broker that lost its data
    held (an epoch marker key in the broker tells);
  - publishes again, under fresh tokens, QUEUED records older than ``scheduler.lost_after``
    whose message is in none of the queues it may wait in, nor fetched by a worker (a queue
    purged on its own, or a producer that died between its insert and its publish, the record
    written QUEUED; Redis brokers only: ``routing/presence.py``);
  - fires the periodic schedules that are due (``celery_ext.schedules``; config.yaml's are
    synced into storage when it takes the lead), each fire a task with the idempotency key
    ``schedule:<name>:<fire time>``;
  - applies ``storage.retention`` every ``scheduler.retention_interval``.
Without a Redis registry (a RabbitMQ broker and no ``scheduler.registry_url``) there is nothing
to elect with: the scheduler then leads alone and says so.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import redis

from celery_ext.config import Config
from celery_ext.dispatch import Dispatch, plain_queues, queue_name
from celery_ext.model import Task, TaskStatus, new_id, utcnow
from celery_ext.recovery import recover_expired_leases, recover_offline_workers
from celery_ext.routing.presence import present, unacked_key
from celery_ext.routing.stranded import queue_keys
from celery_ext.runtime import Runtime
from celery_ext.schedules import fire_due, resubmit_last, sync_config_schedules
from celery_ext.storage import retention
from celery_ext.storage.base import Fence
from celery_ext.transport import is_redis_url, redis_py_url

logger = logging.getLogger("celery_ext.scheduler")


def scheduler_in_worker(config: Config) -> bool:
    """``scheduler.in_worker``: "auto" runs one on the embedded default (no ``broker.url``)."""
    wanted = config.scheduler.in_worker
    return config.scheduler.enabled and (not config.broker.url if wanted == "auto" else bool(wanted))


# KEYS: lease, fence counter  ARGV: holder, ttl ms  ->  the fencing token, or 0 if another holds it
_TAKE_OR_RENEW = """
local held = redis.call('GET', KEYS[1])
if held then
  local sep = string.find(held, '|', 1, true)
  if string.sub(held, 1, sep - 1) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(string.sub(held, sep + 1))
  end
  return 0
end
local fence = redis.call('INCR', KEYS[2])
-- Never below the server's clock in milliseconds: a Redis that lost its data (restart without
-- persistence) restarts the counter at 1, and the fence must still only grow.
local now = redis.call('TIME')
local floor = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if fence < floor then
  fence = floor
  redis.call('SET', KEYS[2], fence)
end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. fence, 'PX', ARGV[2])
return fence
"""

# KEYS: lease  ARGV: holder  ->  1 if it was ours and is gone
_RELEASE = """
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, string.find(held, '|', 1, true) - 1) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LeaderLease:
    """One holder's view of the leader lease in Redis."""

    def __init__(self, client: Any, prefix: str, ttl: float, holder: str) -> None:
        if "|" in holder:
            raise ValueError(f"holder id must not contain '|' (got {holder!r})")
        self.client = client
        self.key, self.fence_key = f"{prefix}.scheduler.leader", f"{prefix}.scheduler.fence"
        self.ttl_ms = max(1, int(ttl * 1000))
        self.holder = holder
        self._take = client.register_script(_TAKE_OR_RENEW)
        self._release = client.register_script(_RELEASE)

    def acquire(self) -> int:
        """Take the lease or renew ours; the fencing token while we lead, else 0."""
        return int(self._take(keys=[self.key, self.fence_key], args=[self.holder, self.ttl_ms]))

    def release(self) -> bool:
        return bool(self._release(keys=[self.key], args=[self.holder]))

    def leader(self) -> str | None:
        """Who holds the lease now (``holder|fence``), if anyone."""
        held = self.client.get(self.key)
        return held.decode() if isinstance(held, bytes) else held


#: Batches of due records one round publishes at most (``scheduler.due_batch`` each).
MAX_DUE_BATCHES = 20


class Deposed(Exception):
    """Storage refused this leader's write: a newer leader recorded a newer fencing token."""

    def __init__(self, fence: int, newest: int) -> None:
        super().__init__(f"a newer leader holds fencing token {newest} (this one has {fence}): its writes are refused")
        self.fence, self.newest = fence, newest


@dataclass
class TickReport:
    leader: bool
    fence: int = 0
    offline_workers: list[str] = field(default_factory=list)
    moved_messages: int = 0
    recovered: list[str] = field(default_factory=list)
    due: list[str] = field(default_factory=list)
    fired: list[dict[str, Any]] = field(default_factory=list)
    published: list[str] = field(default_factory=list)
    republished: list[str] = field(default_factory=list)
    purged: dict[str, Any] | None = None
    errors: list[str] = field(default_factory=list)


class Scheduler:
    def __init__(self, rt: Runtime, *, holder: str | None = None) -> None:
        self.rt = rt
        self.config = rt.config.scheduler
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{new_id()[:8]}"
        registry = rt.registry
        self.lease = (
            LeaderLease(registry.client, rt.config.app.name, self.config.leader_lease, self.holder)
            if registry is not None
            else None
        )
        if self.lease is None:
            logger.warning("no Redis worker registry: this scheduler leads alone (run only one)")
        self.fence = 0
        self.fence_name = f"scheduler:{rt.config.app.name}"[:64]
        self.refused = 0  # rounds cut short because storage refused a write as deposed
        self._synced_fence = 0  # the fence under which config schedules were last synced
        self._last_purge: float | None = None
        self._lost_before: datetime | None = None
        # Called after each round with its report (the scheduler command announces itself there).
        self.after_tick: Callable[[TickReport], None] | None = None
        self._missing: dict[str, str | None] = {}  # task id -> token, missing at the last check
        self._last_presence: float | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        broker = str(rt.celery.conf.broker_url)
        self._broker: Any = redis.Redis.from_url(redis_py_url(broker)) if is_redis_url(broker) else None

    def tick(self) -> TickReport:
        """One round: renew or take the lease; as leader, do every duty once."""
        fence = self._elect()
        report = TickReport(leader=fence > 0, fence=fence)
        if not report.leader:
            return report
        for name, duty in (
            ("fence", self._record_fence),
            ("offline workers", self._offline),
            ("expired leases", self._leases),
            # First: on a broker that lost its data, what this round publishes is not lost.
            ("lost messages", self._lost_messages),
            ("purged queues", self._purged),
            ("due tasks", self._due),
            ("unpublished tasks", self._unpublished),
            ("schedules", self._schedules),
            ("retention", self._retention),
        ):
            try:
                duty(report)
            except Deposed as exc:
                # Paused past the lease while another took over: stop at once, lead no more.
                logger.warning("scheduler %s: %s failed: %s", self.holder, name, exc)
                report.errors.append(f"{name}: deposed: {exc}")
                report.leader = False
                self._deposed(exc)
                break
            except Exception as exc:  # noqa: BLE001 - one failing duty (a server away) must not stop the others
                logger.warning("scheduler: %s failed: %s: %s", name, exc.__class__.__name__, exc)
                report.errors.append(f"{name}: {exc.__class__.__name__}: {exc}")
        return report

    @property
    def fenced(self) -> Fence:
        """This leader's fence, for the writes only a leader may make."""
        return Fence(self.fence_name, self.fence)

    def check_fence(self) -> None:
        """Raise ``Deposed`` if storage holds a newer fencing token than ours (after a write was
        refused, to tell that from a record that merely moved on)."""
        newest = self.rt.storage.fences.current(self.fence_name)
        if newest > self.fence:
            raise Deposed(self.fence, newest)

    def _deposed(self, exc: Deposed) -> None:
        self.refused += 1
        self.fence = 0
        logger.warning("scheduler %s is no longer the leader (deposed)", self.holder)
        self.rt.observer.leader_changed(self.holder, False, fence=exc.fence)

    def run(self, stop: threading.Event) -> None:
        """Tick every ``scheduler.interval`` until ``stop`` is set; then give the lease up."""
        logger.info(
            "scheduler %s started (interval %ss, lease %ss)",
            self.holder,
            self.config.interval,
            self.config.leader_lease,
        )
        try:
            while not stop.is_set():
                started = time.monotonic()
                report = self.tick()
                if self.after_tick is not None:
                    try:
                        self.after_tick(report)
                    except Exception as exc:  # noqa: BLE001 - a report must not stop the scheduler
                        logger.warning("scheduler: after-round hook failed: %s: %s", exc.__class__.__name__, exc)
                stop.wait(max(0.0, self.config.interval - (time.monotonic() - started)))
        finally:
            self.close()
            if self.lease is not None and self.fence:
                try:
                    self.lease.release()
                except Exception as exc:  # noqa: BLE001 - it runs out by itself
                    logger.warning("scheduler: could not release the lease: %s", exc)
            logger.info("scheduler %s stopped", self.holder)

    # --- duties ---------------------------------------------------------------------------

    def _elect(self) -> int:
        if self.lease is None:
            fence = 1
        else:
            try:
                fence = self.lease.acquire()
            except Exception as exc:  # noqa: BLE001 - Redis away: nobody can be sure to lead
                logger.warning("scheduler: leader lease unavailable, standing by: %s", exc)
                fence = 0
        if bool(fence) != bool(self.fence):
            if fence:
                logger.warning("scheduler %s is the leader (fencing token %d)", self.holder, fence)
            else:
                logger.warning("scheduler %s is no longer the leader", self.holder)
            # The scheduler_leader_changed event and the election metric.
            self.rt.observer.leader_changed(self.holder, bool(fence), fence=fence)
        self.fence = fence
        return fence

    def _record_fence(self, report: TickReport) -> None:
        newest = self.rt.storage.fences.advance(self.fenced)
        if newest > self.fence:
            raise Deposed(self.fence, newest)

    def _offline(self, report: TickReport) -> None:
        for worker, moved in recover_offline_workers(self.rt):
            report.offline_workers.append(worker.id)
            report.moved_messages += moved

    def _leases(self, report: TickReport) -> None:
        report.recovered = recover_expired_leases(self.rt, fence=self.fenced, check=self.check_fence)

    def _due(self, report: TickReport) -> None:
        """Publish the records waiting in storage whose ``run_at`` has come (within
        ``max_countdown``, the rest as a countdown), batch by batch, at most ``MAX_DUE_BATCHES``
        a round so that the other duties are not starved.

        The database's part runs on a thread of its own (``_storage_thread``), beside the
        publish: while a batch is published, the next one is taken (``Lifecycle.due``: one
        statement on PostgreSQL, which on a Redis broker moves them QUEUED at once), and after
        it, on another broker, the batch's mark queued is written while the next one is
        published.  A publish that fails puts its batch, and the next one already
        taken, back where they waited (``undue``); the round waits for its marks before it ends."""
        ahead = timedelta(seconds=self.config.max_countdown)
        size = self.config.due_batch
        lifecycle, dispatcher = self.rt.lifecycle, self.rt.dispatcher
        pool = self._storage_thread()

        def take() -> tuple[datetime, list[tuple[Task, TaskStatus]]]:
            now = utcnow()
            return now, lifecycle.due(now + ahead, size, fence=self.fenced, now=now)[1]

        ahead_taken: Future[tuple[datetime, list[tuple[Task, TaskStatus]]]] | None = pool.submit(take)
        marks: list[Future[int]] = []
        try:
            for i in range(MAX_DUE_BATCHES):
                assert ahead_taken is not None
                this, ahead_taken = ahead_taken, None  # a take that failed is not put back
                queued_at, taken = this.result()
                if not taken:
                    self.check_fence()  # nothing due, or none ours: refused as deposed?
                    return
                if len(taken) == size and i + 1 < MAX_DUE_BATCHES:
                    ahead_taken = pool.submit(take)  # taken while this batch is published
                moved = [t for t, _ in taken]
                now = utcnow()
                dispatches = [
                    Dispatch(t, t.dispatch_token or "", t.attempt + 1, _until(t.run_at, now), queued_at) for t in moved
                ]
                try:
                    dispatcher.publish_many(dispatches)
                except Exception:
                    lifecycle.undue(taken)
                    raise
                pending = [t.task_id for t in moved if t.status is TaskStatus.PENDING]  # not taken QUEUED
                if pending:
                    marks.append(pool.submit(lifecycle.write_queued, pending, queued_at))
                lifecycle.announce_queued(moved, queued_at)
                self._due_lag(moved, now)
                report.due.extend(t.task_id for t in moved)
                if ahead_taken is None:
                    return
        finally:
            self._settle(ahead_taken, marks)

    def _settle(
        self, taken: Future[tuple[datetime, list[tuple[Task, TaskStatus]]]] | None, marks: list[Future[int]]
    ) -> None:
        """The end of ``_due``'s round: a batch taken but not published (the publish failed) is
        put back, and the marks queued are waited for.  Either failing is only logged: a record
        left PENDING is claimed from there by its worker, or published again by the outbox duty
        (``_unpublished``) if it never was; one left QUEUED without a message (taken QUEUED on a
        Redis broker, its put-back failed) is published again by ``_purged`` after ``lost_after``."""
        try:
            if taken is not None:
                self.rt.lifecycle.undue(taken.result()[1])
        except Exception as exc:  # noqa: BLE001 - see above
            logger.warning("scheduler: could not put back a due batch: %s: %s", exc.__class__.__name__, exc)
        for mark in marks:
            try:
                mark.result()
            except Exception as exc:  # noqa: BLE001 - see above
                logger.warning("scheduler: could not mark a due batch queued: %s: %s", exc.__class__.__name__, exc)

    def _storage_thread(self) -> ThreadPoolExecutor:
        """The one thread ``_due`` runs its storage writes on, in order (made in the process
        that leads: the scheduler may run in a worker that forks)."""
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="scheduler-storage")
            self._pool_pid = os.getpid()
        return self._pool

    def close(self) -> None:
        """Stop the storage thread (``run`` does it when it stops)."""
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.shutdown(wait=True)
        self._pool = None

    def _schedules(self, report: TickReport) -> None:
        """Fire the periodic schedules that are due (``celery_ext.schedules``).  On taking the
        lead, first bring config.yaml's schedules into storage and submit a last fire a previous
        leader recorded but did not submit (same idempotency key: never twice)."""
        storage, manager = self.rt.storage, self.rt.manager
        fired = []
        if self._synced_fence != self.fence:
            sync = sync_config_schedules(storage, self.rt.config)
            if sync.saved or sync.removed:
                logger.info("schedules from config: saved %s, removed %s", sync.saved, sync.removed)
            fired += resubmit_last(storage, manager, self.fenced)
            self._synced_fence = self.fence
        fired += fire_due(storage, manager, self.fenced, utcnow())
        for f in fired:
            logger.info("schedule %s fired for %s: task %s", f.schedule, f.fire_at.isoformat(), f.task_id)
            report.fired.append(f.to_dict())
            self.rt.observer.schedule_fired(f)
            if f.error is not None:
                self._synced_fence = 0  # resubmit on the next round
        self.check_fence()  # an advance refused as deposed looks like one another leader made

    def _due_lag(self, tasks: list[Any], now: datetime) -> None:
        self.rt.observer.due_published([(now - t.run_at).total_seconds() for t in tasks if t.run_at is not None])

    def _unpublished(self, report: TickReport) -> None:
        """The outbox case: a PENDING record nobody published.  A fresh dispatch token first, so
        that a message of the first publish, if it exists after all, is dropped as stale."""
        now = utcnow()
        cutoff = now - timedelta(seconds=self.config.publish_grace)
        for task in self.rt.storage.tasks.scan((TaskStatus.PENDING,), updated_before=cutoff, limit=100):
            if task.lease_until is not None and task.lease_until > now:
                continue  # a manual retry waiting for a cancelled run to end (lifecycle.reopen)
            token = self.rt.lifecycle.fresh_token(task, fence=self.fenced)
            if token is None:
                self.check_fence()
                continue  # published, started or cancelled meanwhile
            self.rt.manager.publish_pending(task.replace(dispatch_token=token))
            report.published.append(task.task_id)
        if report.published:
            logger.warning("published %d task(s) whose producer never did", len(report.published))

    def _lost_messages(self, report: TickReport) -> None:
        """Queued work survives the broker losing its data.  A marker key lives in the broker
        (``<app>.broker.epoch``); when it is gone, the broker is new or lost its data (a restart
        without persistence, a flush), and every record whose message was waiting there
        (queued, retrying, scheduled with a time) is published again under a fresh dispatch
        token: a message that survived after all is then dropped as stale."""
        if self._broker is None:
            return
        now = utcnow()
        if self._broker.set(f"{self.rt.config.app.name}.broker.epoch", f"{self.holder}|{now.isoformat()}", nx=True):
            self._lost_before = now
            logger.warning(
                "the broker has no epoch marker (new, or it lost its data): publishing again every "
                "record whose message was waiting there"
            )
        if self._lost_before is None:
            return
        # Messages were waiting for QUEUED records and for retries published with a countdown
        # (RETRYING without run_at); the rest of the delayed work waits in storage, not the broker.
        done = True
        for status in (TaskStatus.QUEUED, TaskStatus.RETRYING):
            batch = self.rt.storage.tasks.scan((status,), updated_before=self._lost_before, limit=500)
            done = done and len(batch) < 500
            batch = [t for t in batch if not (status is TaskStatus.RETRYING and t.run_at is not None)]
            kept = self._held_by_workers([t.task_id for t in batch])
            for task in batch:
                if task.task_id not in kept:
                    self._republish(task, now, report)
        if done:
            self._lost_before = None
        if report.republished:
            logger.warning("published again %d task(s) whose message the broker lost", len(report.republished))

    def _held_by_workers(self, task_ids: list[str]) -> set[str]:
        """Which of ``task_ids`` a worker holds after all, though the epoch marker is gone: the
        marker may be missing only because no scheduler ran yet on this broker, and a record may
        show QUEUED while its run goes on (a crash of the database undid the claim, which is
        committed without waiting for the disk).  Such a message is in kombu's unacked hash, and
        while storage was away the worker held the task in the registry: publishing it again
        would run it twice."""
        if not task_ids or self._broker is None:
            return set()
        options = self.rt.celery.conf.broker_transport_options
        fetched = present(self._broker, [], unacked_key(options), self.config.lost_scan_limit) or set()
        registry = self.rt.registry
        held = registry.held(task_ids) if registry is not None else set()
        return (fetched & set(task_ids)) | held

    def _purged(self, report: TickReport) -> None:
        """A queue purged on its own keeps the epoch marker: QUEUED records older than
        ``lost_after`` (the oldest ``lost_batch``) whose message is in none of the queues it may
        wait in, nor in kombu's unacked hash, are published again under a fresh token.  Checked
        every ``lost_after / 10`` (at least every round), and a task must be missing at two
        checks in a row, with the same token, so that a message between two lists is not taken
        for lost.  A wrong verdict costs a second message, never a second run: the first one
        carries the old token and is dropped as stale."""
        if self._broker is None:
            return  # RabbitMQ: no cheap way to look into a queue (docs/scheduler.md)
        started = time.monotonic()
        every = max(self.config.interval, self.config.lost_after / 10)
        if self._last_presence is not None and started - self._last_presence < every:
            return
        self._last_presence = started
        now = utcnow()
        cutoff = now - timedelta(seconds=self.config.lost_after)
        old = self.rt.storage.tasks.scan((TaskStatus.QUEUED,), updated_before=cutoff, limit=self.config.lost_batch)
        if not old:
            self._missing = {}
            return
        options = self.rt.celery.conf.broker_transport_options
        queues = {queue_name(self.rt.config.app.name, t.task_type) for t in old}
        queues.update(plain_queues(self.rt.config))
        registry = self.rt.registry
        if registry is not None:
            queues.update(w.queue for w in registry.all() if w.queue)
        lists = [key for q in sorted(queues) for key in queue_keys(q, options)]
        seen = present(self._broker, lists, unacked_key(options), self.config.lost_scan_limit)
        if seen is None:
            logger.warning(
                "purged queues: more than %d messages wait in this app's queues; not checked this round",
                self.config.lost_scan_limit,
            )
            return
        missing = {t.task_id: t.dispatch_token for t in old if t.task_id not in seen}
        confirmed = [t for t in old if t.task_id in missing and self._missing.get(t.task_id) == t.dispatch_token]
        self._missing = missing
        for task in confirmed:
            if self._republish(task, now, report):
                self._missing.pop(task.task_id, None)
        if confirmed:
            logger.warning(
                "published again %d queued task(s) whose message is in no queue (a purged queue?)", len(confirmed)
            )

    def _republish(self, task: Any, now: datetime, report: TickReport) -> bool:
        """Publish ``task`` again under a fresh dispatch token (a copy of its old message, if one
        exists after all, is then stale); False if the record moved on meanwhile."""
        token = self.rt.lifecycle.fresh_token(task, fence=self.fenced)
        if token is None:
            self.check_fence()
            return False
        wait = (task.run_at - now).total_seconds() if task.run_at else 0.0
        self.rt.runner.publish(
            task.replace(dispatch_token=token), attempt=task.attempt + 1, countdown=wait if wait > 0 else None
        )
        report.republished.append(task.task_id)
        return True

    def _retention(self, report: TickReport) -> None:
        policy = self.rt.config.storage.retention
        if not retention.cutoffs(policy):
            return
        now = time.monotonic()
        if self._last_purge is not None and now - self._last_purge < self.config.retention_interval:
            return
        self._last_purge = now
        report.purged = retention.purge(self.rt.storage, policy, max_batches=10).to_dict()


def _until(when: datetime | None, now: datetime) -> float | None:
    wait = (when - now).total_seconds() if when is not None else 0.0
    return wait if wait > 0 else None
