"""``affinity``: each task type sticks to one worker.

The first worker of a type is chosen by rendezvous hashing, so producers that see the same
workers agree on it.  When that worker is offline or full the task goes to the least-loaded
candidate instead, and the type re-sticks there.  With a registry the assignment is shared by
every producer of the cluster (``routing/shared.py``), else it is this process's own.
"""

from __future__ import annotations

from collections.abc import Sequence

from celery_ext.routing.base import BalancerSettings, LoadBalancer, RoutedTask
from celery_ext.routing.hashing import rendezvous
from celery_ext.routing.least_task import least_loaded
from celery_ext.routing.shared import SharedPlan
from celery_ext.routing.workers import WorkerInfo


class AffinityBalancer(LoadBalancer):
    name = "affinity"

    def __init__(self, settings: BalancerSettings | None = None) -> None:
        super().__init__(settings)
        self.sticky: dict[str, str] = {}

    def select(self, workers: Sequence[WorkerInfo], task: RoutedTask) -> WorkerInfo | None:
        wanted = self.sticky.get(task.task_type)
        if wanted is not None:
            for w in workers:
                if w.id == wanted:
                    return w
            chosen = least_loaded(workers)
        else:
            chosen = rendezvous(task.task_type, workers)
        self.sticky[task.task_type] = chosen.id
        return chosen

    def shared_plan(self, pool: Sequence[WorkerInfo], task_type: str) -> SharedPlan | None:
        return SharedPlan.sticky(rendezvous(task_type, pool).id, pool)
