"""Metrics: the ``MetricsCollector`` ABC, the ``null`` collector, and ``build_metrics(config)``.

Built-ins (``metrics.type``): ``prometheus`` (prometheus_client, multiprocess-aware) and ``null``.
Third parties register under the ``celery_ext.metrics`` entry-point group or as ``module:Class``.
When ``metrics.type`` is ``null`` but the ``metrics`` plugin is enabled, ``prometheus`` is used.
Labels are bounded by design: task type, status, failure reason, worker, queue; never task ids.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

from celery_ext.config import Config
from celery_ext.registry import METRICS


class MetricsCollector(abc.ABC):
    """Receives counts from the state machine, the worker and the scheduler.  Must not raise."""

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        self.config = dict(config or {})

    @abc.abstractmethod
    def task_created(self, task_type: str) -> None: ...

    @abc.abstractmethod
    def task_completed(self, task_type: str, status: str, duration: float | None) -> None:
        """A task finished with ``status`` (succeeded, failed, dead) after ``duration`` seconds."""

    @abc.abstractmethod
    def task_failed(self, task_type: str, reason: str) -> None: ...

    @abc.abstractmethod
    def worker_registered(self, worker_id: str) -> None: ...

    @abc.abstractmethod
    def worker_offline(self, worker_id: str) -> None: ...

    @abc.abstractmethod
    def worker_load(self, worker_id: str, in_flight: int) -> None: ...

    @abc.abstractmethod
    def queue_length(self, queue: str, length: int) -> None: ...

    @abc.abstractmethod
    def scheduler_election(self, is_leader: bool) -> None: ...

    def message_rejected(self, task_name: str, reason: str) -> None:  # noqa: B027 - optional hook
        """A message was refused without running: ``unknown_task`` (no worker task of that name)
        or ``malformed`` (its celery_ext header or arguments are unusable)."""

    def app_info(self, app: str, version: str) -> None:  # noqa: B027 - optional hook
        """This process serves ``app`` (``app.name``) at ``version`` (``app.version``)."""

    def due_lag(self, seconds: float) -> None:  # noqa: B027 - optional hook
        """The scheduler published a delayed record ``seconds`` after it was due (0 if ahead)."""

    def schedule_fired(self, schedule: str, outcome: str) -> None:  # noqa: B027 - optional hook
        """A periodic schedule fired (``outcome``: fired, failed)."""

    def share_counters(self, url: str, app_name: str) -> None:  # noqa: B027 - optional hook
        """The cluster has a Redis registry at ``url``: sum the counts that producers make there
        (``celery_ext.metrics.cluster``), for one process to export."""

    def flush(self) -> None:  # noqa: B027 - optional hook
        """Write the counts held in this process (a producer's end, ``Runtime.close``)."""

    def startup(self) -> None:  # noqa: B027 - optional hook
        """Called once in a worker's main process before its pool starts."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Called when the worker stops."""


class NullMetrics(MetricsCollector):
    """Counts nothing."""

    def task_created(self, task_type: str) -> None:
        pass

    def task_completed(self, task_type: str, status: str, duration: float | None) -> None:
        pass

    def task_failed(self, task_type: str, reason: str) -> None:
        pass

    def worker_registered(self, worker_id: str) -> None:
        pass

    def worker_offline(self, worker_id: str) -> None:
        pass

    def worker_load(self, worker_id: str, in_flight: int) -> None:
        pass

    def queue_length(self, queue: str, length: int) -> None:
        pass

    def scheduler_election(self, is_leader: bool) -> None:
        pass


def build_metrics(config: Config) -> MetricsCollector:
    name = config.metrics.type
    if name == "null" and any(p.name == "metrics" and p.enabled for p in config.plugins):
        name = "prometheus"
    cls = METRICS.resolve(name, "metrics.type")
    collector: MetricsCollector = cls(config.metrics.config)
    return collector
