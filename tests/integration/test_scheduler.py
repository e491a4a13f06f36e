"""The scheduler: leader election on real Redis, and ``celery -A celery_ext scheduler`` processes
recovering work next to real worker processes (Redis broker, SQLite records)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import redis

from celery_ext.events.base import SCHEDULER_LEADER_CHANGED, Event
from celery_ext.model import Task, TaskStatus, new_id, utcnow
from celery_ext.scheduler import LeaderLease, Scheduler
from tests.conftest import TEST_TASKS, Cluster
from tests.support.schedulers import SchedulerProcess
from tests.support.scrape import poll
from tests.support.services import unique
from tests.support.workers import subprocess_env

pytestmark = pytest.mark.timeout(180)

# Offline after 2s without a heartbeat; a killed task's lease runs out after 2s.
FAST = {"heartbeat_interval": 0.5, "offline_after": 2, "task_lease": 2}
FAST_SCHEDULER = {"interval": 0.2, "leader_lease": 1.5, "publish_grace": 1}


def test_one_holder_leads_renews_hands_over_and_fences(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    prefix = unique("lease")
    a = LeaderLease(client, prefix, 0.5, "a")
    b = LeaderLease(client, prefix, 0.5, "b")
    first = a.acquire()
    assert first >= 1 and b.acquire() == 0
    assert a.acquire() == first and a.leader() == f"a|{first}"  # renewing keeps the token
    assert not b.release() and a.release()
    second = b.acquire()
    assert second > first and a.acquire() == 0  # fences only grow (never below the Redis clock in ms)
    poll(lambda: a.leader() is None, 5, "b's unrenewed lease to run out")
    assert a.acquire() > second
    with pytest.raises(ValueError, match="must not contain"):
        LeaderLease(client, prefix, 1, "x|y")
    client.delete(a.key, a.fence_key)


def orphan(cluster: Cluster, age: float) -> Task:
    """A PENDING record as a producer leaves it when its publish failed (or, on RabbitMQ, when it
    dies between its insert and its publish; on Redis that record is QUEUED: test_outbox.py)."""
    then = utcnow() - timedelta(seconds=age)
    task = Task(
        task_id=new_id(),
        task_type="echo",
        payload={"orphan": True},
        status=TaskStatus.PENDING,
        max_retries=0,
        created_at=then,
        updated_at=then,
        dispatch_token=new_id(),
    )
    cluster.runtime.storage.migrate()  # no worker may have started yet
    cluster.runtime.storage.tasks.create(task)
    return task


def test_tick_publishes_what_no_producer_did_and_only_the_leader_acts(make_cluster) -> None:
    c = make_cluster(executors=TEST_TASKS, scheduler={"publish_grace": 5})
    c.worker()
    old, fresh = orphan(c, age=60), orphan(c, age=0)
    elections: list[Event] = []
    c.runtime.bus.subscribe(SCHEDULER_LEADER_CHANGED, elections.append)
    follower = Scheduler(c.runtime, holder="follower")
    leader = Scheduler(c.runtime, holder="leader")
    assert leader.tick().leader
    report = follower.tick()
    assert not report.leader and report.published == []
    report = leader.tick()  # the first tick may have published already: a second finds nothing more
    done = c.manager.wait(old.task_id, 30)
    assert (done.status, done.result) == (TaskStatus.SUCCEEDED, {"orphan": True})
    assert done.dispatch_token != old.dispatch_token  # a stale first message would be dropped
    assert c.manager.get(fresh.task_id).status is TaskStatus.PENDING  # still within its grace
    assert report.errors == []
    assert leader.lease is not None and leader.lease.release()
    c.runtime.bus.flush(5)
    assert [(e.worker_id, e.data["is_leader"]) for e in elections] == [("leader", True)]


def test_scheduler_processes_elect_one_leader_and_recover_a_killed_workers_task(make_cluster) -> None:
    c = make_cluster(executors=TEST_TASKS, worker=FAST, scheduler=FAST_SCHEDULER)
    first, second = SchedulerProcess(c).start(), SchedulerProcess(c).start()
    try:
        poll(lambda: ("is the leader" in first.log()) != ("is the leader" in second.log()), 30, "one leader")
        leader, standby = (first, second) if "is the leader" in first.log() else (second, first)

        doomed = c.worker()
        task = c.manager.submit("sleep", {"seconds": 30}, max_retries=1)
        poll(lambda: c.manager.get(task.task_id).status is TaskStatus.RUNNING, 30, "the task to start")
        doomed.kill()
        leader.stop(signal.SIGKILL)  # the leader dies too: the standby must take over
        standby.wait_for_log("is the leader", 30)

        c.worker()  # somewhere for the recovered attempt to run
        poll(lambda: c.manager.get(task.task_id).attempt >= 2, 60, "the recovered attempt")
        retried = c.manager.get(task.task_id)
        assert retried.error is not None and retried.error.reason == "worker_lost"
        assert retried.status in (TaskStatus.RETRYING, TaskStatus.QUEUED, TaskStatus.RUNNING)
        assert standby.stop() == 0
        assert "stopped" in standby.log()
    finally:
        for s in (first, second):
            if s.proc is not None and s.proc.poll() is None:
                s.proc.kill()


def test_once_prints_the_report_and_says_if_it_led(make_cluster) -> None:
    c = make_cluster(executors=TEST_TASKS, scheduler={"publish_grace": 1})
    task = orphan(c, age=60)
    run = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "celery_ext", "scheduler", "--once"],
        env=subprocess_env(CELERY_EXT_CONFIG=str(c.config_path)),
        cwd=c.tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["leader"] is True and report["published"] == [task.task_id]
    assert c.manager.get(task.task_id).status is TaskStatus.QUEUED

    holder = LeaderLease(redis.Redis.from_url(c.data["broker"]["url"]), c.data["app"]["name"], 30, "someone")
    assert holder.acquire()
    run = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "celery_ext", "scheduler", "--once"],
        env=subprocess_env(CELERY_EXT_CONFIG=str(c.config_path)),
        cwd=c.tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1 and json.loads(run.stdout.strip().splitlines()[-1])["leader"] is False
    holder.release()


def test_bad_scheduler_config_is_refused_with_its_path(tmp_path: Path) -> None:
    from celery_ext.config import parse_config
    from celery_ext.errors import ConfigError

    with pytest.raises(ConfigError, match=r"scheduler\.publish_grace"):
        parse_config({"scheduler": {"publish_grace": "soon"}})
