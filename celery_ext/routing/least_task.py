"""``least_task``: the candidate with the fewest tasks in flight; ties broken at random."""

from __future__ import annotations

import random
from collections.abc import Sequence

from celery_ext.routing.base import LoadBalancer, RoutedTask
from celery_ext.routing.workers import WorkerInfo


def least_loaded(workers: Sequence[WorkerInfo]) -> WorkerInfo:
    fewest = min(w.in_flight for w in workers)
    tied = [w for w in workers if w.in_flight == fewest]
    # Random among equals so producers that share a snapshot do not all herd onto the first.
    return tied[0] if len(tied) == 1 else random.choice(tied)


class LeastTaskBalancer(LoadBalancer):
    name = "least_task"

    def select(self, workers: Sequence[WorkerInfo], task: RoutedTask) -> WorkerInfo | None:
        return least_loaded(workers)
