"""The ``Executor`` extension point.

An executor owns one or more task types and runs a ``Task`` to a ``TaskResult``.  It knows
nothing of Celery: ``task.py`` adapts it.  Config keys common to every executor
(``timeout``, ``max_retries``) live in ``ExecutorSettings``; an executor declares its own keys by
subclassing it as ``settings_model``.
"""

from __future__ import annotations

import abc
import builtins
from typing import Any, ClassVar

from pydantic import Field

from celery_ext.config import Model, PositiveDuration, validate_section
from celery_ext.errors import ConfigError, PermanentError
from celery_ext.model import Task, TaskResult


class ExecutorSettings(Model):
    """Keys every executor accepts in its ``config``."""

    timeout: PositiveDuration | None = None
    max_retries: int | None = Field(None, ge=0)


class Executor(abc.ABC):
    """Runs tasks of the types it supports.

    Lifecycle: the constructor takes validated settings and does no I/O; then, once per worker
    process (after the pool forks): ``initialize(config)``, then any
    number of ``execute(task)``, then ``close()``.  ``execute`` returns a ``TaskResult`` or
    raises: ``PermanentError`` fails the task at once, ``TransientError`` and any other exception
    are retried with backoff while attempts remain.
    """

    type: ClassVar[str]
    settings_model: ClassVar[builtins.type[ExecutorSettings]] = ExecutorSettings
    # Whether ``execute`` reads ``task.args`` (a message's positional arguments).  When false, a
    # chain's previous result reaches the executor merged into the payload (``payload_of``).
    accepts_args: ClassVar[bool] = False

    def __init__(self, settings: ExecutorSettings | None = None) -> None:
        # No I/O here: executors are also built in producers, to know their task types.
        self.settings: ExecutorSettings = settings or self.settings_model()

    @property
    @abc.abstractmethod
    def supported_task_types(self) -> list[str]:
        """Task types this executor runs; each becomes a registered Celery task."""

    @classmethod
    def parse_settings(cls, config: dict[str, Any], path: str = "config") -> ExecutorSettings:
        model: Any = cls.settings_model
        if not (isinstance(model, builtins.type) and issubclass(model, ExecutorSettings)):
            # Refused here, at config validation, rather than failing every submit later on the
            # missing max_retries/timeout.
            name = getattr(model, "__name__", repr(model))
            raise ConfigError(
                f"{path}: executor {getattr(cls, 'type', cls.__name__)!r} ({cls.__module__}.{cls.__qualname__}): "
                f"its settings_model {name} must subclass celery_ext.ExecutorSettings, not pydantic's BaseModel "
                f"(ExecutorSettings adds the timeout and max_retries keys every executor takes): "
                f"write `class {name}(ExecutorSettings)`"
            )
        return validate_section(model, config, path)

    def initialize(self, config: ExecutorSettings) -> None:  # noqa: B027 - optional hook
        """Open clients; called once per worker process before its first task.

        ``config`` is this executor's validated ``settings_model`` (also ``self.settings``).
        Raising here marks the executor unavailable: its tasks fail with reason
        ``executor_unavailable`` and the worker keeps running.
        """

    @abc.abstractmethod
    def execute(self, task: Task) -> TaskResult:
        """Run one task."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what ``initialize`` opened."""

    def worker_problems(self) -> list[str]:
        """What would keep this executor from running its task types in a worker (e.g. the python
        executor's user modules that do not import).  Checked when a worker starts: any problem
        refuses the start.  Producers (CLI, API, Flower) never check it: they only submit."""
        return []


def payload_of(task: Task) -> dict[str, Any]:
    """The payload an executor that takes only a JSON object sees.

    In a chain, Celery passes the previous step's result as the first positional argument.  When
    that result is a JSON object, its keys fill the payload's missing keys (the step's own
    payload wins); anything else positional cannot be given to such an executor.
    """
    if not task.args:
        return task.payload
    if len(task.args) == 1 and isinstance(task.args[0], dict):
        return {**task.args[0], **task.payload}
    raise PermanentError(
        "invalid_payload",
        f"{task.task_type} takes a JSON object payload; positional arguments are accepted only as one "
        f"object (a previous chain step's result), got {len(task.args)}: "
        f"{', '.join(type(a).__name__ for a in task.args)}",
    )
