"""Queued work survives the broker losing its data (issue 12 item 4), and the leader's fencing
token keeps growing across a Redis restart.  A private Redis without persistence, started by
this test on a free port (never the shared one), is killed and started again."""

from __future__ import annotations

import time

import redis

from celery_ext.dispatch import queue_name
from celery_ext.model import TaskStatus
from celery_ext.routing.stranded import queue_keys
from celery_ext.scheduler import Scheduler
from tests.conftest import TEST_TASKS

MARK = [{"type": "python", "config": {"modules": ["tests.support.storage_tasks"]}}]


def test_queued_tasks_are_published_again_after_the_broker_lost_them(make_cluster, private_redis) -> None:
    c = make_cluster(executors=TEST_TASKS, broker={"url": private_redis.url})
    scheduler = Scheduler(c.runtime)
    first = scheduler.tick()  # the leader; sets the broker's epoch marker
    assert first.leader and first.fence > 0
    tasks = [c.manager.submit("echo", {"i": i}) for i in range(20)]  # no worker yet: they wait
    assert redis.Redis.from_url(private_redis.url).dbsize() > 0
    private_redis.kill()
    private_redis.start()  # no persistence: the messages, the marker and the fence counter are gone
    assert redis.Redis.from_url(private_redis.url).dbsize() == 0
    report = scheduler.tick()
    assert report.leader and report.fence > first.fence, "the fencing token must only grow"
    assert sorted(report.republished) == sorted(t.task_id for t in tasks)
    assert scheduler.tick().republished == []  # once
    c.worker()
    for t in tasks:
        done = c.manager.wait(t.task_id, 30)
        assert done.status is TaskStatus.SUCCEEDED and done.attempt == 1, done


def test_tasks_of_a_purged_queue_are_published_again_once(make_cluster, tmp_path) -> None:
    """One queue purged on its own (``redis-cli DEL``) keeps the epoch marker: the age check finds
    its old QUEUED records, while another queue's waiting messages are left alone."""
    c = make_cluster(executors=MARK, scheduler={"lost_after": 1.0, "interval": 0.2})
    scheduler = Scheduler(c.runtime)
    assert scheduler.tick().leader
    side = tmp_path / "runs.txt"
    purged = [c.manager.submit("mark_file", {"path": str(side), "key": f"p{i}", "seconds": 0}) for i in range(10)]
    waiting = [c.manager.submit("drip", {"lines": 0, "interval": 0}) for _ in range(5)]  # not purged
    c.runtime.lifecycle.marks.flush()
    broker = redis.Redis.from_url(c.data["broker"]["url"])
    options = c.runtime.celery.conf.broker_transport_options
    keys = queue_keys(queue_name(c.data["app"]["name"], "mark_file"), options)
    assert sum(broker.llen(k) for k in keys) == 10
    broker.delete(*keys)  # the purge: the epoch marker stays

    republished: list[str] = []
    deadline = time.monotonic() + 60
    while len(republished) < len(purged):
        assert time.monotonic() < deadline, f"republished only {republished}"
        republished += scheduler.tick().republished
        time.sleep(0.3)
    assert sorted(republished) == sorted(t.task_id for t in purged)
    for _ in range(10):  # the drip messages wait in their queue: never taken for lost
        assert scheduler.tick().republished == []
        time.sleep(0.3)

    c.worker()
    for t in purged + waiting:
        assert c.manager.wait(t.task_id, 60).status is TaskStatus.SUCCEEDED
    time.sleep(2)  # a second copy of a message, had one been run, would have run by now
    starts = [ln for ln in side.read_text().splitlines() if ln.startswith("start ")]
    assert sorted(starts) == sorted(f"start p{i}" for i in range(10))
    assert all(c.manager.get(t.task_id).attempt == 1 for t in waiting)


def test_a_run_whose_claim_the_database_undid_is_not_published_again(make_cluster, tmp_path) -> None:
    """The first scheduler on a broker finds no epoch marker and publishes again what waits as
    QUEUED.  A claim is committed without waiting for the disk, so a crash of PostgreSQL can
    leave a running task's record QUEUED, under its run's token; its message is then in kombu's
    unacked hash (the worker fetched it), and it must not be published again: it would run twice."""
    c = make_cluster(executors=MARK)
    side = tmp_path / "runs.txt"
    c.worker()
    task = c.manager.submit("mark_file", {"path": str(side), "key": "k", "seconds": 4})
    deadline = time.monotonic() + 60
    while not side.exists() or "start k" not in side.read_text():
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.05)
    running = c.manager.get(task.task_id)
    assert running.status is TaskStatus.RUNNING
    # What the crash leaves: the record as the message found it (QUEUED, the same token).
    assert c.runtime.storage.tasks.update(
        task.task_id,
        (TaskStatus.RUNNING,),
        token=running.dispatch_token,
        status=TaskStatus.QUEUED,
        started_at=None,
        lease_until=None,
        attempt=0,
    )
    broker = redis.Redis.from_url(c.data["broker"]["url"])
    broker.delete(f"{c.data['app']['name']}.broker.epoch")
    report = Scheduler(c.runtime).tick()
    assert report.leader and report.republished == []
    assert c.manager.get(task.task_id).dispatch_token == running.dispatch_token
    done = c.manager.wait(task.task_id, 30)
    assert done.status is TaskStatus.SUCCEEDED, done
    time.sleep(1)
    assert side.read_text().splitlines() == ["start k", "end k"]
