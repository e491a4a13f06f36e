"""``@task_type`` functions are Celery tasks of the celery_ext app in use, and still plain
functions when called (no worker, no storage, no broker: these tests use a ``memory://`` app)."""

from __future__ import annotations

import inspect
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery, chord
from celery._state import _set_current_app, get_current_app
from celery.canvas import Signature, _chain

from celery_ext import task_type as public_task_type
from celery_ext.config import parse_config
from celery_ext.errors import ConfigError
from celery_ext.executors.python import PythonExecutor, PythonSettings
from celery_ext.factory import create_app, current_app
from celery_ext.functions import TaskFunction, echo, task_type
from celery_ext.runtime import runtime_of
from celery_ext.task import ExecutorTask
from tests.support.tasks import add, tsum
from tests.support.workers import subprocess_env


def memory_app(directory: Path, name: str = "unit") -> Celery:
    """A real celery_ext app that needs no server: in-memory broker, SQLite in ``directory``."""
    config = parse_config(
        {
            "app": {"name": name, "data_dir": str(directory)},
            "broker": {"url": "memory://"},
            "storage": {"type": "sqlite", "config": {}},
            "executors": [{"type": "python", "config": {"modules": ["tests.support.tasks"]}}],
        },
        source=str(directory / "config.yaml"),
    )
    return create_app(config)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Celery]:
    app = memory_app(tmp_path)
    yield app
    runtime_of(app).storage.close()


def test_public_import_is_the_decorator() -> None:
    assert public_task_type is task_type


def test_a_direct_call_runs_the_function_without_any_app(tmp_path: Path) -> None:
    """In a fresh process whose config cannot even be read: calling never builds an app."""
    code = (
        "from tests.support.tasks import add, tsum\n"
        "from celery_ext.functions import echo\n"
        "import celery_ext.factory as f\n"
        "assert add(2, 3) == 5 and add(x=1, y=2) == 3 and tsum([1, 2, 3]) == 6 and echo(a=1) == {'a': 1}\n"
        "assert add.name == 'add'\n"
        "assert f._latest is None and f._default is None, 'an app was built'\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=subprocess_env(CELERY_EXT_CONFIG=str(tmp_path / "missing.yaml")),
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_it_looks_like_the_function() -> None:
    assert isinstance(add, TaskFunction) and add.name == "add"
    assert add.__name__ == "add" and add.__module__ == "tests.support.tasks"
    assert add.__doc__ and "Positional-friendly" in add.__doc__
    assert str(inspect.signature(add)) == "(x: 'int', y: 'int') -> 'int'"
    assert add(2, 3) == 5 and echo(a=[1]) == {"a": [1]}
    assert repr(add) == "<@task_type 'add': tests.support.tasks.add>"


def test_signatures_name_args_and_task(app: Celery) -> None:
    sig = add.s(2, 2)
    assert isinstance(sig, Signature)
    assert (sig.task, sig.args, sig.kwargs, sig.immutable) == ("add", (2, 2), {}, False)
    # The Celery task is the ExecutorTask celery_ext registers for the type, in the app in use.
    assert sig.type is app.tasks["add"] and isinstance(sig.type, ExecutorTask) and sig.app is app
    assert add.task is app.tasks["add"] and add.app is app

    assert add.si(1, 2).immutable is True
    full = add.signature([1], {"y": 2}, countdown=3)
    assert (full.args, full.kwargs, full.options) == ((1,), {"y": 2}, {"countdown": 3})
    assert echo.s(a=1).kwargs == {"a": 1} and echo.s().task == "echo"

    flow = add.s(2, 2) | add.s(4)  # a mutable second step: the first result is prepended
    assert isinstance(flow, _chain) and [(t.task, t.args) for t in flow.tasks] == [("add", (2, 2)), ("add", (4,))]
    both = chord([add.s(1, 1), add.s(2, 2)], tsum.s())
    assert both.body.task == "tsum" and [t.task for t in both.tasks] == ["add", "add"]


def test_the_app_in_use_is_the_latest_unless_one_is_set_current(tmp_path: Path) -> None:
    first, second = memory_app(tmp_path / "a", "unit-a"), memory_app(tmp_path / "b", "unit-b")
    previous = get_current_app()
    try:
        assert current_app() is second and add.s(1, 1).type.app is second
        first.set_current()  # Celery's own way to choose: it wins over the latest
        assert current_app() is first and add.task is first.tasks["add"]
        Celery("plain", set_as_current=True)  # not a celery_ext app: ignored
        assert current_app() is second
    finally:
        _set_current_app(previous)
        for a in (first, second):
            runtime_of(a).storage.close()


def test_a_type_registered_after_the_app_was_built_becomes_its_task(app: Celery) -> None:
    @task_type("unit_late")
    def late(n: int) -> int:
        return n * 2

    assert "unit_late" not in app.tasks
    assert late.s(3).task == "unit_late"
    assert isinstance(app.tasks["unit_late"], ExecutorTask) and late(4) == 8


def test_duplicate_names_are_refused_and_the_same_function_is_not() -> None:
    def once(a: int) -> int:
        return a

    first = task_type("unit_same")(once)
    assert task_type("unit_same")(once).fn is first.fn  # a module imported twice
    assert task_type("unit_alias")(first).fn is once  # a task function under a second name
    with pytest.raises(ConfigError, match=r"task type 'unit_same' is already registered by .*once"):

        @task_type("unit_same")
        def other(a: int) -> int:
            return a


def test_declared_types_and_what_only_a_worker_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "unit_broken_mod.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    caplog.set_level(logging.DEBUG, logger="celery_ext.executors.python")

    # A client: modules that do not import are no error; declared types are known anyway.
    ex = PythonExecutor(PythonSettings(modules=["no_such_pkg.tasks", "unit_broken_mod"], task_types=["ghost"]))
    assert "ghost" in ex.supported_task_types and "echo" in ex.supported_task_types
    levels = {r.getMessage(): r.levelno for r in caplog.records}
    assert levels["python executor: module 'no_such_pkg.tasks' is not installed in this process"] == logging.DEBUG
    assert levels["python executor: cannot import 'unit_broken_mod': RuntimeError: boom at import"] == logging.WARNING
    # A worker: each is a reason to refuse to start.
    assert ex.worker_problems() == [
        "modules: cannot import 'no_such_pkg.tasks': No module named 'no_such_pkg'",
        "modules: cannot import 'unit_broken_mod': RuntimeError: boom at import",
    ]

    declared = PythonExecutor(PythonSettings(modules=["tests.support.tasks"], task_types=["add", "ghost"]))
    assert declared.worker_problems() == [
        "task_types: 'ghost' declared, but no @task_type function of that name was registered by the modules "
        "(tests.support.tasks)"
    ]
    assert PythonExecutor(PythonSettings(modules=["tests.support.tasks"], task_types=["add"])).worker_problems() == []
    with pytest.raises(ConfigError, match="task_types"):
        PythonExecutor.parse_settings({"task_types": [" add"]}, "executors[0].config")


def test_config_validate_warns_about_modules_only_a_worker_needs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from celery_ext.cli import main

    path = tmp_path / "config.yaml"
    path.write_text("executors:\n  - type: python\n    config: {modules: [no_such_pkg.tasks], task_types: [t1]}\n")
    assert main(["config", "validate", str(path)]) == 0
    err = capsys.readouterr().err
    assert (
        "warning: executors[0].config.modules: cannot import 'no_such_pkg.tasks': No module named "
        "'no_such_pkg' (a worker with this config would refuse to start)"
    ) in err
