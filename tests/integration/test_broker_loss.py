"""Queued work survives the broker losing its data (issue 12 item 4), and the leader's fencing
token keeps growing across a Redis restart.  A private Redis without persistence, started by
this test on a free port (never the shared one), is killed and started again."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from celery_ext.model import TaskStatus
from celery_ext.scheduler import Scheduler
from tests.conftest import TEST_TASKS
from tests.support.private import REDIS_SERVER, PrivateRedis


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if not Path(REDIS_SERVER).exists():
        pytest.skip("no system redis-server")
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.kill()


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
