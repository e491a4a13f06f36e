"""The ``prometheus`` metrics collector (``pip install celery-ext[prometheus]``).

Correct under the prefork pool: a worker calls ``startup()`` in its main process before the pool
forks; that points ``PROMETHEUS_MULTIPROC_DIR`` at a private directory (unless already set), so
every pool child writes its counts to files there and one scrape of the main process sums them.
A replaced child's counts stay (its files remain); its live gauges are dropped at the next scrape
(``mark_process_dead``).  Without a multiprocess directory the collector is a plain registry.

Counts made in producers (``task_created``) are summed in Redis when the cluster has a registry
(``share_counters``, see ``metrics.cluster``): no process counts them locally then, and only the
scheduler leader exports them, so that the series exists once in Prometheus.

Config keys (``metrics.config``):
  buckets: histogram buckets in seconds for ``celery_ext_task_duration_seconds``
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from celery_ext.errors import ConfigError
from celery_ext.metrics import MetricsCollector
from celery_ext.metrics.cluster import ClusterCounters

if TYPE_CHECKING:
    from celery_ext.metrics.cluster import ClusterCounters

logger = logging.getLogger("celery_ext.metrics")

ENV = "PROMETHEUS_MULTIPROC_DIR"
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, float("inf"))


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise ConfigError(
            "metrics.type: prometheus needs prometheus-client: pip install celery-ext[prometheus]"
        ) from exc
    return prometheus_client


class PrometheusMetrics(MetricsCollector):
    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        buckets = self.config.get("buckets", DEFAULT_BUCKETS)
        if not isinstance(buckets, list | tuple) or not all(isinstance(b, int | float) for b in buckets):
            raise ConfigError(f"metrics.config.buckets: expected a list of numbers (got {buckets!r})")
        self.buckets = tuple(buckets)
        self._m: dict[str, Any] | None = None
        self._private_dir: str | None = None
        self.cluster: ClusterCounters | None = None
        self.leader = False  # this process's scheduler leads: it exports the cluster counters

    def share_counters(self, url: str, app_name: str) -> None:
        self.cluster = ClusterCounters.from_url(url, app_name)
        self._m = None  # no local task_created counter now

    # --- process setup --------------------------------------------------------------------

    def startup(self) -> None:
        if not os.environ.get(ENV):
            self._private_dir = tempfile.mkdtemp(prefix="celery_ext-metrics-")
            os.environ[ENV] = self._private_dir
        if "prometheus_client.values" in sys.modules:
            # prometheus_client picks its value class at import; re-pick it now that the dir is set.
            values = sys.modules["prometheus_client.values"]
            values.ValueClass = values.get_value_class()  # type: ignore[attr-defined]
        self._m = None

    def flush(self) -> None:
        if self.cluster is not None:
            self.cluster.flush()

    def shutdown(self) -> None:
        self.flush()
        if self._private_dir and os.environ.get(ENV) == self._private_dir:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            del os.environ[ENV]
        self._private_dir = None

    @property
    def multiprocess_dir(self) -> str | None:
        return os.environ.get(ENV) or None

    def _metrics(self) -> dict[str, Any]:
        if self._m is None:
            pc = _prometheus()
            self.registry = pc.CollectorRegistry()
            r = self.registry
            self._m = {
                "duration": pc.Histogram(
                    "celery_ext_task_duration_seconds",
                    "Task run time by final status",
                    ["task_type", "status"],
                    buckets=self.buckets,
                    registry=r,
                ),
                "failed": pc.Counter(
                    "celery_ext_task_failed", "Tasks failed for good, by reason", ["task_type", "reason"], registry=r
                ),
                "load": pc.Gauge(
                    "celery_ext_worker_load",
                    "Tasks in flight on a worker",
                    ["worker"],
                    registry=r,
                    multiprocess_mode="livemax",
                ),
                "online": pc.Gauge(
                    "celery_ext_worker_online",
                    "1 while a worker is online",
                    ["worker"],
                    registry=r,
                    multiprocess_mode="livemax",
                ),
                "queue": pc.Gauge(
                    "celery_ext_queue_length",
                    "Messages waiting in a celery_ext queue",
                    ["queue"],
                    registry=r,
                    multiprocess_mode="livemax",
                ),
                "rejected": pc.Counter(
                    "celery_ext_messages_rejected",
                    "Messages refused without running, by task name and reason (unknown_task, malformed)",
                    ["task_name", "reason"],
                    registry=r,
                ),
                "info": pc.Gauge(
                    "celery_ext_app_info",
                    "1, labelled with the app's name and app.version",
                    ["app", "version"],
                    registry=r,
                    multiprocess_mode="livemax",
                ),
                "due_lag": pc.Histogram(
                    "celery_ext_due_lag_seconds",
                    "From a delayed task's run_at to its publish by the scheduler (0 when published ahead)",
                    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, float("inf")),
                    registry=r,
                ),
                "fired": pc.Counter(
                    "celery_ext_schedule_fired",
                    "Periodic schedule fires, by schedule and outcome (fired, failed)",
                    ["schedule", "outcome"],
                    registry=r,
                ),
                "leader": pc.Gauge(
                    "celery_ext_scheduler_is_leader",
                    "1 while this scheduler is leader",
                    registry=r,
                    multiprocess_mode="livemax",
                ),
            }
            if self.cluster is None:
                self._m["created"] = pc.Counter("celery_ext_task_created", "Tasks created", ["task_type"], registry=r)
            else:
                r.register(_ClusterExport(self))
        return self._m

    # --- collecting -----------------------------------------------------------------------

    def task_created(self, task_type: str) -> None:
        if self.cluster is not None:
            self.cluster.inc("task_created", (task_type,))
        else:
            self._metrics()["created"].labels(task_type).inc()

    def task_completed(self, task_type: str, status: str, duration: float | None) -> None:
        self._metrics()["duration"].labels(task_type, status).observe(max(0.0, duration or 0.0))

    def task_failed(self, task_type: str, reason: str) -> None:
        self._metrics()["failed"].labels(task_type, _bounded(reason)).inc()

    def worker_registered(self, worker_id: str) -> None:
        self._metrics()["online"].labels(worker_id).set(1)

    def worker_offline(self, worker_id: str) -> None:
        self._metrics()["online"].labels(worker_id).set(0)
        self._metrics()["load"].labels(worker_id).set(0)

    def worker_load(self, worker_id: str, in_flight: int) -> None:
        self._metrics()["load"].labels(worker_id).set(in_flight)

    def queue_length(self, queue: str, length: int) -> None:
        self._metrics()["queue"].labels(queue).set(length)

    def scheduler_election(self, is_leader: bool) -> None:
        self.leader = is_leader
        self._metrics()["leader"].set(1 if is_leader else 0)

    def app_info(self, app: str, version: str) -> None:
        self._metrics()["info"].labels(_bounded(app), _bounded(version) if version else "").set(1)

    def due_lag(self, seconds: float) -> None:
        self._metrics()["due_lag"].observe(max(0.0, seconds))

    def schedule_fired(self, schedule: str, outcome: str) -> None:
        self._metrics()["fired"].labels(_bounded(schedule), outcome).inc()

    def message_rejected(self, task_name: str, reason: str) -> None:
        # Any producer can send any name: the label is bounded like a reason code.
        self._metrics()["rejected"].labels(_bounded(task_name), _bounded(reason)).inc()

    # --- exporting ------------------------------------------------------------------------

    def exposition(self) -> tuple[bytes, str]:
        """The text of one scrape and its content type."""
        pc = _prometheus()
        self._metrics()
        path = self.multiprocess_dir
        if path:
            reap_dead(path)
            from prometheus_client import multiprocess

            registry = pc.CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
            if self.cluster is not None:
                registry.register(_ClusterExport(self))
        else:
            registry = self.registry
        return pc.generate_latest(registry), pc.CONTENT_TYPE_LATEST


#: The counters summed in Redis (``share_counters``): name, help, label names.
CLUSTER_COUNTERS = {
    "task_created": ("celery_ext_task_created", "Tasks created, by every process of the cluster", ("task_type",)),
}


class _ClusterExport:
    """The cluster's sums from Redis, in the scrape of the scheduler leader only."""

    def __init__(self, owner: PrometheusMetrics) -> None:
        self.owner = owner

    def collect(self) -> Any:
        cluster = self.owner.cluster
        if cluster is None or not self.owner.leader:
            return
        from prometheus_client.core import CounterMetricFamily

        for counter, (name, documentation, labels) in CLUSTER_COUNTERS.items():
            try:
                totals = cluster.totals(counter)
            except Exception as exc:  # noqa: BLE001 - the rest of the scrape is still served
                logger.warning("could not read the cluster's %s counts: %s", counter, exc)
                continue
            family = CounterMetricFamily(name, documentation, labels=list(labels))
            for values, total in sorted(totals.items()):
                if len(values) == len(labels):
                    family.add_metric(list(values), total)
            yield family


_PID = re.compile(r"_(\d+)\.db$")
_REASON = re.compile(r"[^A-Za-z0-9_.:-]")


def _bounded(reason: str) -> str:
    # Reasons are codes; cap what a careless executor could put there.
    return _REASON.sub("_", reason)[:64] or "unknown"


def reap_dead(path: str) -> None:
    """``mark_process_dead`` for every process that left files behind and no longer exists."""
    from prometheus_client import multiprocess

    pids = {int(m.group(1)) for f in glob.glob(os.path.join(path, "*.db")) if (m := _PID.search(f))}
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
        except PermissionError:
            pass
