from __future__ import annotations

import pytest

from celery_ext.errors import ConfigError, PermanentError
from celery_ext.executors.python import PythonExecutor, PythonSettings
from celery_ext.functions import task_type
from celery_ext.model import Task, new_id


def run(task_type_name: str, payload: dict) -> object:
    executor = PythonExecutor(PythonSettings())
    return executor.execute(Task(new_id(), task_type_name, payload))


def test_echo_and_sleep_are_builtin() -> None:
    executor = PythonExecutor()
    assert {"echo", "sleep"} <= set(executor.supported_task_types)
    assert run("echo", {"a": [1, 2]}).data == {"a": [1, 2]}  # type: ignore[attr-defined]
    assert run("sleep", {"seconds": 0}).data == {"slept": 0.0}  # type: ignore[attr-defined]


def test_bad_arguments_are_permanent_errors_naming_the_problem() -> None:
    with pytest.raises(PermanentError) as info:
        run("sleep", {"seconds": -1})
    assert info.value.reason == "invalid_payload" and "seconds" in str(info.value)

    @task_type("unit_two_args")
    def two(a: int, b: int) -> int:
        return a + b

    with pytest.raises(PermanentError, match="missing a required argument: 'b'"):
        run("unit_two_args", {"a": 1})
    assert run("unit_two_args", {"a": 1, "b": 2}).data == 3  # type: ignore[attr-defined]


def test_a_type_error_inside_the_function_is_not_blamed_on_the_payload() -> None:
    calls = []

    @task_type("unit_inner_type_error")
    def inner(a: int) -> int:
        calls.append(a)
        return a + "x"  # type: ignore[operator]

    with pytest.raises(TypeError, match="unsupported operand"):
        run("unit_inner_type_error", {"a": 1})
    assert calls == [1]
    with pytest.raises(PermanentError, match="unexpected keyword argument 'z'"):
        run("unit_inner_type_error", {"a": 1, "z": 2})
    assert calls == [1]  # a payload that does not fit never reaches the body


def test_same_name_from_another_function_is_refused() -> None:
    @task_type("unit_dupe")
    def first() -> None: ...

    with pytest.raises(ConfigError, match="already registered"):

        @task_type("unit_dupe")
        def second() -> None: ...


def test_modules_are_imported_and_bad_module_named() -> None:
    PythonExecutor(PythonSettings(modules=["tests.support.tasks"]))
    assert "flaky" in PythonExecutor().supported_task_types
    # Only a worker needs the modules: building the executor tolerates a failed import, and the
    # worker refuses to start on it (see tests/unit/test_functions.py and tests/e2e/test_worker_only_modules.py).
    bad = PythonExecutor(PythonSettings(modules=["no.such.module"]))
    assert bad.worker_problems() == ["modules: cannot import 'no.such.module': No module named 'no'"]


def test_an_executor_runs_its_own_table_of_functions() -> None:
    @task_type("unit_own_table")
    def double(n: int) -> int:
        return n * 2

    only = PythonExecutor(functions=[double])  # explicit, as arq's Worker(functions=...)
    assert only.supported_task_types == ["unit_own_table"] and only.functions == {"unit_own_table": double.fn}
    assert only.execute(Task(new_id(), "unit_own_table", {"n": 2})).data == 4  # type: ignore[attr-defined]
    with pytest.raises(PermanentError, match="no python function for 'echo'"):
        only.execute(Task(new_id(), "echo", {}))

    built_before = PythonExecutor()

    @task_type("unit_defined_later")
    def later() -> None: ...

    assert "unit_defined_later" not in built_before.supported_task_types  # its table is its own
    assert "unit_defined_later" in PythonExecutor().supported_task_types
