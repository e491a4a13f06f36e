"""Live config reload: a real worker process, its config.yaml rewritten while it runs."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from celery_ext.model import TaskStatus
from celery_ext.reload import changed_paths
from tests.conftest import TEST_TASKS, Cluster
from tests.support.scrape import poll
from tests.support.workers import WorkerProcess, write_config

pytestmark = pytest.mark.timeout(180)

FAST = {"heartbeat_interval": 0.5}


def rewrite(cluster: Cluster, **sections: Any) -> None:
    """Change sections of the worker's config file, a mapping key by key, a list whole (the
    worker notices by content)."""
    for key, value in sections.items():
        current = cluster.data.get(key)
        cluster.data[key] = {**current, **value} if isinstance(current, dict) else value
    write_config(cluster.tmp_path, cluster.data)


def entry(cluster: Cluster, worker_id: str) -> Any:
    registry = cluster.runtime.router.registry
    return next((w for w in registry.all() if w.id == worker_id), None)


def registered(cluster: Cluster, **kwargs: Any) -> tuple[WorkerProcess, str]:
    """A started worker, once it is in the registry, and its registry id."""
    w = cluster.worker(**kwargs)
    worker_id = w.hostname.replace("%h", socket.gethostname())
    poll(lambda: entry(cluster, worker_id) is not None, 30, "registration")
    return w, worker_id


def test_capacity_and_weight_change_live_and_the_rest_waits_for_a_restart(make_cluster) -> None:
    c = make_cluster(executors=TEST_TASKS, worker={**FAST, "capacity": 1})
    w, worker_id = registered(c, concurrency=1)
    before = entry(c, worker_id)
    assert (before.capacity, before.weight) == (1, 1)

    rewrite(c, worker={"capacity": 3, "weight": 5}, app={"max_payload_bytes": 1000})
    w.wait_for_log("reloaded: applied worker.capacity=3, worker.weight=5", 30)
    w.wait_for_log("app.max_payload_bytes: needs a worker restart", 10)
    poll(lambda: (entry(c, worker_id).capacity, entry(c, worker_id).weight) == (3, 5), 30, "new registry entry")
    assert entry(c, worker_id).config_version != before.config_version

    # Three slow tasks now run at once on the grown pool.
    tasks = [c.manager.submit("sleep", {"seconds": 3}) for _ in range(3)]
    poll(lambda: all(c.manager.get(t.task_id).status is TaskStatus.RUNNING for t in tasks), 20, "3 at once")
    for t in tasks:
        assert c.manager.wait(t.task_id, 30).status is TaskStatus.SUCCEEDED

    # And shrinks back (idle processes are let go).
    rewrite(c, worker={"capacity": 2})
    w.wait_for_log("reloaded: applied worker.capacity=2", 30)
    poll(lambda: entry(c, worker_id).capacity == 2, 30, "capacity 2")

    # An invalid file is refused with its path; the worker keeps its config and keeps working.
    rewrite(c, worker={"capacity": 0})
    w.wait_for_log("worker.capacity: must be >= 1 (got 0)", 30)
    assert entry(c, worker_id).capacity == 2
    assert c.manager.wait(c.manager.submit("echo", {"still": "here"}).task_id, 30).status is TaskStatus.SUCCEEDED


def test_command_line_capacity_wins_over_the_file(make_cluster) -> None:
    c = make_cluster(executors=TEST_TASKS, worker=FAST)
    w, worker_id = registered(c, extra_args=["--capacity", "2"])
    rewrite(c, worker={"capacity": 4, "weight": 2})
    w.wait_for_log("reloaded: applied worker.weight=2", 30)
    poll(lambda: entry(c, worker_id).weight == 2, 30, "new weight")
    assert entry(c, worker_id).capacity == 2


def test_changed_paths_names_nested_keys_and_whole_lists() -> None:
    from celery_ext.config import parse_config

    old = parse_config({"worker": {"capacity": 2}})
    new = parse_config(
        {
            "worker": {"capacity": 3},
            "scheduler": {"load_balance_config": {"field": "k"}},
            "executors": [{"type": "python", "config": {"modules": ["tests.support.tasks"]}}],
        }
    )
    assert changed_paths(old, new) == ["executors", "scheduler.load_balance_config.field", "worker.capacity"]
    assert changed_paths(new, new) == []


def test_autoscale_maximum_is_the_routing_capacity_and_pins_it(make_cluster) -> None:
    """Under Celery's ``--autoscale=MAX,MIN`` the pool grows to MAX as work comes (and Celery
    prefetches for MAX): the registry says MAX, and a config change of ``worker.capacity`` does
    not fight the autoscaler."""
    c = make_cluster(executors=TEST_TASKS, worker={**FAST, "capacity": 1})
    w, worker_id = registered(c, concurrency=1, extra_args=["--autoscale", "3,1"])
    assert entry(c, worker_id).capacity == 3
    tasks = [c.manager.submit("sleep", {"seconds": 4}) for _ in range(3)]
    poll(lambda: all(c.manager.get(t.task_id).status is TaskStatus.RUNNING for t in tasks), 30, "3 at once")
    rewrite(c, worker={"capacity": 2, "weight": 2})
    w.wait_for_log("reloaded: applied worker.weight=2", 30)
    poll(lambda: entry(c, worker_id).weight == 2, 30, "new weight")
    assert entry(c, worker_id).capacity == 3
    for t in tasks:
        assert c.manager.wait(t.task_id, 30).status is TaskStatus.SUCCEEDED


def test_capacity_lowered_while_every_pool_process_is_busy_shrinks_as_tasks_end(make_cluster) -> None:
    """Billiard stops only idle pool processes: a lower ``worker.capacity`` while all of them run
    tasks is applied at once to the registry and to what the worker fetches, and the pool shrinks
    as the tasks end (it used to fail: "Can't shrink pool. All processes busy!")."""
    c = make_cluster(executors=TEST_TASKS, worker={**FAST, "capacity": 3})
    w, worker_id = registered(c, concurrency=3)
    assert len(w.process_ids()) == 4
    tasks = [c.manager.submit("sleep", {"seconds": 5}) for _ in range(3)]
    poll(lambda: all(c.manager.get(t.task_id).status is TaskStatus.RUNNING for t in tasks), 30, "3 at once")
    rewrite(c, worker={"capacity": 1})
    w.wait_for_log("reloaded: applied worker.capacity=1", 30)
    # Applied while its processes were busy: the shrink waits for their tasks.
    assert "pool processes busy; shrinking to 1 as their tasks end" in w.log()
    poll(lambda: entry(c, worker_id).capacity == 1, 10, "capacity 1 in the registry")
    for t in tasks:
        assert c.manager.wait(t.task_id, 30).status is TaskStatus.SUCCEEDED
    poll(lambda: len(w.process_ids()) == 2, 30, "one pool process left")
    assert "could not apply worker.capacity" not in w.log()
    done = c.manager.wait(c.manager.submit("echo", {"after": 1}).task_id, 30)
    assert done.status is TaskStatus.SUCCEEDED
