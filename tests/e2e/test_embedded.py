"""The embedded broker runs while a celery_ext process uses it and stops with the last one
(issue 15 item 4); ``celery-ext embedded status|stop``."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.conftest import TEST_TASKS
from tests.e2e.test_cli import cli
from tests.support.services import unique
from tests.support.workers import WorkerProcess, write_config


def status(config: Path) -> dict:
    res = cli(config, "embedded", "status", "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_a_read_only_cli_call_leaves_no_server_running(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"app": {"name": unique("emb")}, "executors": TEST_TASKS})
    assert status(config)["running"] is False  # status itself starts nothing
    res = cli(config, "submit", "echo", '{"n": 1}', "--json")
    assert res.returncode == 0, res.stderr
    assert status(config) == {"running": False, "socket": str(tmp_path / ".celery_ext" / "redis.sock"), "users": []}
    # The message the CLI published waits in the append-only file for the worker.
    task_id = json.loads(res.stdout)["task_id"]
    worker = WorkerProcess(config, concurrency=1)
    try:
        worker.start()
        done = cli(config, "wait", task_id, "--timeout", "30", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["result"] == {"n": 1}
    finally:
        worker.stop()


def test_the_server_stops_with_its_last_user(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"app": {"name": unique("emb")}, "executors": TEST_TASKS})
    worker = WorkerProcess(config, concurrency=1)
    worker.start()
    try:
        now = status(config)
        assert now["running"] is True and worker.pid in now["users"]
        assert cli(config, "list", "--json").returncode == 0
        assert status(config)["running"] is True  # the worker still uses it
    finally:
        worker.stop()
    deadline = time.monotonic() + 10
    while status(config)["running"]:
        assert time.monotonic() < deadline, "the embedded broker outlived its last user"
        time.sleep(0.2)


def test_embedded_stop_stops_it(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"app": {"name": unique("emb")}, "executors": TEST_TASKS})
    worker = WorkerProcess(config, concurrency=1)
    worker.start()
    try:
        res = cli(config, "embedded", "stop", "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["stopped"] is True and json.loads(res.stdout)["running"] is False
    finally:
        worker.kill()


def test_embedded_commands_refuse_a_configured_broker(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"broker": {"url": "redis://127.0.0.1:6379/0"}})
    res = cli(config, "embedded", "status")
    assert res.returncode == 2 and "broker.url is set" in res.stderr


def test_delayed_tasks_run_on_the_embedded_default_with_only_a_worker(tmp_path: Path) -> None:
    """The worker runs a scheduler thread on the embedded default (scheduler.in_worker: auto):
    a delay longer than scheduler.max_countdown waits in storage and still runs, no other command."""
    config = write_config(tmp_path, {"app": {"name": unique("emb")}, "executors": TEST_TASKS})
    worker = WorkerProcess(config, concurrency=1)
    try:
        worker.start()
        res = cli(config, "submit", "echo", '{"later": true}', "--delay", "3", "--json")
        assert res.returncode == 0, res.stderr
        submitted = json.loads(res.stdout)
        assert submitted["status"] == "scheduled"
        done = cli(config, "wait", submitted["task_id"], "--timeout", "30", "--json")
        assert done.returncode == 0, done.stderr
        record = json.loads(done.stdout)
        assert record["status"] == "succeeded" and record["result"] == {"later": True}
        assert record["started_at"] >= record["run_at"]
    finally:
        worker.stop()
