"""A third-party ``LoadBalancer``: the candidate with the lowest worker id (deterministic).

Config (``scheduler.load_balance_config``): ``prefer`` (optional id prefix tried first).
"""

from __future__ import annotations

from collections.abc import Sequence

from celery_ext.routing.base import BalancerSettings, LoadBalancer, RoutedTask
from celery_ext.routing.workers import WorkerInfo


class LowestIdSettings(BalancerSettings):
    prefer: str | None = None


class LowestIdBalancer(LoadBalancer):
    name = "lowest_id"
    settings_model = LowestIdSettings

    def select(self, workers: Sequence[WorkerInfo], task: RoutedTask) -> WorkerInfo | None:
        prefer = self.settings.prefer  # type: ignore[attr-defined]
        preferred = [w for w in workers if prefer and w.id.startswith(prefer)]
        return min(preferred or workers, key=lambda w: w.id)
