"""The README's executor recipe, run as written in a real worker; a plain pydantic ``BaseModel``
settings class refused at config validation; the CLI's payload sources, option bounds,
``cancel --terminate`` and its one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import TEST_TASKS
from tests.support.workers import subprocess_env

ROOT = Path(__file__).resolve().parents[2]


def readme_recipe() -> tuple[str, dict[str, Any]]:
    """The Python block that starts ``# myapp/reverse.py`` and the YAML block after it."""
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(# myapp/reverse\.py\n.*?)```", text, re.S)
    assert code, "the README lost its executor recipe"
    config = re.search(r"```yaml\n(.*?)```", text[code.end() :], re.S)
    assert config
    return code.group(1), yaml.safe_load(config.group(1))


def write_package(directory: Path, code: str) -> Path:
    package = directory / "myapp"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "reverse.py").write_text(code)
    return directory


def env_with(path: Path) -> dict[str, str]:
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(path), env["PYTHONPATH"]])
    return env


def cli(
    config: Path, *args: str, env: dict[str, str] | None = None, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery_ext.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=config.parent,
        env=env or subprocess_env(),
        input=stdin,
    )


def test_the_readme_executor_recipe_runs_as_written(make_cluster: Any) -> None:
    code, section = readme_recipe()
    c = make_cluster(executors=[*TEST_TASKS, *section["executors"]])
    path = write_package(c.tmp_path, code)
    env = env_with(path)
    c.worker(env={"PYTHONPATH": env["PYTHONPATH"]})
    assert cli(c.config_path, "config", "validate", env=env).returncode == 0
    done = cli(
        c.config_path, "submit", "reverse", '{"text": "abc"}', "--wait", "--wait-timeout", "30", "--json", env=env
    )
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["result"] == "CBA" and record["max_retries"] == 2 and record["timeout"] == 30
    bad = cli(c.config_path, "submit", "reverse", '{"text": 1}', "--wait", "--wait-timeout", "30", "--json", env=env)
    assert bad.returncode == 1 and json.loads(bad.stdout)["error"]["reason"] == "invalid_payload"


def test_a_plain_basemodel_settings_class_is_refused_at_validation(tmp_path: Path) -> None:
    code, section = readme_recipe()
    plain = code.replace("class ReverseSettings(ExecutorSettings):", "class ReverseSettings(BaseModel):")
    plain = plain.replace("from celery_ext import", "from pydantic import BaseModel\n\nfrom celery_ext import")
    env = env_with(write_package(tmp_path, plain))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"executors": section["executors"]}))
    for args in (("config", "validate"), ("submit", "reverse", '{"text": "abc"}')):
        res = cli(config, *args, env=env)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert "executors[0].config: executor 'reverse'" in res.stderr
        assert "settings_model ReverseSettings must subclass celery_ext.ExecutorSettings" in res.stderr
        assert "Traceback" not in res.stderr


@pytest.fixture(scope="module")
def running(shared_cluster: Any) -> Path:
    return shared_cluster.config_path  # type: ignore[no-any-return]


def test_payload_from_a_file_or_stdin_even_past_the_argument_limit(running: Path, tmp_path: Path) -> None:
    big = {"blob": "x" * 300_000}  # over one argument's limit (MAX_ARG_STRLEN, 128 KiB)
    cap = running.parent / "big.yaml"
    data = yaml.safe_load(running.read_text())
    data.setdefault("app", {})["max_payload_bytes"] = 1_000_000
    cap.write_text(yaml.safe_dump(data))
    payload = tmp_path / "payload.json"
    payload.write_text(json.dumps(big))
    from_file = cli(cap, "submit", "echo", f"@{payload}", "--wait", "--wait-timeout", "30", "--json")
    assert from_file.returncode == 0, from_file.stderr
    assert json.loads(from_file.stdout)["result"] == big
    from_stdin = cli(cap, "submit", "echo", "-", "--wait", "--wait-timeout", "30", "--json", stdin=json.dumps(big))
    assert from_stdin.returncode == 0 and json.loads(from_stdin.stdout)["payload"] == big
    with pytest.raises(OSError):  # what the file and stdin are for
        subprocess.run(["true", json.dumps(big)], check=False)

    missing = cli(running, "submit", "echo", f"@{tmp_path / 'nope.json'}")
    assert missing.returncode == 2 and "cannot read payload file" in missing.stderr
    broken = cli(running, "submit", "echo", "-", stdin="{nope")
    assert broken.returncode == 2 and "the payload on standard input is not valid JSON" in broken.stderr


def test_options_out_of_range_name_the_option(running: Path) -> None:
    for args, expected in [
        (("--priority", "-5"), "argument --priority: must be an integer 0..9 (got -5)"),
        (("--priority", "10"), "argument --priority: must be an integer 0..9 (got 10)"),
        (("--max-retries", "-1"), "argument --max-retries: must be an integer >= 0 (got -1)"),
        (("--timeout", "0"), "argument --timeout: must be a number > 0 (got 0)"),
        (("--delay", "inf"), "argument --delay: must be a number >= 0 (got inf)"),
    ]:
        res = cli(running, "submit", "echo", "{}", *args)
        assert res.returncode == 2 and expected in res.stderr, (args, res.stderr)
        assert "invalid payload" not in res.stderr


def test_cancel_terminate_kills_the_running_task(shared_cluster: Any) -> None:
    from tests.support.scrape import poll

    running = shared_cluster.config_path
    task_id = cli(running, "submit", "sleep", '{"seconds": 60}', "--max-retries", "0").stdout.strip()
    for _ in range(300):
        if json.loads(cli(running, "get", task_id, "--json").stdout)["status"] == "running":
            break
    res = cli(running, "cancel", task_id, "--terminate", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["status"] == "cancelled"
    waited = cli(running, "wait", task_id, "--timeout", "5", "--json")
    assert json.loads(waited.stdout)["status"] == "cancelled"
    worker = shared_cluster.workers[0]  # Celery's revoke(terminate=True) reached it
    poll(lambda: f"Terminating {task_id}" in worker.log(), 20, "the worker to terminate the task")


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from celery_ext.cli import main, tasks_cmd

    def broken(args: Any) -> int:
        raise RuntimeError("the disk is on fire\nsecond line")

    monkeypatch.setattr(tasks_cmd, "cmd_get", broken)
    assert main(["get", "abc"]) == 1
    err = capsys.readouterr().err
    assert err == "error: unexpected RuntimeError: the disk is on fire (run with --debug for the traceback)\n"
    for argv in (["--debug", "get", "abc"], ["get", "abc", "--debug"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("Traceback (most recent call last):") and "RuntimeError: the disk is on fire" in err
