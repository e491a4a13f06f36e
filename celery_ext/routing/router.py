"""The Celery router, installed as an instance in ``task_routes``.

It only ever returns queues it knows: the shared queue of a known task type.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from celery_ext.dispatch import queue_name


class TaskRouter:
    """Routes each celery_ext task type to its shared queue."""

    def __init__(self, prefix: str, task_types: Iterable[str]) -> None:
        self.prefix = prefix
        self.task_types = frozenset(task_types)

    def __call__(self, name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> dict[str, Any] | None:
        if name not in self.task_types:
            return None
        return {"queue": queue_name(self.prefix, name)}
