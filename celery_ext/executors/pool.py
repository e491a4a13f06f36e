"""The executors of one process: built from config without I/O, initialized lazily per process."""

from __future__ import annotations

import logging
import os
import threading

from celery_ext.config import Config
from celery_ext.errors import ConfigError
from celery_ext.executors.base import Executor
from celery_ext.registry import EXECUTORS

logger = logging.getLogger(__name__)


class ExecutorSet:
    """Maps each task type to the executor that owns it."""

    def __init__(self, executors: list[Executor], paths: list[str] | None = None) -> None:
        self.executors = executors
        # Where each executor comes from in config.yaml, for error messages.
        self.paths = paths or [f"executors ({ex.type})" for ex in executors]
        self.by_type: dict[str, Executor] = {}
        for ex in executors:
            for task_type in ex.supported_task_types:
                other = self.by_type.get(task_type)
                if other is not None and other is not ex:
                    raise ConfigError(
                        f"executors: task type {task_type!r} is claimed by both {other.type!r} and {ex.type!r}"
                    )
                self.by_type[task_type] = ex
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._unavailable: dict[int, str] = {}
        self._retired: list[Executor] = []  # replaced by a config reload, closed with the set

    @classmethod
    def from_config(cls, config: Config) -> ExecutorSet:
        executors, paths = [], []
        errors: list[str] = []
        for i, entry in enumerate(config.executors):
            if not entry.enabled:
                continue
            path = f"executors[{i}]"
            try:
                exec_cls = EXECUTORS.resolve(entry.type, f"{path}.type")
                settings = exec_cls.parse_settings(entry.config, f"{path}.config")
                executors.append(exec_cls(settings))
                paths.append(f"{path}.config")
            except ConfigError as exc:
                errors.extend(exc.errors)
        if errors:
            raise ConfigError(errors)
        return cls(executors, paths)

    @property
    def task_types(self) -> list[str]:
        return sorted(self.by_type)

    def get(self, task_type: str) -> Executor | None:
        return self.by_type.get(task_type)

    def worker_problems(self) -> list[str]:
        """Why a worker of these executors cannot run what it would advertise, one line per problem
        with its config path (``Executor.worker_problems``); empty when it can.  Building an
        ``ExecutorSet`` never fails for these (clients do not need the workers' code): the worker
        bootstep checks them at start."""
        return [
            f"{path}.{problem}"
            for ex, path in zip(self.executors, self.paths, strict=True)
            for problem in ex.worker_problems()
        ]

    def ready(self, executor: Executor) -> str | None:
        """Initialize every executor once in this process; return why ``executor`` is unusable."""
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._initialize_all()
        return self._unavailable.get(id(executor))

    def _initialize_all(self) -> None:
        self._unavailable = {}
        for ex in self.executors:
            try:
                ex.initialize(ex.settings)
            except Exception as exc:  # noqa: BLE001 - one broken executor must not stop the worker
                reason = f"executor {ex.type!r} failed to initialize: {exc.__class__.__name__}: {exc}"
                logger.error("%s; its tasks will fail with reason executor_unavailable", reason)
                self._unavailable[id(ex)] = reason
        self._pid = os.getpid()

    def replace(self, other: ExecutorSet) -> None:
        """Take ``other``'s executors in place (a config reload; the runner, the manager and the
        runtime hold this object).  Each process initializes them at its next task; a task
        running on an old executor finishes on it (in this process they close with the set)."""
        with self._lock:
            if self._pid == os.getpid():
                self._retired.extend(self.executors)
            self.executors, self.paths, self.by_type = other.executors, other.paths, other.by_type
            self._unavailable = {}
            self._pid = None

    def close(self) -> None:
        if self._pid != os.getpid():
            return
        for ex in [*self._retired, *self.executors]:
            try:
                ex.close()
            except Exception:  # noqa: BLE001
                logger.exception("executor %r failed to close", ex.type)
        self._retired.clear()
        self._pid = None
