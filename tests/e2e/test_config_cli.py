"""``celery-ext config validate`` and the design's role switches, as real processes (issue 11)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.e2e.test_cli import validate
from tests.support.services import REDIS_HOST, REDIS_PORT, require, unique
from tests.support.workers import subprocess_env, write_config

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
