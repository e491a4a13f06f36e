"""``consistent_hash``: one key always goes to the same worker while the worker set is stable.

The key is ``payload[field]`` when ``scheduler.load_balance_config.field`` is set and present,
else the task's idempotency key, else its id.  Workers sit on a hash ring with ``replicas``
virtual nodes each, so a worker joining or leaving moves only about 1/n of the keys.  A full
owner spills the task to the next worker on the ring.

Config (``scheduler.load_balance_config``): ``field`` (payload key, optional), ``replicas`` (64).
"""

from __future__ import annotations

import bisect
import hashlib
from collections import OrderedDict
from collections.abc import Sequence

from pydantic import Field

from celery_ext.routing.base import BalancerSettings, LoadBalancer, RoutedTask
from celery_ext.routing.workers import WorkerInfo


def hash64(text: str) -> int:
    # A stable hash (not Python's salted hash()): every producer process must agree.
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def rendezvous(key: str, workers: Sequence[WorkerInfo]) -> WorkerInfo:
    """Highest-random-weight choice: stable for a key while the set is stable."""
    return max(workers, key=lambda w: hash64(f"{w.id}|{key}"))


class ConsistentHashSettings(BalancerSettings):
    field: str | None = None
    replicas: int = Field(64, ge=1, le=1000)


class ConsistentHashBalancer(LoadBalancer):
    name = "consistent_hash"
    settings_model = ConsistentHashSettings

    def __init__(self, settings: BalancerSettings | None = None) -> None:
        super().__init__(settings)
        self._rings: OrderedDict[frozenset[str], tuple[list[int], list[str]]] = OrderedDict()

    def key_of(self, task: RoutedTask) -> str:
        field = self.settings.field  # type: ignore[attr-defined]
        if field and field in task.payload:
            return f"{task.task_type}|{task.payload[field]}"
        if task.idempotency_key:
            return f"{task.task_type}|{task.idempotency_key}"
        return task.task_id or task.task_type

    def select(self, workers: Sequence[WorkerInfo], task: RoutedTask) -> WorkerInfo | None:
        points, owners = self._ring(frozenset(w.id for w in workers))
        i = bisect.bisect(points, hash64(self.key_of(task))) % len(points)
        by_id = {w.id: w for w in workers}
        return by_id[owners[i]]

    def _ring(self, ids: frozenset[str]) -> tuple[list[int], list[str]]:
        ring = self._rings.get(ids)
        if ring is None:
            replicas = self.settings.replicas  # type: ignore[attr-defined]
            nodes = sorted((hash64(f"{wid}#{r}"), wid) for wid in ids for r in range(replicas))
            ring = ([p for p, _ in nodes], [w for _, w in nodes])
            self._rings[ids] = ring
            # A few rings (full and partly-full sets) stay cached; rebuilding costs n*replicas hashes.
            while len(self._rings) > 8:
                self._rings.popitem(last=False)
        else:
            self._rings.move_to_end(ids)
        return ring
