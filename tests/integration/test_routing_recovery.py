"""``recover_expired_leases``: RUNNING records whose worker vanished, against real Redis and SQLite."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import timedelta

import redis

from celery_ext.model import TaskStatus, utcnow
from celery_ext.recovery import recover_expired_leases, recover_offline_workers
from celery_ext.routing.stranded import queue_keys
from celery_ext.routing.workers import WorkerInfo, direct_queue_name
from celery_ext.runner import Delivery
from tests.support.scrape import poll
from tests.support.services import unique
from tests.support.workers import subprocess_env

ROUTING_TASKS = [{"type": "python", "config": {"modules": ["tests.support.routing_tasks"]}}]


def running(rt, *, worker: str, lease_in: float, max_retries: int = 3) -> str:
    """A record as a worker leaves it when it is SIGKILLed mid-task."""
    task = rt.manager.submit("rt_slow", {"key": "x"}, max_retries=max_retries)
    now = utcnow()
    assert rt.storage.tasks.update(
        task.task_id,
        (TaskStatus.PENDING, TaskStatus.QUEUED),  # its queued mark may not be written yet
        status=TaskStatus.RUNNING,
        attempt=1,
        worker_id=worker,
        started_at=now,
        lease_until=now + timedelta(seconds=lease_in),
    )
    return task.task_id


def test_expired_leases_are_redispatched_or_declared_dead(make_cluster) -> None:
    rt = make_cluster(executors=ROUTING_TASKS).runtime
    router = rt.router
    router.registry.heartbeat(
        WorkerInfo(id="alive", queue=direct_queue_name(router.prefix, "alive"), supported_types=("rt_slow",)), 60, 0
    )
    lost = running(rt, worker="ghost", lease_in=-1)
    last = running(rt, worker="ghost", lease_in=-1, max_retries=0)
    fresh = running(rt, worker="ghost", lease_in=60)
    # Its worker still heartbeats under that name, but nobody renewed this run's lease: a live
    # worker renews the leases of what it runs (lease.py), so this run's process is gone.
    slow = running(rt, worker="alive", lease_in=-1)
    tokens = {i: rt.manager.get(i).dispatch_token for i in (lost, last, fresh, slow)}
    shared = queue_keys(f"{router.prefix}.rt_slow", rt.celery.conf.broker_transport_options)
    r = redis.Redis(host="127.0.0.1", port=6379)
    queued_before = sum(r.llen(k) for k in shared)

    assert sorted(recover_expired_leases(rt)) == sorted([lost, last, slow])
    again = rt.manager.get(lost)
    assert again.status is TaskStatus.RETRYING and again.dispatch_token != tokens[lost]
    assert again.error.reason == "worker_lost" and "ghost" in again.error.message
    assert sum(r.llen(k) for k in shared) == queued_before + 2  # the new attempts were published
    dead = rt.manager.get(last)
    assert dead.status is TaskStatus.DEAD and dead.error.reason == "worker_lost"
    assert rt.manager.get(slow).status is TaskStatus.RETRYING
    record = rt.manager.get(fresh)
    assert record.status is TaskStatus.RUNNING and record.dispatch_token == tokens[fresh]
    # A second pass (another scheduler) finds nothing left to do.
    assert recover_expired_leases(rt) == []


FETCH_AND_DIE = """
import json, os, sys
from kombu import Connection, Queue
from celery_ext.transport import install
install()
with Connection(sys.argv[1], transport_options=json.loads(sys.argv[3])) as conn:
    message = Queue(sys.argv[2], routing_key=sys.argv[2])(conn.default_channel).get(no_ack=False)
    print("fetched" if message is not None else "empty", flush=True)
    os._exit(0)  # as a SIGKILLed worker: nothing is acked or restored
"""


def test_a_message_a_dead_worker_fetched_but_never_claimed_is_returned(make_cluster) -> None:
    """A worker killed between fetching a message from a shared queue and claiming its record
    leaves it only in kombu's unacked hash (until the visibility timeout, an hour): when a worker
    is found offline, such messages of unclaimed records go back to their queues."""
    c = make_cluster(executors=ROUTING_TASKS, worker={"heartbeat_interval": 0.2, "offline_after": 0.5})
    rt = c.runtime
    router = rt.router
    task = rt.manager.submit("rt_slow", {"key": unique("unclaimed:"), "seconds": 0.01})  # no worker: shared queue
    shared = f"{router.prefix}.rt_slow"
    options = json.dumps(rt.celery.conf.broker_transport_options)
    fetched = subprocess.run(
        [sys.executable, "-c", FETCH_AND_DIE, c.data["broker"]["url"], shared, options],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
    )
    assert fetched.stdout.strip() == "fetched", fetched.stderr
    r = redis.Redis(host="127.0.0.1", port=6379)
    assert sum(r.llen(k) for k in queue_keys(shared, rt.celery.conf.broker_transport_options)) == 0
    router.registry.heartbeat(
        WorkerInfo(id=unique("ghost"), queue=direct_queue_name(router.prefix, "ghost"), supported_types=("rt_slow",)),
        0.3,
        0,
    )
    time.sleep(0.8)
    assert recover_offline_workers(rt)  # the ghost is swept...
    assert sum(r.llen(k) for k in queue_keys(shared, rt.celery.conf.broker_transport_options)) == 1  # ...and it is back
    c.worker()
    assert rt.manager.wait(task.task_id, 30).status is TaskStatus.SUCCEEDED


def test_a_message_a_live_worker_holds_for_its_eta_is_left_with_it(make_cluster) -> None:
    """A plain message with a countdown waits in its worker's memory, fetched (kombu's unacked
    hash) and recorded ``queued`` under that worker's name, never started (``held.py``).  When
    another worker is found offline, it is not returned to its queue while its holder is online
    (a copy would only be held again elsewhere); once its holder is offline too, it is."""
    c = make_cluster(executors=ROUTING_TASKS, worker={"heartbeat_interval": 0.2, "offline_after": 0.5})
    rt = c.runtime
    rt.storage.migrate()
    router = rt.router
    shared = f"{router.prefix}.rt_slow"
    options = rt.celery.conf.broker_transport_options
    res = rt.celery.send_task("rt_slow", kwargs={"key": unique("held:"), "seconds": 0.01}, queue=shared, countdown=60)
    fetched = subprocess.run(
        [sys.executable, "-c", FETCH_AND_DIE, c.data["broker"]["url"], shared, json.dumps(options)],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
    )
    assert fetched.stdout.strip() == "fetched", fetched.stderr
    holder, ghost = unique("holder"), unique("ghost")
    delivery = Delivery(task_id=res.id, task_type="rt_slow", args=[], kwargs={"key": "k"}, header=None)
    held = rt.runner.hold(delivery, holder, utcnow() + timedelta(seconds=60))
    assert held is not None and held.status is TaskStatus.QUEUED and held.worker_id == holder
    for wid, ttl in ((holder, 1.5), (ghost, 0.3)):
        info = WorkerInfo(id=wid, queue=direct_queue_name(router.prefix, wid), supported_types=("rt_slow",))
        router.registry.heartbeat(info, ttl, 0)
    r = redis.Redis(host="127.0.0.1", port=6379)

    def queued() -> int:
        return sum(int(r.llen(k)) for k in queue_keys(shared, options))

    swept: list[str] = []

    def sweep() -> bool:
        swept[:] = [w.id for w, _ in recover_offline_workers(rt)]
        return bool(swept)

    poll(sweep, 10, "the ghost swept")
    assert swept == [ghost]
    assert queued() == 0  # its holder is online: left with it
    poll(sweep, 10, "the holder swept")
    assert swept == [holder]
    assert queued() == 1  # its holder is gone: back in its queue


def test_a_chain_step_declared_dead_fails_the_steps_waiting_for_it(make_cluster) -> None:
    """A chain's later steps wait in storage until their previous step publishes them.  A step
    whose worker vanished, declared dead by recovery, never will: the steps after it fail
    (``parent_failed``), found through their records, while another workflow's are left alone."""
    rt = make_cluster(executors=ROUTING_TASKS).runtime
    m = rt.manager
    steps = m.submit_chain(
        [{"task_type": "rt_slow", "payload": {"key": "a"}, "max_retries": 0}]
        + [{"task_type": "rt_slow", "payload": {"key": k}} for k in "bcd"]
    )
    other = m.submit_chain([{"task_type": "rt_slow", "payload": {"key": "x"}}, {"task_type": "rt_slow"}])
    now = utcnow()
    first = steps[0]
    for t in (first, other[0]):
        assert rt.storage.tasks.update(
            t.task_id,
            (TaskStatus.PENDING, TaskStatus.QUEUED),
            status=TaskStatus.RUNNING,
            attempt=1,
            worker_id="ghost",
            started_at=now,
            lease_until=now + timedelta(seconds=-1 if t is first else 60),
        )
    assert recover_expired_leases(rt) == [first.task_id]
    assert m.get(first.task_id).status is TaskStatus.DEAD
    for step in steps[1:]:
        record = m.get(step.task_id)
        assert record.status is TaskStatus.FAILED and record.error is not None, step.task_id
        assert record.error.reason == "parent_failed"
        assert record.error.message == f"previous step rt_slow[{first.task_id}] failed (worker_lost)"
    assert m.get(other[1].task_id).status is TaskStatus.SCHEDULED
