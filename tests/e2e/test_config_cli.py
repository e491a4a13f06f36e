"""``celery-ext config validate``, ``config apply`` / ``config status`` and the design's role switches,
as real processes (issue 11)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from celery_ext.config import config_version, parse_config
from tests.conftest import TEST_TASKS
from tests.e2e.test_cli import cli, validate
from tests.support.schedulers import SchedulerProcess
from tests.support.scrape import poll
from tests.support.services import REDIS_HOST, REDIS_PORT, require, unique
from tests.support.workers import WorkerProcess, subprocess_env, write_config

DESIGN = Path(__file__).parents[1] / "fixtures" / "design_config.yaml"


def test_validate_reports_plugin_webhook_and_typo_in_one_run_with_suggestions(tmp_path: Path) -> None:
    bad = write_config(
        tmp_path,
        {
            "worker": {"capasity": 2, "supported_types": ["ech"]},
            "plugins": [{"name": "alrt"}, {"name": "alert", "config": {"webhook_url": "hooks.example.com/x"}}],
        },
    )
    res = validate(bad)
    assert res.returncode == 2
    lines = res.stderr.splitlines()
    assert "worker.capasity: unknown key; did you mean 'capacity'?" in lines
    assert any(x.startswith("plugins[0].name: no plugin 'alrt'; did you mean 'alert'?") for x in lines)
    assert "plugins[1].config.webhook_url: does not match ^https?:// (got 'hooks.example.com/x')" in lines
    assert any(
        x.startswith("warning: worker.supported_types[0]: no configured executor provides 'ech'; did you mean 'echo'?")
        for x in lines
    )
    assert "valid" not in res.stdout


def test_the_design_config_validates(tmp_path: Path) -> None:
    res = validate(DESIGN)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{DESIGN}: valid"
    assert "warning: worker.supported_types[0]: no configured executor provides 'send_email'" in res.stderr


def role(tmp_path: Path, command: str, section: str) -> subprocess.CompletedProcess[str]:
    require("Redis", REDIS_HOST, REDIS_PORT)
    config = write_config(
        tmp_path,
        {
            "app": {"name": unique("off")},
            "broker": {"url": f"redis://{REDIS_HOST}:{REDIS_PORT}/0"},
            section: {"enabled": False},
        },
    )
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "celery_ext", command],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=subprocess_env(CELERY_EXT_CONFIG=str(config)),
    )


def test_worker_enabled_false_runs_no_worker(tmp_path: Path) -> None:
    res = role(tmp_path, "worker", "worker")
    assert res.returncode == 0
    assert "worker.enabled is false" in res.stdout + res.stderr and "ready." not in res.stdout + res.stderr


def test_scheduler_enabled_false_runs_no_scheduler(tmp_path: Path) -> None:
    res = role(tmp_path, "scheduler", "scheduler")
    assert res.returncode == 0
    assert "scheduler.enabled is false" in res.stderr


def status(config: Path) -> dict[str, Any]:
    res = cli(config, "config", "status", "--json")
    assert res.returncode == 0, res.stderr
    data: dict[str, Any] = json.loads(res.stdout)
    return data


def on_version(config: Path, version: str, n: int) -> Callable[[], bool]:
    def check() -> bool:
        parts = status(config)["components"]
        return len(parts) == n and all(p["config_version"] == version and p["matches"] for p in parts)

    return check


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_config_apply_reaches_three_workers_and_a_scheduler_and_status_shows_it(make_cluster) -> None:
    c = make_cluster(executors=TEST_TASKS, worker={"heartbeat_interval": 0.5}, scheduler={"interval": 0.5})
    first = cli(c.config_path, "config", "apply", str(c.config_path))
    assert first.returncode == 0, first.stderr
    v0 = re.search(r"as version (\w+) of app", first.stdout).group(1)  # type: ignore[union-attr]
    assert v0 == config_version(parse_config(c.data))

    # Two workers run from the file, one from the key `config apply` wrote (the Redis loader).
    workers = [c.worker(concurrency=1), c.worker(concurrency=1)]
    keyed = WorkerProcess(c.config_path, concurrency=1)
    keyed.env["CELERY_EXT_CONFIG"] = f"redis://{REDIS_HOST}:{REDIS_PORT}/0#{c.data['app']['name']}.config"
    c.workers.append(keyed)
    workers.append(keyed.start())
    assert f"config redis://{REDIS_HOST}:{REDIS_PORT}/0#{c.data['app']['name']}.config |" in keyed.log()
    sched = SchedulerProcess(c).start()
    sched.wait_for_log("started", 60)
    poll(on_version(c.config_path, v0, 4), 60, "three workers and a scheduler on the first version")

    # Live keys: every process takes them, and runs the applied version.
    c.data["worker"] = {**c.data["worker"], "capacity": 3}
    c.data["scheduler"] = {**c.data["scheduler"], "interval": 0.4}
    second = write_config(c.tmp_path, c.data, "second.yaml")
    res = cli(c.config_path, "config", "apply", str(second))
    assert res.returncode == 0, res.stderr
    v1 = config_version(parse_config(c.data))
    assert f"as version {v1} of app" in res.stdout and v1 != v0
    for w in workers:
        w.wait_for_log("reloaded: applied worker.capacity=3", 60)
    sched.wait_for_log("reloaded: applied scheduler.interval", 60)
    poll(on_version(c.config_path, v1, 4), 60, "every process on the applied version")
    table = cli(c.config_path, "config", "status")
    assert table.returncode == 0 and f"applied version {v1} from {second}" in table.stdout
    assert table.stdout.count("applied") >= 5 and "scheduler" in table.stdout

    # A key no process can take live: reported by each, applied by none.
    c.data["worker"] = {**c.data["worker"], "task_lease": 20}
    third = write_config(c.tmp_path, c.data, "third.yaml")
    assert cli(c.config_path, "config", "apply", str(third)).returncode == 0
    v2 = config_version(parse_config(c.data))

    def waiting() -> bool:
        parts = status(c.config_path)["components"]
        return len(parts) == 4 and all(
            p["restart_needed"] == ["worker.task_lease"] and p["config_version"] == v1 and p["matches"] is False
            for p in parts
        )

    poll(waiting, 60, "worker.task_lease waiting for a restart everywhere")
    assert "worker.task_lease" in cli(c.config_path, "config", "status").stdout

    # A file that does not validate is not applied: the stored version stays.
    c.data["worker"] = {**c.data["worker"], "capacity": 0}
    bad = write_config(c.tmp_path, c.data, "bad.yaml")
    refused = cli(c.config_path, "config", "apply", str(bad))
    assert refused.returncode == 2 and "worker.capacity: must be >= 1 (got 0)" in refused.stderr
    assert status(c.config_path)["applied"]["version"] == v2
    assert sched.stop() == 0
