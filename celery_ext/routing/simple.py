"""Load-oblivious balancers: ``round_robin`` (each candidate in turn) and ``random``.

``round_robin`` keeps one rotation per task type; with a registry the rotation is shared by every
producer of the cluster (``routing/shared.py``), else it is this process's own.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from celery_ext.routing.base import BalancerSettings, LoadBalancer, RoutedTask
from celery_ext.routing.shared import SharedPlan
from celery_ext.routing.workers import WorkerInfo


class RoundRobinBalancer(LoadBalancer):
    """Cycles through the candidates in id order, one cycle per task type; the cursor survives
    changes of the set."""

    name = "round_robin"

    def __init__(self, settings: BalancerSettings | None = None) -> None:
        super().__init__(settings)
        self._last: dict[str, str] = {}

    def select(self, workers: Sequence[WorkerInfo], task: RoutedTask) -> WorkerInfo | None:
        ordered = sorted(workers, key=lambda w: w.id)
        last = self._last.get(task.task_type)
        # The next id after the last one chosen, so a worker that fills up or joins does not
        # reset the cycle.
        chosen = next((w for w in ordered if last is None or w.id > last), ordered[0])
        self._last[task.task_type] = chosen.id
        return chosen

    def shared_plan(self, pool: Sequence[WorkerInfo], task_type: str) -> SharedPlan | None:
        return SharedPlan.cycle(sorted(w.id for w in pool), pool)


class RandomBalancer(LoadBalancer):
    """A uniformly random candidate."""

    name = "random"

    def select(self, workers: Sequence[WorkerInfo], task: RoutedTask) -> WorkerInfo | None:
        return random.choice(workers)
