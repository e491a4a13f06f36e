"""The ``python`` executor: runs Python callables registered with ``@task_type``.

Config keys (besides ``timeout`` and ``max_retries``):
  modules: list of modules to import so their ``@task_type`` functions register
           (imported in producers and workers alike).

A function is called with the payload as keyword arguments; its return value (JSON-serializable)
becomes the result data.  Built-in types: ``echo`` (returns its payload) and ``sleep``
(payload ``{"seconds": s}``).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import Field

from celery_ext.errors import ConfigError, PermanentError
from celery_ext.executors.base import Executor, ExecutorSettings
from celery_ext.model import Task, TaskResult

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

_REGISTRY: dict[str, Callable[..., Any]] = {}


def task_type(name: str) -> Callable[[F], F]:
    """Register ``fn`` as the implementation of task type ``name`` for the python executor."""

    def decorate(fn: F) -> F:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not fn and _qualname(existing) != _qualname(fn):
            raise ConfigError(f"task type {name!r} is already registered by {_qualname(existing)}")
        _REGISTRY[name] = fn
        return fn

    return decorate


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def registered_types() -> list[str]:
    return sorted(_REGISTRY)


@task_type("echo")
def echo(**payload: Any) -> dict[str, Any]:
    return payload


@task_type("sleep")
def sleep(seconds: float = 0.0, **_: Any) -> dict[str, float]:
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
        raise PermanentError("invalid_payload", f"seconds: expected a number >= 0 (got {seconds!r})")
    logger.info("sleeping %.3fs", seconds)
    time.sleep(seconds)
    return {"slept": float(seconds)}


class PythonSettings(ExecutorSettings):
    modules: list[str] = Field(default_factory=list)


class PythonExecutor(Executor):
    type = "python"
    settings_model = PythonSettings

    def __init__(self, settings: ExecutorSettings | None = None) -> None:
        super().__init__(settings)
        assert isinstance(self.settings, PythonSettings)
        for module in self.settings.modules:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise ConfigError(f"executors[python].config.modules: cannot import {module!r}: {exc}") from exc

    @property
    def supported_task_types(self) -> list[str]:
        return registered_types()

    def execute(self, task: Task) -> TaskResult:
        fn = _REGISTRY.get(task.task_type)
        if fn is None:
            raise PermanentError("unknown_task_type", f"no python function for {task.task_type!r}")
        try:
            return TaskResult.ok(fn(**task.payload))
        except TypeError:
            # Python checks the arguments before the body runs, so a payload that does not fit
            # the signature fails here with nothing done: a permanent error, not an exception
            # to retry.  A TypeError raised inside the function is the function's own.
            try:
                inspect.signature(fn).bind(**task.payload)
            except TypeError as exc:
                raise PermanentError("invalid_payload", f"{task.task_type}: {exc}") from exc
            raise
