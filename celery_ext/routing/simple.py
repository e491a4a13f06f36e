"""Load-oblivious balancers: ``round_robin`` (each candidate in turn) and ``random``."""

from __future__ import annotations

import random
from collections.abc import Sequence

from celery_ext.routing.base import BalancerSettings, LoadBalancer, RoutedTask
from celery_ext.routing.workers import WorkerInfo


class RoundRobinBalancer(LoadBalancer):
    """Cycles through the candidates in id order; the cursor survives changes of the set."""

    name = "round_robin"

    def __init__(self, settings: BalancerSettings | None = None) -> None:
        super().__init__(settings)
        self._last: str | None = None

    def select(self, workers: Sequence[WorkerInfo], task: RoutedTask) -> WorkerInfo | None:
        ordered = sorted(workers, key=lambda w: w.id)
        # The next id after the last one chosen, so a worker that fills up or joins does not
        # reset the cycle.
        chosen = next((w for w in ordered if self._last is None or w.id > self._last), ordered[0])
        self._last = chosen.id
        return chosen


class RandomBalancer(LoadBalancer):
    """A uniformly random candidate."""

    name = "random"

    def select(self, workers: Sequence[WorkerInfo], task: RoutedTask) -> WorkerInfo | None:
        return random.choice(workers)
