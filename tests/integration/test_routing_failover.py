"""Killing workers under routed load: affinity moves, stranded queues, expired leases.

The scheduler runs ``recover_offline_workers`` and ``recover_expired_leases`` on its interval
(test_scheduler.py runs it as a process); here the test calls them in a loop, as it does.
"""

from __future__ import annotations

import time
from collections import Counter

from celery_ext.model import TERMINAL, TaskStatus
from celery_ext.recovery import recover_expired_leases, recover_offline_workers
from tests.support.routing_tasks import runs
from tests.support.services import unique

ROUTING_TASKS = [{"type": "python", "config": {"modules": ["tests.support.routing_tasks"]}}]
# Offline after 2s without a heartbeat (generous: CPU is scarce on test machines); a killed
# task's lease expires after 2s.
FAST = {"heartbeat_interval": 0.5, "offline_after": 2, "task_lease": 2}


def recover_until_terminal(rt, ids: list[str], timeout: float = 60.0) -> tuple[list, dict[str, int]]:
    """Run recovery until every task is terminal; returns the tasks and {offline worker: moved}."""
    deadline = time.monotonic() + timeout
    offline: dict[str, int] = {}
    while True:
        offline.update((w.id, moved) for w, moved in recover_offline_workers(rt))
        recover_expired_leases(rt)
        tasks = [rt.manager.get(i) for i in ids]
        if all(t.status in TERMINAL for t in tasks):
            return tasks, offline
        assert time.monotonic() < deadline, Counter(t.status.value for t in tasks)
        time.sleep(0.2)


def one_at_a_time(rt, task):
    """Wait for the task and for its worker to release its slot (which follows the record's
    SUCCEEDED by a moment): otherwise the next decision may see that worker full."""
    done = rt.manager.wait(task.task_id, 30)
    registry = rt.router.registry
    deadline = time.monotonic() + 10
    while any(w.in_flight for w in registry.all()):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    rt.router.invalidate()
    return done


def wait_status(rt, task_id: str, status: TaskStatus, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while rt.manager.get(task_id).status is not status:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_affinity_sticks_then_moves_when_its_worker_dies_and_nothing_is_lost(make_cluster) -> None:
    c = make_cluster(executors=ROUTING_TASKS, worker=FAST, scheduler={"load_balance_strategy": "affinity"})
    workers = {w.hostname.split("@")[0]: w for w in (c.worker(), c.worker())}
    m, rt = c.manager, c.runtime
    key = unique("aff:")
    first = [one_at_a_time(rt, m.submit("rt_slow", {"key": key, "seconds": 0})) for _ in range(6)]
    sticky = {t.worker_id for t in first}
    assert len(sticky) == 1
    (victim_id,) = sticky
    victim = workers[victim_id.split("@")[0]]
    survivor_id = next(w.id for w in rt.router.registry.online() if w.id != victim_id)

    long = m.submit("rt_slow", {"key": key, "seconds": 3, "tag": "long"})
    wait_status(rt, long.task_id, TaskStatus.RUNNING)
    victim.kill()
    # Submitted before anyone notices the death: some land in the dead worker's direct queue.
    after = [m.submit("rt_slow", {"key": key, "seconds": 0, "tag": "after"}) for _ in range(4)]
    done, offline = recover_until_terminal(rt, [long.task_id] + [t.task_id for t in after])
    assert {t.status for t in done} == {TaskStatus.SUCCEEDED}
    # Moved back: what was routed to the dead worker's free slot, and the long task's
    # unacknowledged message (dropped as stale by the survivor; the lease recovery re-ran it).
    assert list(offline) == [victim_id] and offline[victim_id] >= 2
    assert {t.worker_id for t in done} == {survivor_id}
    assert done[0].attempt == 2  # the long task ran again after its worker was lost
    # The type re-stuck to the survivor.
    again = [one_at_a_time(rt, m.submit("rt_slow", {"key": key, "seconds": 0})).worker_id for _ in range(4)]
    assert set(again) == {survivor_id}
    assert Counter(r["tag"] for r in runs(key))["after"] == 4  # each ran exactly once


def test_killing_a_worker_mid_burst_still_finishes_every_task(make_cluster) -> None:
    c = make_cluster(executors=ROUTING_TASKS, worker=FAST)
    victim, survivor = c.worker(), c.worker()
    m, rt = c.manager, c.runtime
    key = unique("kill:")
    n = 24
    tasks = m.submit_many(
        [{"task_type": "rt_slow", "payload": {"key": key, "seconds": 0.3, "tag": str(i)}} for i in range(n)]
    )
    deadline = time.monotonic() + 30
    while len(runs(key)) < 6:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    victim.kill()
    # More work arrives while the dead worker still looks alive.
    tasks += [m.submit("rt_slow", {"key": key, "seconds": 0.1, "tag": f"late{i}"}) for i in range(6)]
    done, offline = recover_until_terminal(rt, [t.task_id for t in tasks])
    assert {t.status for t in done} == {TaskStatus.SUCCEEDED}, Counter(t.status.value for t in done)
    assert list(offline) == [victim.hostname.replace("%h", _host())]
    ran = Counter(r["tag"] for r in runs(key))
    print(f"moved from the dead worker's queue: {offline}; runs: {sum(ran.values())} of {len(ran)} tasks")
    assert set(ran) == {str(i) for i in range(n)} | {f"late{i}" for i in range(6)}
    # Only tasks that were running on the killed worker may have run twice.
    assert sum(ran.values()) - len(ran) <= 2, ran
    assert rt.router.registry.all()[0].id == survivor.hostname.replace("%h", _host())


def _host() -> str:
    import socket

    return socket.gethostname()
