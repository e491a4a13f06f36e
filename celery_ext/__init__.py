"""celery_ext: durable, routed, observable tasks on Celery.

``celery -A celery_ext worker`` runs the app built from config.yaml (``celery_ext.app``, created
on first access: importing this package does no I/O).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery_ext.errors import CeleryExtError, ConfigError
from celery_ext.executors.base import Executor, ExecutorSettings
from celery_ext.functions import task_type
from celery_ext.model import Task, TaskFilter, TaskLog, TaskResult, TaskStatus

if TYPE_CHECKING:
    from celery import Celery

    app: Celery
    celery: Celery

__version__ = "0.1.0"

__all__ = [
    "CeleryExtError",
    "ConfigError",
    "Executor",
    "ExecutorSettings",
    "Task",
    "TaskFilter",
    "TaskLog",
    "TaskResult",
    "TaskStatus",
    "create_app",
    "task_type",
]


def create_app(*args: Any, **kwargs: Any) -> Celery:
    # Imported on use: ``import celery_ext`` (a module of task functions does) loads no framework.
    from celery_ext.factory import create_app as _create

    return _create(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from celery_ext.factory import default_app  # imported on use, as above

        return default_app()
    raise AttributeError(f"module 'celery_ext' has no attribute {name!r}")
