"""The leader's due dispatch (``Scheduler._due``) takes the next batch while it publishes one:
a failed publish puts back its batch and the one already taken, a round stops at
``MAX_DUE_BATCHES``, a cancelled record never moves, and a batch taken by a leader that died
before publishing it is published again (Redis broker, PostgreSQL records, no
worker: the messages are counted in the broker)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pytest
import redis

from celery_ext.dispatch import Dispatch, queue_name
from celery_ext.model import TaskStatus, utcnow
from celery_ext.routing.stranded import queue_keys
from celery_ext.scheduler import MAX_DUE_BATCHES, Scheduler
from tests.conftest import TEST_TASKS, Cluster
from tests.support.schedulers import due_records

pytestmark = pytest.mark.timeout(120)
S = TaskStatus


def due_only(c: Cluster, n: int) -> list[str]:
    """``n`` due records alone in the session's database (earlier tests' records would be work
    for this leader's other duties, published into this app's queues); their ids by run_at."""
    c.runtime.storage.migrate()
    with c.runtime.storage.begin() as conn:  # type: ignore[attr-defined]
        conn.exec_driver_sql("DELETE FROM tasks")
    return due_records(c.runtime.storage, n, -5.0, -1.0)


def statuses(c: Cluster, ids: Sequence[str]) -> list[TaskStatus]:
    return [t.status for t in (c.runtime.storage.tasks.get(i) for i in ids) if t is not None]


def waiting_messages(c: Cluster) -> int:
    rt = c.runtime
    client: Any = redis.Redis.from_url(str(rt.celery.conf.broker_url))
    keys = queue_keys(queue_name(rt.config.app.name, "echo"), rt.celery.conf.broker_transport_options)
    return sum(int(client.llen(k)) for k in keys)


def test_a_failed_publish_puts_back_its_batch_and_the_next_one_taken(make_cluster: Any) -> None:
    c = make_cluster("postgresql", executors=TEST_TASKS, scheduler={"due_batch": 10})
    ids = due_only(c, 35)
    for task_id in ids[:3]:  # cancelled while they waited
        assert c.runtime.storage.tasks.update(task_id, [S.SCHEDULED], status=S.CANCELLED)
    dispatcher = c.runtime.dispatcher
    publish, calls = dispatcher.publish_many, []

    def second_fails(batch: Sequence[Dispatch]) -> None:
        calls.append(len(batch))
        if len(calls) == 2:
            raise ConnectionError("the broker went away")
        publish(batch)

    dispatcher.publish_many = second_fails  # type: ignore[method-assign]
    scheduler = Scheduler(c.runtime)
    try:
        report = scheduler.tick()
        assert [e.split(":")[0] for e in report.errors] == ["due tasks"]
        # The first batch went out, the earliest due first; the second failed, and the third,
        # taken while the second was published, was put back with it: none is left taken.
        assert report.due == ids[3:13] and calls == [10, 10]
        assert statuses(c, ids[3:13]) == [S.QUEUED] * 10
        assert statuses(c, ids[13:]) == [S.SCHEDULED] * 22
        assert statuses(c, ids[:3]) == [S.CANCELLED] * 3
        assert waiting_messages(c) == 10
        del dispatcher.publish_many  # the broker is back
        report = scheduler.tick()
        assert report.errors == [] and report.due == ids[13:]
        assert statuses(c, ids[3:]) == [S.QUEUED] * 32 and statuses(c, ids[:3]) == [S.CANCELLED] * 3
        assert waiting_messages(c) == 32
    finally:
        scheduler.close()
        assert scheduler.lease is not None
        scheduler.lease.release()


def test_a_round_publishes_at_most_max_due_batches(make_cluster: Any) -> None:
    c = make_cluster("postgresql", executors=TEST_TASKS, scheduler={"due_batch": 5})
    n = 5 * MAX_DUE_BATCHES + 7
    ids = due_only(c, n)
    scheduler = Scheduler(c.runtime)
    try:
        report = scheduler.tick()
        assert report.errors == [] and report.due == ids[: 5 * MAX_DUE_BATCHES]
        # The round stopped at the cap without taking a batch beyond it.
        assert statuses(c, ids[5 * MAX_DUE_BATCHES :]) == [S.SCHEDULED] * 7
        assert waiting_messages(c) == 5 * MAX_DUE_BATCHES
        report = scheduler.tick()
        assert report.due == ids[5 * MAX_DUE_BATCHES :] and waiting_messages(c) == n
    finally:
        scheduler.close()
        assert scheduler.lease is not None
        scheduler.lease.release()


def test_a_batch_a_dead_leader_took_but_never_published_is_published_again(make_cluster: Any) -> None:
    """On a Redis broker the take moves the due records QUEUED at once (no mark after the
    publish): a leader that dies between its take and its publish leaves them QUEUED without
    messages, and the next leader's purged-queue duty publishes them after ``lost_after``."""
    c = make_cluster("postgresql", executors=TEST_TASKS, scheduler={"lost_after": 1.0, "interval": 0.2})
    ids = due_only(c, 5)
    token, taken = c.runtime.lifecycle.due(utcnow(), 10)  # the dead leader's take
    assert sorted(t.task_id for t, _ in taken) == sorted(ids) and statuses(c, ids) == [S.QUEUED] * 5
    assert waiting_messages(c) == 0
    scheduler = Scheduler(c.runtime)
    try:
        republished: list[str] = []
        deadline = time.monotonic() + 30
        while len(republished) < len(ids):
            assert time.monotonic() < deadline, f"republished only {republished}"
            report = scheduler.tick()
            assert report.due == [] and report.published == [], report  # neither the due nor the outbox duty's
            republished += report.republished
            time.sleep(0.3)
        assert sorted(republished) == sorted(ids) and waiting_messages(c) == 5
        records = [c.runtime.storage.tasks.get(i) for i in ids]
        assert all(r is not None and r.status is S.QUEUED and r.dispatch_token != token for r in records)
    finally:
        scheduler.close()
        assert scheduler.lease is not None
        scheduler.lease.release()
