"""``@task_type``: Python functions as celery_ext task types, and as Celery tasks.

``@task_type(name)`` records the function for the python executor (``executors.python.define``)
and returns a ``TaskFunction``: called directly it just runs the function (no worker, no
storage), and it is also a Celery task (``.delay``, ``.apply_async``, ``.s``, ``.si``,
``.signature``, ``.name``, canvas) of the celery_ext app in use (``celery_ext.factory.current_app``).

The built-in types have theirs here too: ``echo`` and ``sleep``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from celery_ext.executors import python
from celery_ext.executors.python import define

if TYPE_CHECKING:
    from celery import Celery
    from celery import Task as CeleryTask
    from celery.canvas import Signature, chunks, xmap, xstarmap
    from celery.result import AsyncResult

P = ParamSpec("P")
R = TypeVar("R")


class TaskFunction(Generic[P, R]):
    """A function registered as a task type, and the Celery task of that name.

    Calling it runs the function here and now, so unit tests of user code need no worker.  The
    Celery side is resolved on use, in the celery_ext app in use (``factory.current_app``: the
    worker's app in a worker; in a producer the current celery_ext app, else ``celery_ext.app``),
    where the task is the ``ExecutorTask`` that ``task.py`` registers for the name: a
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
        return f"<@task_type {self.name!r}: {self.fn.__module__}.{self.fn.__qualname__}>"

    # --- the Celery task --------------------------------------------------------------------

    @property
    def app(self) -> Celery:
        # Imported on use: a module that defines task functions imports only this one, and
        # calling a function directly must not load (or build) the framework.
        from celery_ext.factory import current_app

        return current_app()

    @property
    def task(self) -> CeleryTask[..., Any]:
        """The Celery task of this name in ``app`` (registered there if the app was built without
        it, e.g. when the module was imported after the app)."""
        app = self.app
        task = app.tasks.get(self.name)
        if task is None:
            from celery_ext.task import register_task_types  # imported on use, as above

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
        define(name, fn)
        return TaskFunction(name, fn)

    return decorate


echo = TaskFunction("echo", python.echo)
sleep = TaskFunction("sleep", python.sleep)
