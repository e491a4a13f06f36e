"""Live config changes beyond capacity and weight (issue 11 item 3), on real worker processes:
executor settings, supported_types, and a key that waits for a restart."""

from __future__ import annotations

import time
from typing import Any

import pytest

from celery_ext.config import WorkerConfig, config_version, parse_config
from celery_ext.model import TaskStatus
from tests.conftest import TEST_TASKS
from tests.integration.test_config_reload import FAST, entry, registered, rewrite
from tests.support.httpserver import HttpTestServer
from tests.support.scrape import free_port, poll, scrape

pytestmark = pytest.mark.timeout(240)


def http(allow_hosts: list[str]) -> dict[str, Any]:
    return {"type": "http", "config": {"allow_networks": ["127.0.0.1/32"], "allow_hosts": allow_hosts}}


def test_http_allowlist_tightened_live_refuses_the_next_task(make_cluster, server: HttpTestServer) -> None:
    c = make_cluster(executors=[http(["127.0.0.1"])], worker=FAST)
    w = c.worker(concurrency=2)
    first = c.manager.wait(c.manager.submit("http_request", {"url": server.url("/json")}).task_id, 60)
    assert first.status is TaskStatus.SUCCEEDED, first.error

    # A request in flight while the executors are rebuilt finishes on the old settings.
    slow = c.manager.submit("http_request", {"url": server.url("/slow?seconds=4")})
    poll(lambda: c.manager.get(slow.task_id).status is TaskStatus.RUNNING, 30, "the slow request running")
    rewrite(c, executors=[http(["api.example.com"])])
    w.wait_for_log("reloaded: applied executors=", 30)
    w.wait_for_log("pool processes replaced: the new config is in effect", 60)
    assert c.manager.wait(slow.task_id, 60).status is TaskStatus.SUCCEEDED

    refused = c.manager.wait(c.manager.submit("http_request", {"url": server.url("/json")}).task_id, 60)
    assert refused.status is TaskStatus.FAILED
    assert refused.error is not None and refused.error.reason == "destination_not_allowed"
    assert "not in allow_hosts" in refused.error.message
    assert server.seen.count({"method": "GET", "path": "/json"}) == 1  # the refused one never left

    # An executor setting that does not validate is refused; the worker keeps the tight list.
    rewrite(c, executors=[{"type": "http", "config": {"allow_hosts": ["127.0.0.1"], "request_timeout": -1}}])
    w.wait_for_log("could not apply executors", 30)
    again = c.manager.wait(c.manager.submit("http_request", {"url": server.url("/json")}).task_id, 60)
    assert again.status is TaskStatus.FAILED and again.error is not None
    assert again.error.reason == "destination_not_allowed"


def test_supported_types_change_moves_consumption(make_cluster) -> None:
    c = make_cluster(executors=TEST_TASKS, worker={**FAST, "supported_types": ["echo"]})
    w, worker_id = registered(c, concurrency=1)
    assert entry(c, worker_id).supported_types == ("echo",)

    # No worker runs "add": it waits in its shared queue ...
    waiting = c.manager.submit("add", {"x": 1, "y": 2})
    time.sleep(2)
    assert c.manager.get(waiting.task_id).status is not TaskStatus.SUCCEEDED
    # ... until the worker takes the type on, and gives echo up.
    rewrite(c, worker={"supported_types": ["add"]})
    w.wait_for_log("reloaded: applied worker.supported_types=['add']", 30)
    done = c.manager.wait(waiting.task_id, 60)
    assert done.status is TaskStatus.SUCCEEDED and done.result == 3
    poll(lambda: entry(c, worker_id).supported_types == ("add",), 30, "the registry entry follows")

    echo = c.manager.submit("echo", {"left": "behind"})
    time.sleep(3)  # long enough for a consuming worker to run it many times over
    assert c.manager.get(echo.task_id).status is not TaskStatus.SUCCEEDED
    assert "Canceling queue" in w.log()

    # An unknown type is refused with the known ones; the worker keeps consuming "add".
    rewrite(c, worker={"supported_types": ["add", "nope"]})
    w.wait_for_log("worker.supported_types: unknown task type(s) 'nope'", 30)
    assert c.manager.wait(c.manager.submit("add", {"x": 2, "y": 2}).task_id, 60).result == 4


def test_a_restart_only_key_is_reported_and_not_applied(make_cluster) -> None:
    c = make_cluster(executors=TEST_TASKS, worker={**FAST, "capacity": 1})
    w, worker_id = registered(c, concurrency=1)
    before = entry(c, worker_id)
    assert before.restart_needed == ()

    # One change: a live key, a restart-only key, and executors whose task types would change.
    extra = [*TEST_TASKS, http(["127.0.0.1"])]
    rewrite(c, worker={"capacity": 2, "task_lease": 20}, executors=extra)
    w.wait_for_log("reloaded: applied worker.capacity=2", 30)
    w.wait_for_log("executors cannot change live (the task types would change", 10)
    w.wait_for_log("changed executors, worker.task_lease: needs a worker restart", 10)
    poll(lambda: entry(c, worker_id).restart_needed == ("executors", "worker.task_lease"), 30, "restart_needed")
    # Only the capacity was taken: the version is that of the old config with the new capacity.
    kept = {k: v for k, v in c.data["worker"].items() if k != "task_lease"}  # the default lease
    running = parse_config({**c.data, "executors": TEST_TASKS, "worker": kept})
    assert entry(c, worker_id).config_version == config_version(running)
    assert entry(c, worker_id).capacity == 2
    assert "http_request" not in entry(c, worker_id).supported_types

    # Changed back, nothing waits for a restart any more.
    rewrite(c, worker={"task_lease": WorkerConfig.model_fields["task_lease"].default}, executors=TEST_TASKS)
    poll(lambda: entry(c, worker_id).restart_needed == (), 30, "nothing waits")
    assert entry(c, worker_id).config_version == config_version(running)


def serving(port: int) -> bool:
    try:
        scrape(port)
    except OSError:
        return False
    return True


def test_plugins_enabled_reconfigured_and_disabled_live(make_cluster) -> None:
    first, second = free_port(), free_port()
    # The collector is chosen at start (a restart-only key): prometheus, for the plugin to come.
    c = make_cluster(executors=TEST_TASKS, worker=FAST, metrics={"type": "prometheus"})
    w, _ = registered(c, concurrency=1)
    assert not serving(first)

    # Enabled: the metrics endpoint comes up and counts tasks.
    rewrite(c, plugins=[{"name": "metrics", "config": {"prometheus_port": first}}])
    w.wait_for_log("plugins now running: metrics", 30)
    poll(lambda: serving(first), 30, "the metrics endpoint")
    # Re-configured: it moves to another port.
    rewrite(c, plugins=[{"name": "metrics", "config": {"prometheus_port": second}}])
    poll(lambda: serving(second) and not serving(first), 30, "the endpoint on the new port only")
    # A list that does not check is refused: the running plugin stays.
    rewrite(c, plugins=[{"name": "metrics", "config": {"prometheus_port": second}}, {"name": "alrt"}])
    w.wait_for_log("plugins[1].name: no plugin 'alrt'", 30)
    assert serving(second)
    # Disabled: the endpoint goes away; the worker works on.
    rewrite(c, plugins=[{"name": "metrics", "enabled": False, "config": {"prometheus_port": second}}])
    w.wait_for_log("plugins now running: none", 30)
    poll(lambda: not serving(second), 30, "the endpoint gone")
    assert c.manager.wait(c.manager.submit("echo", {"still": "here"}).task_id, 60).status is TaskStatus.SUCCEEDED
