"""A balancer that counts its lifecycle hooks (named by ``module:Class`` in tests)."""

from __future__ import annotations

from collections.abc import Sequence

from celery_ext.routing.base import BalancerSettings, LoadBalancer, RoutedTask
from celery_ext.routing.workers import WorkerInfo


class CountingBalancer(LoadBalancer):
    name = "counting"

    def __init__(self, settings: BalancerSettings | None = None) -> None:
        super().__init__(settings)
        self.started = self.stopped = 0

    def startup(self) -> None:
        self.started += 1

    def shutdown(self) -> None:
        self.stopped += 1

    def select(self, workers: Sequence[WorkerInfo], task: RoutedTask) -> WorkerInfo | None:
        return workers[0]
