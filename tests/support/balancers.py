"""Balancer test helpers: ``w`` (a worker of a registry snapshot), ``T`` (a routed task of type ``t``)
and a balancer that counts its lifecycle hooks (named by ``module:Class`` in tests)."""

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


def w(wid: str, in_flight: int = 0, capacity: int = 10, weight: int = 1, types: tuple[str, ...] = ("t",)) -> WorkerInfo:
    """A worker of app ``p`` as the registry lists it (its direct queue ``p.worker.<id>``)."""
    return WorkerInfo(
        id=wid, queue=f"p.worker.{wid}", weight=weight, capacity=capacity, supported_types=types, in_flight=in_flight
    )


T = RoutedTask("t", "id1", {})
