"""The ``python`` executor: runs Python functions registered with ``@task_type``.

Config keys (besides ``timeout`` and ``max_retries``):
  modules:    modules to import so that their ``@task_type`` functions register.
  task_types: the task types those modules register, declared so that a process that cannot
              import them (the CLI, the REST API, Flower, a producer) still accepts and routes
              them.  Optional: a type that a live worker advertises is accepted anyway.

Who must import ``modules``: only the workers.  Every process tries (so a producer that can
import them knows their types without declaring them), but a failed import outside a worker is
logged and ignored: a module that is not installed at all at debug level (that is how a client
host is meant to be), one that is installed but fails to import as a warning.  A worker refuses to
start instead, naming the module, as it does for a declared type that no module registers: a
worker must be able to run every type it advertises.  The check is ``Executor.worker_problems``,
called by the worker bootstep (``celery_ext.worker.CeleryExtStep``), which runs in ``celery
worker`` (and in any ``WorkController``) and nowhere else, so no process has to guess from its
command line whether it is a worker.

A function is called with the message's positional arguments (a chain passes the previous step's
result there) and the payload as keyword arguments; its return value (JSON-serializable) becomes
the result data.  A payload that does not fit the function's signature fails the task at once with
reason ``invalid_payload``: that check happens here, in the worker.  Built-in types: ``echo``
(returns its payload) and ``sleep`` (payload ``{"seconds": s}``).

``@task_type`` (``celery_ext.functions``) records the function here (``define``) and returns a
``TaskFunction``: called directly it just runs the function, and it is also a Celery task of the
celery_ext app in use.

What an executor runs is its own table, ``PythonExecutor.functions`` (name -> function), fixed when
it is built, as arq's ``Worker(functions=...)``: the built-ins, then what ``@task_type`` defined in
this process once its ``modules`` were imported (``defined_functions()``), or exactly the
``functions=`` it was given.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from pydantic import Field, field_validator

from celery_ext.errors import ConfigError, PermanentError
from celery_ext.executors.base import Executor, ExecutorSettings
from celery_ext.model import Task, TaskResult

logger = logging.getLogger(__name__)

# What ``@task_type`` defined in this process, by name.  This one table stays process-wide
# because of what it serves: the decorator runs when a module is imported, before any executor
# (or app) exists, and a module is imported once per process (importing it again for a second
# executor runs nothing), so a definition can only be recorded where every later executor finds
# it; and a second function under a name already taken is refused at definition time, which
# needs every earlier definition.  Nothing executes from it: each ``PythonExecutor`` copies what
# it runs into its own ``functions`` when it is built.
_DEFINED: dict[str, Callable[..., Any]] = {}


class Defined(Protocol):
    """A task function as ``PythonExecutor(functions=...)`` takes it (``celery_ext.functions.TaskFunction``)."""

    name: str
    fn: Callable[..., Any]


def define(name: str, fn: Callable[..., Any]) -> None:
    """Record ``fn`` as task type ``name`` in this process (what ``@task_type`` does first); a
    second, different function under a name already taken is a ``ConfigError``."""
    existing = _DEFINED.get(name)
    if existing is not None and existing is not fn and _qualname(existing) != _qualname(fn):
        raise ConfigError(f"task type {name!r} is already registered by {_qualname(existing)}")
    _DEFINED[name] = fn


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def defined_functions() -> dict[str, Callable[..., Any]]:
    """A copy of what ``@task_type`` has defined in this process so far, by name."""
    return dict(_DEFINED)


def echo(**payload: Any) -> dict[str, Any]:
    """Built-in type ``echo``: returns its payload."""
    return payload


def sleep(seconds: float = 0.0, **_: Any) -> dict[str, float]:
    """Built-in type ``sleep``: sleeps ``seconds``."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
        raise PermanentError("invalid_payload", f"seconds: expected a number >= 0 (got {seconds!r})")
    logger.info("sleeping %.3fs", seconds)
    time.sleep(seconds)
    return {"slept": float(seconds)}


define("echo", echo)
define("sleep", sleep)


class PythonSettings(ExecutorSettings):
    modules: list[str] = Field(default_factory=list)
    task_types: list[str] = Field(default_factory=list)

    @field_validator("modules", "task_types")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        for item in value:
            if not item.strip() or item != item.strip():
                raise ValueError(f"expected names without blanks (got {item!r})")
        return value


def import_module(module: str) -> str | None:
    """Import ``module``; None when it worked, else why it did not (logged, never raised)."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module == missing or module.startswith(missing + ".")):
            # Not installed here: normal on a client host, which takes the types from
            # config.task_types and the workers' registry.
            logger.debug("python executor: module %r is not installed in this process", module)
            return f"cannot import {module!r}: {exc}"
        logger.warning("python executor: cannot import %r: %s", module, exc)
        return f"cannot import {module!r}: {exc}"
    except Exception as exc:  # noqa: BLE001 - a broken user module must not stop a client
        logger.warning("python executor: cannot import %r: %s: %s", module, exc.__class__.__name__, exc)
        return f"cannot import {module!r}: {exc.__class__.__name__}: {exc}"
    return None


class PythonExecutor(Executor):
    type = "python"
    settings_model = PythonSettings
    accepts_args = True

    def __init__(self, settings: ExecutorSettings | None = None, *, functions: Iterable[Defined] | None = None) -> None:
        """``functions``: exactly the task functions to run (no module is imported then); by
        default, after importing ``settings.modules``, every one defined in this process (the
        built-ins ``echo`` and ``sleep`` among them)."""
        super().__init__(settings)
        assert isinstance(self.settings, PythonSettings)
        self.import_errors: dict[str, str] = {}
        if functions is not None:
            self.functions = {f.name: f.fn for f in functions}
            return
        for module in self.settings.modules:
            error = import_module(module)
            if error is not None:
                self.import_errors[module] = error
        self.functions = defined_functions()

    @property
    def supported_task_types(self) -> list[str]:
        assert isinstance(self.settings, PythonSettings)
        return sorted(set(self.functions) | set(self.settings.task_types))

    def worker_problems(self) -> list[str]:
        assert isinstance(self.settings, PythonSettings)
        problems = [f"modules: {error}" for error in self.import_errors.values()]
        missing = sorted(set(self.settings.task_types) - set(self.functions))
        if missing and not self.import_errors:
            modules = ", ".join(self.settings.modules) or "none"
            problems.append(
                f"task_types: {', '.join(map(repr, missing))} declared, but no @task_type function "
                f"of that name was registered by the modules ({modules})"
            )
        return problems

    def execute(self, task: Task) -> TaskResult:
        fn = self.functions.get(task.task_type)
        if fn is None:
            raise PermanentError("unknown_task_type", f"no python function for {task.task_type!r}")
        args = task.args or ()
        try:
            return TaskResult.ok(fn(*args, **task.payload))
        except TypeError:
            # Python checks the arguments before the body runs, so a payload that does not fit
            # the signature fails here with nothing done: a permanent error, not an exception
            # to retry.  A TypeError raised inside the function is the function's own.
            try:
                inspect.signature(fn).bind(*args, **task.payload)
            except TypeError as exc:
                raise PermanentError("invalid_payload", f"{task.task_type}: {exc}") from exc
            raise
