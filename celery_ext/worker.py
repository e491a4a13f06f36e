"""The worker bootstep: prepares storage, log capture and executors in every worker process."""

from __future__ import annotations

import gc
import logging
import sys
import threading
from typing import Any

from celery import Celery, bootsteps
from celery.signals import task_unknown, worker_process_init, worker_process_shutdown

from celery_ext import tasklog
from celery_ext.dispatch import plain_queues, queue_name
from celery_ext.errors import StorageError
from celery_ext.held import HeldRecorder, install_held
from celery_ext.lease import LeaseKeeper
from celery_ext.message import new_incarnation
from celery_ext.model import Task, new_id
from celery_ext.plugins.host import install_plugin_host
from celery_ext.reload import ConfigWatchStep
from celery_ext.routing.heartbeat import install_routing
from celery_ext.runtime import Runtime, runtime_of
from celery_ext.scheduler import Scheduler, scheduler_in_worker

logger = logging.getLogger("celery_ext.worker")


def unbind_stale_plain_queues(rt: Runtime) -> int:
    """Remove the binding of ``worker.celery_queue`` ("celery") to this app's default exchange
    and key that workers before 2026-12-03 declared (a ``Queue`` without an exchange of its own):
    with it, every message for the app's default queue is also copied into "celery", which every
    app's workers on the broker consume.  Kept by the broker (Redis stores bindings), so it is
    removed here, once per worker start; returns how many bindings were removed."""
    own = queue_name(rt.config.app.name, "default")
    stale = [q for q in plain_queues(rt.config) if q != own]
    if not stale:
        return 0
    removed = 0
    try:
        with rt.celery.connection_for_write() as conn:
            channel: Any = conn.default_channel
            client = getattr(channel, "client", None)
            for queue in stale:
                if client is None:  # AMQP: the broker keeps the binding; unbinding is idempotent
                    channel.queue_unbind(queue, exchange=own, routing_key=own)
                    continue
                member = channel.sep.join([own, "", queue])
                removed += int(client.srem(channel.keyprefix_queue % own, member))
                permanent = getattr(channel, "keyprefix_binding_permanent", None)  # newer kombu only
                if permanent is not None:
                    client.srem(permanent % own, member)
    except Exception as exc:  # noqa: BLE001 - the worker runs without it; the copies are deduplicated
        logger.warning("could not remove the old binding of %s to %s: %s", stale, own, exc)
        return removed
    if removed:
        logger.warning("removed the old binding of %s to this app's default queue %s", stale, own)
    return removed


class CeleryExtStep(bootsteps.StartStopStep):
    """Prepares the worker before the pool forks, then starts and stops its services
    (``WorkerServices``).  This step is how celery_ext tells a worker from a client: it runs in
    ``celery worker`` only, so no process has to guess from its command line."""

    label = "celery_ext"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.services = WorkerServices(runtime_of(worker.app))
        self.services.prepare()  # the pool forks after every step's __init__

    def start(self, worker: Any) -> None:
        self.services.start(worker.pool)

    def stop(self, worker: Any) -> None:
        self.services.stop()


def warn_time_limits(pool: Any) -> None:
    """Celery's threads and solo pools apply no time limit: say so once, at start, since a task's
    timeout is then recorded but never enforced."""
    kind = {"celery.concurrency.thread": "threads", "celery.concurrency.solo": "solo"}.get(type(pool).__module__)
    if kind is not None:
        logger.warning(
            "the %s pool applies no time limits: a task runs past its timeout (submit's, the "
            "executor's or worker.default_timeout) until it returns; the prefork pool enforces them",
            kind,
        )


class WorkerServices:
    """What a worker's main process runs besides Celery: the lease keeper and, when configured,
    a scheduler thread; and the checks and set-up made once before the pool forks."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.keeper: LeaseKeeper | None = None
        self.scheduler: InWorkerScheduler | None = None
        self.held: HeldRecorder | None = None

    def prepare(self) -> None:
        """Before the pool forks: check that the executors can run their types (the python
        executor's modules import: ``Executor.worker_problems``) and that the task store answers
        (migrated), install per-task log capture, and freeze what was made so far."""
        rt = self.rt
        rt.runner.incarnation = new_incarnation()  # children share it
        # Only a worker needs the users' task modules (clients build the same executors and
        # tolerate a failed import); a worker must be able to run every type it advertises.
        problems = rt.executors.worker_problems()
        if problems:
            raise SystemExit("celery_ext: cannot start worker: " + "; ".join(problems))
        try:
            rt.storage.migrate()
        except StorageError as exc:
            # Refuse to start: a worker that cannot record outcomes would lose them.
            raise SystemExit(f"celery_ext: cannot start worker: {exc}") from exc
        log_upkeep(rt)
        level = logging.getLevelName(rt.config.app.log_level.upper())
        tasklog.install(level if isinstance(level, int) else logging.INFO)
        warm_statements(rt)
        self.held = install_held(rt.celery)  # plain messages held for their eta: recorded on receipt
        # Objects made until now move to the collector's permanent generation, so a child's
        # collections do not write to (and copy) the pages it shares with the main process
        # (docs/benchmarks.md, worker memory).
        gc.collect()
        gc.freeze()

    def start(self, pool: Any) -> None:
        rt = self.rt
        print(
            f"celery_ext: config {rt.config.source or '(built-in defaults)'} | data in {rt.data_dir} | "
            f"broker {_redact(rt.broker_url)} | "
            f"storage {rt.storage.description} | task types: {', '.join(rt.executors.task_types)}",
            file=sys.stderr,
            flush=True,
        )
        unbind_stale_plain_queues(rt)
        warn_time_limits(pool)
        self.keeper = LeaseKeeper(rt, pool)
        self.keeper.start()
        if scheduler_in_worker(rt.config):
            self.scheduler = InWorkerScheduler(rt)
            self.scheduler.start()

    def stop(self) -> None:
        if self.held is not None:
            self.held.stop()
        if self.keeper is not None:
            self.keeper.stop()
        if self.scheduler is not None:
            self.scheduler.stop()
        self.rt.executors.close()
        self.rt.storage.close()


class InWorkerScheduler:
    """A scheduler in a thread of the worker's main process (``scheduler.in_worker``); it stands
    by unless elected, like a scheduler process, and gives the lease up when the worker stops."""

    def __init__(self, rt: Runtime) -> None:
        self.scheduler = Scheduler(rt)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="celery_ext-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            self.scheduler.run(self._stop)
        except Exception:  # noqa: BLE001 - the worker goes on; its tasks do not depend on this thread
            logger.exception("the in-worker scheduler stopped")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10.0)


def log_upkeep(rt: Runtime) -> None:
    """Warn once at start about store settings that degrade it as records pile up (autovacuum
    off); never stops the worker."""
    try:
        warnings = rt.storage.upkeep_warnings()
    except StorageError as exc:
        logger.debug("could not read the task store's settings: %s", exc)
        return
    for warning in warnings:
        logger.warning("%s", warning)


def warm_statements(rt: Runtime) -> None:
    """Make, once in the main process before the pool forks, what every pool process would make
    for its first task: the claim and the outcome through the real ``Lifecycle``, so their
    statements (the SQL stores render each shape once, ``SqlTaskRepository.update``, and the read
    by id) are built here and shared with the children instead of built and allocated in each.
    Both run against an id no record has, and write nothing: the claim's conditional UPDATE
    matches no row, and ``Lifecycle._end`` makes no record again for a run that never started
    (no ``started_at``).  The failure of either is only logged: the children build their own."""
    token = new_id()  # a run's outcome is conditional on its token: the same shape as a real one's
    task = Task(task_id=f"celery_ext-warm-{new_id()}", task_type="celery_ext.warm", payload={}, dispatch_token=token)
    try:
        claimed = rt.lifecycle.claim(task, token, "celery_ext-warm", rt.runner.lease(task), None)
        succeeded = rt.lifecycle.succeed(task, None)
        rt.storage.tasks.prepare()
    except StorageError as exc:
        logger.warning("could not prepare the task store's statements before the pool forks: %s", exc)
        return
    if claimed is not None or succeeded:
        logger.error("warming the task store's statements wrote task %s", task.task_id)


def _redact(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))


def install_worker_steps(app: Celery) -> None:
    app.steps["worker"].add(CeleryExtStep)
    app.steps["worker"].add(ConfigWatchStep)
    install_routing(app)
    install_plugin_host(app)

    def child_init(**_: Any) -> None:
        runtime_of(app).storage.after_fork()

    def child_shutdown(**_: Any) -> None:
        runtime_of(app).executors.close()
        # Log lines and outcomes spooled during a storage outage (kept in memory: what is still
        # spooled when the process exits is lost, and lease expiry recovers those tasks).
        runtime_of(app).runner.spool.flush(runtime_of(app).config.worker.task_lease * 2)

    def unknown_task(sender: Any = None, name: str = "", id: str = "", **_: Any) -> None:  # noqa: A002
        # Celery has logged "Received unregistered task of type ..." and dropped the message.
        logger.error(
            "message %s for unknown task %r rejected: no celery_ext executor runs it here (known: %s)",
            id,
            name,
            ", ".join(runtime_of(app).executors.task_types),
        )
        runtime_of(app).metrics.message_rejected(name, "unknown_task")

    task_unknown.connect(unknown_task, weak=False, dispatch_uid=f"celery_ext.unknown.{id(app)}")
    worker_process_init.connect(child_init, weak=False, dispatch_uid=f"celery_ext.child_init.{id(app)}")
    worker_process_shutdown.connect(child_shutdown, weak=False, dispatch_uid=f"celery_ext.child_shutdown.{id(app)}")
