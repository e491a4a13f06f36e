"""Plugins hosted by a real worker: the alert webhook, a broken plugin, a plugin by entry point."""

from __future__ import annotations

import hashlib
import hmac
import os
import subprocess
import sys
from pathlib import Path

import pytest

from celery_ext.model import TaskStatus
from celery_ext.plugins.alert import SIGNATURE_HEADER
from tests.support.receiver import WebhookReceiver
from tests.support.scrape import poll

TASKS = [{"type": "python", "config": {"modules": ["tests.support.event_tasks"]}}]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def receiver():
    r = WebhookReceiver()
    yield r
    r.close()


def test_alert_posts_one_signed_call_per_failed_task(make_cluster, receiver) -> None:
    c = make_cluster(
        executors=TASKS,
        plugins=[
            {"name": "alert", "config": {"webhook_url": receiver.url, "secret": "s3cret", "dedupe_window": "10m"}}
        ],
    )
    w = c.worker(concurrency=2)
    failed = [c.manager.submit("doomed", {"reason": f"r{i}"}) for i in range(3)]
    ok = [c.manager.submit("whoami") for _ in range(3)]
    for t in failed + ok:
        c.manager.wait(t.task_id, 30)
    poll(lambda: len(receiver.of_type("task_failed")) >= 3, 20, "three alerts")
    w.stop()  # flushes the bus: anything still in flight would be sent now
    poll(lambda: len(receiver.of_type("worker_offline")) == 1, 20, "worker_offline alert")

    calls = receiver.of_type("task_failed")
    assert sorted(call["json"]["event"]["task_id"] for call in calls) == sorted(t.task_id for t in failed)
    for call in calls:
        expected = "sha256=" + hmac.new(b"s3cret", call["body"], hashlib.sha256).hexdigest()
        assert call["headers"][SIGNATURE_HEADER.lower()] == expected
        assert call["json"]["event"]["data"]["reason"].startswith("r")
    assert len(receiver.calls) == 4  # three failures and the worker going offline, nothing else


def test_plugin_failing_in_start_is_reported_and_worker_runs_tasks(make_cluster) -> None:
    c = make_cluster(
        executors=TASKS,
        plugins=[
            {"name": "tests.support.plugins:BoomOnStartPlugin"},
            {"name": "alert", "config": {}},  # invalid: webhook_url is required
            {"name": "tests.support.plugins:BoomOnEventPlugin"},
        ],
    )
    w = c.worker(concurrency=2)
    t = c.manager.submit("whoami")
    assert c.manager.wait(t.task_id, 30).status is TaskStatus.SUCCEEDED
    log = w.log()
    assert "plugin 'boom' failed in start and is disabled: RuntimeError: boom in start" in log
    assert "plugin 'alert' failed in load" in log and "plugins[1].config.webhook_url" in log
    assert "plugin 'boom_handler'" in log and "started" in log
    poll(lambda: "handler exploded" in w.log(), 20, "the failing handler to be logged")
    assert w.alive()


def test_third_party_plugin_installed_by_entry_point_starts_from_config(make_cluster, tmp_path) -> None:
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(ROOT / "tests" / "fixtures" / "hello_plugin"),
        ],
        check=True,
    )
    out = tmp_path / "hello.txt"
    c = make_cluster(executors=TASKS, plugins=[{"name": "hello", "config": {"path": str(out), "greeting": "bonjour"}}])
    pythonpath = os.pathsep.join([str(ROOT), str(site)])
    w = c.worker(concurrency=2, env={"PYTHONPATH": pythonpath})
    t = c.manager.submit("whoami")
    assert c.manager.wait(t.task_id, 30).status is TaskStatus.SUCCEEDED
    poll(lambda: out.exists() and f"task_completed {t.task_id}" in out.read_text(), 20, "the plugin's line")
    assert out.read_text().startswith("started ") and "greeting=bonjour" in out.read_text()
    w.stop()
    assert out.read_text().rstrip().endswith("stopped")
    # Seen once, by the main process: pool children do not run the main process's handlers.
    assert out.read_text().count(f"task_completed {t.task_id}") == 1
