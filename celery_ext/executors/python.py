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

``@task_type`` returns a ``TaskFunction``: called directly it just runs the function (no worker,
no storage), and it is also a Celery task (``.delay``, ``.apply_async``, ``.s``, ``.si``,
``.signature``, ``.name``, canvas) of the celery_ext app in use (``celery_ext.factory.current_app``).

What an executor runs is its own table, ``PythonExecutor.functions`` (name -> function), fixed when
it is built, as arq's ``Worker(functions=...)``: the built-ins, then what ``@task_type`` defined in
this process once its ``modules`` were imported (``defined_functions()``), or exactly the
``functions=`` it was given.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from pydantic import Field, field_validator

from celery_ext.errors import ConfigError, PermanentError
from celery_ext.executors.base import Executor, ExecutorSettings
from celery_ext.model import Task, TaskResult

if TYPE_CHECKING:
    from celery import Celery
    from celery import Task as CeleryTask
    from celery.canvas import Signature, chunks, xmap, xstarmap
    from celery.result import AsyncResult

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# What ``@task_type`` defined in this process, by name.  This one table stays process-wide
# because of what it serves: the decorator runs when a module is imported, before any executor
# (or app) exists, and a module is imported once per process (importing it again for a second
# executor runs nothing), so a definition can only be recorded where every later executor finds
# it; and a second function under a name already taken is refused at definition time, which
# needs every earlier definition.  Nothing executes from it: each ``PythonExecutor`` copies what
# it runs into its own ``functions`` when it is built.
_DEFINED: dict[str, Callable[..., Any]] = {}


class TaskFunction(Generic[P, R]):
    """A function registered as a task type, and the Celery task of that name.

    Calling it runs the function here and now, so unit tests of user code need no worker.  The
    Celery side is resolved on use, in the celery_ext app in use (``factory.current_app``: the
    worker's app in a worker; in a producer the current celery_ext app, else ``celery_ext.app``),
    where the task is the ``ExecutorTask`` that ``executors/task.py`` registers for the name: a
    message it sends is a plain Celery message, run through the python executor and recorded by
    the worker on receipt.  Anything else of Celery's task API is on ``.task``.
    """

    def __init__(self, name: str, fn: Callable[P, R]) -> None:
        self.name = name
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<@task_type {self.name!r}: {_qualname(self.fn)}>"

    # --- the Celery task --------------------------------------------------------------------

    @property
    def app(self) -> Celery:
        from celery_ext.factory import current_app

        return current_app()

    @property
    def task(self) -> CeleryTask[..., Any]:
        """The Celery task of this name in ``app`` (registered there if the app was built without
        it, e.g. when the module was imported after the app)."""
        app = self.app
        task = app.tasks.get(self.name)
        if task is None:
            from celery_ext.executors.task import register_task_types

            register_task_types(app, [self.name])
            task = app.tasks[self.name]
        return task

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]:
        return self.task.apply_async(args, kwargs)

    def apply_async(
        self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> AsyncResult[R]:
        return self.task.apply_async(*_call(args, kwargs), **options)

    def s(self, *args: Any, **kwargs: Any) -> Signature[R]:
        """A mutable signature: in a chain, the previous step's result is prepended to ``args``."""
        return self.task.s(*args, **kwargs)

    def si(self, *args: P.args, **kwargs: P.kwargs) -> Signature[R]:
        """An immutable signature: it ignores the previous step's result."""
        return self.task.si(*args, **kwargs)

    def signature(
        self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> Signature[R]:
        return self.task.signature(*_call(args, kwargs), **options)

    def map(self, it: Iterable[Any]) -> xmap:
        return self.task.map(it)

    def starmap(self, it: Iterable[Any]) -> xstarmap:
        return self.task.starmap(it)

    def chunks(self, it: Iterable[Any], n: int) -> chunks:
        return self.task.chunks(it, n)

    def AsyncResult(self, task_id: str, **kwargs: Any) -> AsyncResult[R]:  # noqa: N802 - Celery's name
        return self.task.AsyncResult(task_id, **kwargs)


def _call(
    args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None
) -> tuple[tuple[Any, ...] | None, dict[str, Any] | None]:
    return (None if args is None else tuple(args)), (None if kwargs is None else dict(kwargs))


def task_type(name: str) -> Callable[[Callable[P, R]], TaskFunction[P, R]]:
    """Register the decorated function as the implementation of task type ``name`` for the python
    executor, and make it a Celery task of that name (see ``TaskFunction``)."""

    def decorate(fn: Callable[P, R]) -> TaskFunction[P, R]:
        if isinstance(fn, TaskFunction):
            fn = fn.fn
        existing = _DEFINED.get(name)
        if existing is not None and existing is not fn and _qualname(existing) != _qualname(fn):
            raise ConfigError(f"task type {name!r} is already registered by {_qualname(existing)}")
        _DEFINED[name] = fn
        return TaskFunction(name, fn)

    return decorate


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def defined_functions() -> dict[str, Callable[..., Any]]:
    """A copy of what ``@task_type`` has defined in this process so far, by name."""
    return dict(_DEFINED)


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

    def __init__(
        self, settings: ExecutorSettings | None = None, *, functions: Iterable[TaskFunction[..., Any]] | None = None
    ) -> None:
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
