from __future__ import annotations

import pytest

from celery_ext.errors import ConfigError
from celery_ext.executors.python import PythonExecutor
from celery_ext.registry import BALANCERS, EXECUTORS, STORAGE, import_path
from celery_ext.routing.base import LoadBalancer


def test_builtin_resolves() -> None:
    assert EXECUTORS.resolve("python") is PythonExecutor


def test_module_class_path_resolves() -> None:
    assert EXECUTORS.resolve("celery_ext.executors.python:PythonExecutor") is PythonExecutor


def test_unknown_name_suggests_and_lists_known() -> None:
    with pytest.raises(ConfigError) as info:
        EXECUTORS.resolve("pyhton", "executors[0].type")
    message = str(info.value)
    assert message.startswith("executors[0].type: no executor 'pyhton'; did you mean 'python'?")
    assert "known: " in message and "python" in message


def test_wrong_base_class_is_refused() -> None:
    with pytest.raises(ConfigError, match="not a subclass of Executor"):
        EXECUTORS.resolve("celery_ext.storage.sql:SqlStorage")


def test_unimportable_path_names_it() -> None:
    with pytest.raises(ConfigError, match="cannot import 'no_such_mod:X'"):
        import_path("no_such_mod:X")


def test_storage_names() -> None:
    assert {"sqlite", "postgresql", "mysql"} <= set(STORAGE.known())


def test_every_builtin_resolves_by_name() -> None:
    names = {"least_task", "weighted_round_robin", "affinity", "round_robin", "random", "consistent_hash"}
    assert names <= set(BALANCERS.known())
    for name in names:
        cls = BALANCERS.resolve(name)
        assert issubclass(cls, LoadBalancer) and cls.name == name
