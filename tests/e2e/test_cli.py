"""The ``celery-ext`` command line against a real worker: output shapes and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TEST_TASKS
from tests.support.services import unique
from tests.support.workers import WorkerProcess, subprocess_env, write_config


def cli(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery_ext.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=config.parent,
        env=subprocess_env(),
    )


@pytest.fixture(scope="module")
def running(shared_cluster):
    return shared_cluster.config_path


def test_submit_wait_json_exit_codes(running: Path) -> None:
    ok = cli(running, "submit", "echo", '{"a": 1}', "--wait", "--wait-timeout", "30", "--json")
    assert ok.returncode == 0, ok.stderr
    record = json.loads(ok.stdout)
    assert record["status"] == "succeeded" and record["result"] == {"a": 1} and record["attempt"] == 1
    assert set(record) >= {
        "task_id",
        "task_type",
        "payload",
        "status",
        "priority",
        "attempt",
        "max_retries",
        "timeout",
        "run_at",
        "worker_id",
        "result",
        "error",
        "idempotency_key",
        "created_at",
        "queued_at",
        "started_at",
        "finished_at",
    }

    failed = cli(running, "submit", "reject", '{"reason": "no"}', "--wait", "--json")
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["error"] == {"reason": "rejected", "message": "no"}

    accepted = cli(running, "submit", "echo", "{}", "--priority", "5", "--max-retries", "0", "--timeout", "9")
    assert accepted.returncode == 0 and len(accepted.stdout.strip()) == 32


def test_usage_and_validation_errors_exit_2(running: Path) -> None:
    unknown = cli(running, "submit", "no_such_type")
    assert unknown.returncode == 2 and "unknown task type 'no_such_type'" in unknown.stderr
    bad_json = cli(running, "submit", "echo", "{nope")
    assert bad_json.returncode == 2 and "PAYLOAD_JSON is not valid JSON" in bad_json.stderr
    not_object = cli(running, "submit", "echo", "[1]")
    assert not_object.returncode == 2 and "must be a JSON object" in not_object.stderr
    usage = cli(running, "submit")
    assert usage.returncode == 2
    missing = cli(running, "get", "f" * 32)
    assert missing.returncode == 2 and "no task with id" in missing.stderr


def test_get_list_logs_wait_cancel_retry(running: Path) -> None:
    key = unique("idem-")
    task_id = cli(running, "submit", "chatty", '{"lines": 2}', "--idempotency-key", key).stdout.strip()
    assert cli(running, "submit", "chatty", '{"lines": 2}', "--idempotency-key", key).stdout.strip() == task_id

    waited = cli(running, "wait", task_id, "--timeout", "30", "--json")
    assert waited.returncode == 0 and json.loads(waited.stdout)["status"] == "succeeded"
    got = json.loads(cli(running, "get", task_id, "--json").stdout)
    assert got["task_id"] == task_id and got["idempotency_key"] == key

    logs = json.loads(cli(running, "logs", task_id, "--json").stdout)
    assert [ln["message"] for ln in logs] == [
        "tests.tasks: line 0",
        "tests.tasks: line 1",
        "tests.tasks: done after 2 lines",
    ]
    assert cli(running, "logs", task_id).stdout.count("line") >= 2

    listed = json.loads(
        cli(running, "list", "--type", "chatty", "--status", "succeeded", "--limit", "500", "--json").stdout
    )
    assert task_id in [t["task_id"] for t in listed["items"]]
    assert all(t["status"] == "succeeded" and t["task_type"] == "chatty" for t in listed["items"])
    table = cli(running, "list", "--limit", "5")
    assert table.returncode == 0 and "status" in table.stdout

    delayed = cli(running, "submit", "echo", "{}", "--delay", "60").stdout.strip()
    ran_out = cli(running, "wait", delayed, "--timeout", "0.3")
    assert ran_out.returncode == 4 and f"task {delayed} still scheduled after 0.3s" in ran_out.stderr
    cancelled = cli(running, "cancel", delayed, "--json")
    assert json.loads(cancelled.stdout)["status"] == "cancelled"
    assert cli(running, "cancel", delayed).returncode == 2  # already finished
    assert cli(running, "wait", delayed, "--json").returncode == 1
    retried = cli(running, "retry", delayed, "--json")
    assert json.loads(retried.stdout)["status"] in ("queued", "running", "succeeded")
    assert json.loads(cli(running, "wait", delayed, "--timeout", "30", "--json").stdout)["status"] == "succeeded"


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return cli(path, "config", "validate", str(path))


def test_config_validate(tmp_path: Path) -> None:
    good = write_config(tmp_path, {"worker": {"capacity": 2}}, "good.yaml")
    ok = validate(good)
    assert ok.returncode == 0 and "valid" in ok.stdout
    bad = write_config(
        tmp_path,
        {"worker": {"capacity": 0, "colour": "red"}, "executors": [{"type": "pyhton"}], "storage": {"type": "mysql"}},
        "bad.yaml",
    )
    res = validate(bad)
    assert res.returncode == 2
    assert "worker.capacity: must be >= 1 (got 0)" in res.stderr
    assert "worker.colour: unknown key" in res.stderr


def test_config_validate_checks_extensions(tmp_path: Path) -> None:
    bad = write_config(tmp_path, {"executors": [{"type": "pyhton"}, {"type": "python", "config": {"modulez": []}}]})
    res = validate(bad)
    assert res.returncode == 2
    assert "executors[0].type: no executor 'pyhton'; did you mean 'python'?" in res.stderr
    assert "executors[1].config.modulez: unknown key" in res.stderr


def test_embedded_default_worker_and_cli_share_one_broker(tmp_path: Path) -> None:
    """No broker configured: the worker starts the embedded Redis, the CLI reuses it."""
    config = write_config(tmp_path, {"app": {"name": unique("emb")}, "executors": TEST_TASKS})
    worker = WorkerProcess(config, concurrency=1)
    try:
        worker.start()
        assert f"data in {tmp_path / '.celery_ext'}" in worker.log()
        res = cli(config, "submit", "echo", '{"embedded": true}', "--wait", "--wait-timeout", "30", "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["result"] == {"embedded": True}
        assert (tmp_path / ".celery_ext" / "celery_ext.db").exists()
    finally:
        worker.stop()
        from celery_ext.embedded import stop_embedded_redis

        stop_embedded_redis(tmp_path / ".celery_ext")
