"""``weighted_round_robin``: smooth weighted round robin (the nginx algorithm).

Weights 5, 1, 1 give ``a a b a c a a``, not ``a a a a a b c``: each pick adds every candidate's
weight to its running score, takes the highest, and subtracts the total from the winner.

With a registry, the cluster shares one cycle per task type instead (``routing/shared.py``): each
worker ``weight`` times, its turns evenly spread (``a a a b c a a``), one turn per decision of any
producer, so short-lived producers together still give the weights.
"""

from __future__ import annotations

from collections.abc import Sequence

from celery_ext.routing.base import BalancerSettings, LoadBalancer, RoutedTask
from celery_ext.routing.shared import SharedPlan, weighted_turns
from celery_ext.routing.workers import WorkerInfo


class WeightedRoundRobinBalancer(LoadBalancer):
    name = "weighted_round_robin"

    def __init__(self, settings: BalancerSettings | None = None) -> None:
        super().__init__(settings)
        self._current: dict[str, int] = {}

    def select(self, workers: Sequence[WorkerInfo], task: RoutedTask) -> WorkerInfo | None:
        current = self._current
        total = 0
        best: WorkerInfo | None = None
        best_score = 0
        for w in workers:
            score = current.get(w.id, 0) + w.weight
            current[w.id] = score
            total += w.weight
            if best is None or score > best_score:
                best, best_score = w, score
        assert best is not None
        current[best.id] = best_score - total
        if len(current) > 4 * len(workers) + 64:
            # Forget workers that left, so the table does not grow with churn.
            live = {w.id for w in workers}
            self._current = {k: v for k, v in current.items() if k in live}
        return best

    def shared_plan(self, pool: Sequence[WorkerInfo], task_type: str) -> SharedPlan | None:
        return SharedPlan.cycle(weighted_turns(pool), pool)
