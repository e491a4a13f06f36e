"""Events of real tasks on real workers, received by a subscriber in this (another) process."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import redis

from celery_ext.config import parse_config
from celery_ext.events import ALL, Event, EventBus, build_event_bus
from celery_ext.model import TaskStatus
from tests.integration.test_celery_native import cli
from tests.support.scrape import poll
from tests.support.services import RABBIT_URL, REDIS_HOST, REDIS_PORT, require, unique

TASKS = [{"type": "python", "config": {"modules": ["tests.support.event_tasks"]}}]


class Collector:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self.lock:
            self.events.append(event)

    def types_of(self, task_id: str) -> list[str]:
        """In the order they happened: events from different processes may arrive out of order."""
        with self.lock:
            return [e.type for e in sorted(self.events, key=lambda e: e.timestamp) if e.task_id == task_id]

    def of_type(self, kind: str) -> list[Event]:
        with self.lock:
            return [e for e in self.events if e.type == kind]


def subscriber(cluster: Any, **config: Any) -> EventBus:
    """A bus of its own, as a separate subscriber process would build from the same config."""
    data = {
        **cluster.data,
        "events": {**cluster.data["events"], "config": {**cluster.data["events"].get("config", {}), **config}},
    }
    cfg = parse_config(data)
    return build_event_bus(cfg, cfg.broker.url or "")


def run_and_check(cluster: Any, bus: EventBus) -> None:
    seen = Collector()
    bus.subscribe(ALL, seen)
    worker = cluster.worker()
    ok = cluster.manager.submit("whoami")
    bad = cluster.manager.submit("doomed", {"reason": "nope"})
    batch = cluster.manager.submit_many([{"task_type": "whoami"}] * 2)
    assert cluster.manager.wait(ok.task_id, 30).status is TaskStatus.SUCCEEDED
    assert cluster.manager.wait(bad.task_id, 30).status is TaskStatus.FAILED
    for t in batch:
        assert cluster.manager.wait(t.task_id, 30).status is TaskStatus.SUCCEEDED
    outcomes = [(ok, "task_completed"), (bad, "task_failed"), *((t, "task_completed") for t in batch)]
    poll(lambda: all(len(seen.types_of(t.task_id)) >= 4 for t, _ in outcomes), 20, "task events")
    # Each process's events arrive in its order: the producer's created then queued, the worker's
    # started then its end.  Not across the two: the producer's come after the publish (a
    # PostgreSQL insert's outcome is read after it), and each process's sender batches its own.
    for task, last in outcomes:
        types = seen.types_of(task.task_id)
        assert sorted(types) == sorted(["task_created", "task_queued", "task_started", last]), types
        assert types.index("task_created") < types.index("task_queued"), types
        assert types.index("task_started") < types.index(last), types
    # Written queued before the publish on a Redis broker; pending, then marked, on RabbitMQ.
    written = "queued" if cluster.data["broker"]["url"].startswith("redis") else "pending"
    assert {e.data["status"] for e in seen.of_type("task_created")} == {written}
    failed = seen.of_type("task_failed")[0]
    assert failed.data["reason"] == "nope" and failed.data["task_type"] == "doomed"
    assert failed.worker_id and failed.worker_id.startswith(worker.hostname.split("@")[0])
    assert seen.of_type("worker_online")
    worker.stop()
    poll(lambda: bool(seen.of_type("worker_offline")), 20, "worker_offline")
    assert seen.of_type("worker_offline")[0].worker_id == failed.worker_id
    assert bus.stats.handler_errors == 0
    bus.close()


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_kombu_bus_carries_task_and_worker_events(make_cluster, redis_url, broker) -> None:
    url = redis_url
    if broker == "rabbitmq":
        require("RabbitMQ", "127.0.0.1", 5672)
        url = RABBIT_URL
    c = make_cluster(executors=TASKS, broker={"url": url}, events={"type": "kombu"})
    run_and_check(c, subscriber(c))


def test_redis_bus_carries_task_and_worker_events(make_cluster) -> None:
    c = make_cluster(executors=TASKS, events={"type": "redis"})
    run_and_check(c, subscriber(c))


def test_redis_bus_subscriber_gets_what_it_missed_while_down(make_cluster) -> None:
    c = make_cluster(executors=TASKS, events={"type": "redis", "config": {"maxlen": 1000}})
    c.worker()
    group = unique("g")
    first, seen = subscriber(c, group=group, consumer="c1"), Collector()
    first.subscribe("task_completed", seen)
    t1 = c.manager.submit("whoami")
    poll(lambda: seen.types_of(t1.task_id) == ["task_completed"], 20, "first event")
    first.close()  # the subscriber goes down

    missed = [c.manager.submit("whoami") for _ in range(3)]
    for t in missed:
        c.manager.wait(t.task_id, 30)

    again, later = subscriber(c, group=group, consumer="c1"), Collector()
    again.subscribe("task_completed", later)
    poll(lambda: all(later.types_of(t.task_id) == ["task_completed"] for t in missed), 20, "missed events")
    assert later.types_of(t1.task_id) == []  # already acknowledged before going down
    again.close()


def test_events_of_replaced_pool_children_are_not_lost(make_cluster) -> None:
    c = make_cluster(executors=TASKS, events={"type": "redis"})
    bus, seen = subscriber(c), Collector()
    bus.subscribe("task_completed", seen)
    c.worker(extra_args=["--max-tasks-per-child=1"])  # each child exits right after its task
    tasks = [c.manager.submit("whoami") for _ in range(4)]
    pids = {c.manager.wait(t.task_id, 30).result["pid"] for t in tasks}
    assert len(pids) == 4
    poll(lambda: all(seen.types_of(t.task_id) == ["task_completed"] for t in tasks), 20, "every completion")
    bus.close()


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_cli_submit_sends_its_task_created_before_the_process_exits(make_cluster, redis_url, broker) -> None:
    """``celery-ext submit`` is a producer that exits right after publishing: it closes its runtime
    on the way out (``Runtime.close``), which sends the events it still holds."""
    url = redis_url
    if broker == "rabbitmq":
        require("RabbitMQ", "127.0.0.1", 5672)
        url = RABBIT_URL
    c = make_cluster(executors=TASKS, broker={"url": url}, events={"type": "kombu"})
    bus, seen = subscriber(c), Collector()
    bus.subscribe("task_created", seen)
    done = cli(c, "submit", "whoami")  # no worker: the event is the producer's own
    assert done.returncode == 0, done.stderr
    task_id = done.stdout.strip()
    poll(lambda: seen.types_of(task_id) == ["task_created"], 20, "task_created of the CLI's task")
    assert seen.of_type("task_created")[0].data["task_type"] == "whoami"
    bus.close()


def test_update_state_is_a_task_progress_event(make_cluster) -> None:
    """A running task's ``update_state(state="PROGRESS", meta=...)`` reaches subscribers as
    ``task_progress``, in order, with the state and meta."""
    c = make_cluster(
        executors=[{"type": "python", "config": {"modules": ["tests.support.tasks"]}}], events={"type": "redis"}
    )
    bus = subscriber(c)
    seen = Collector()
    bus.subscribe(ALL, seen)
    c.worker()
    key = unique("progress:")
    task = c.manager.submit("report_progress", {"key": key, "steps": 2})
    poll(lambda: len(seen.of_type("task_progress")) >= 2, 30, "two task_progress events")
    redis.Redis(host=REDIS_HOST, port=REDIS_PORT).set(key, 1, ex=60)
    assert c.manager.wait(task.task_id, 30).status is TaskStatus.SUCCEEDED
    reports = [e for e in sorted(seen.of_type("task_progress"), key=lambda e: e.timestamp) if e.task_id == task.task_id]
    assert [(e.data["state"], e.data["meta"]) for e in reports] == [
        ("PROGRESS", {"done": 1, "total": 2}),
        ("PROGRESS", {"done": 2, "total": 2}),
    ]
    assert all(e.data["task_type"] == "report_progress" and e.data["attempt"] == 1 and e.worker_id for e in reports)
    assert bus.stats.handler_errors == 0
    bus.close()
