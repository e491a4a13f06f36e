"""Worker faults: SIGKILL of a worker (with and without a restart under the same name), SIGKILL
of one pool child, SIGSTOP past the offline timeout then SIGCONT, SIGTERM (warm shutdown)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest

from tests.chaos.harness import Chaos

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.mark.parametrize("settings", ["defaults", "tuned"])
def test_worker_sigkill(chaos: Callable[..., Chaos], settings: str) -> None:
    """The whole worker (main process and pool) killed and not restarted: its running tasks run
    again elsewhere once their leases expire, its queued ones once it is seen offline."""
    c = chaos("worker SIGKILL", settings=settings)
    victim, _survivor = c.worker(), c.worker(concurrency=4)  # room for the recovered tasks at once
    c.scheduler()
    c.submit(10, 2.0)
    pids = set(victim.process_ids())
    c.wait_running(pids, 2)
    c.fault(victim.kill, pids)
    assert c.settle(120), c.figures().line()
    f = c.record()
    c.check(f, doubled_at_most=f.in_flight)
    assert f.cut >= 1 and f.redispatch_s is not None and f.redispatch_s < 60


def test_worker_sigkill_restart_same_name(chaos: Callable[..., Chaos]) -> None:
    """Killed and started again at once under the same name (``-n same@host``): the new
    incarnation does not shield the old one's tasks."""
    c = chaos("worker SIGKILL, restarted under the same name")
    name = "chaos-same@%h"
    victim = c.worker(hostname=name)
    c.worker(concurrency=4)
    c.scheduler()
    c.submit(10, 2.0)
    pids = set(victim.process_ids())
    c.wait_running(pids, 2)
    c.fault(victim.kill, pids)
    c.worker(hostname=name)
    assert c.settle(120), c.figures().line()
    f = c.record()
    c.check(f, doubled_at_most=f.in_flight)
    assert f.cut >= 1 and f.redispatch_s is not None and f.redispatch_s < 60


def test_pool_child_sigkill(chaos: Callable[..., Chaos]) -> None:
    """One pool process killed mid-task (an OOM kill): its task is retried, the worker goes on."""
    c = chaos("pool child SIGKILL")
    w = c.worker()
    c.scheduler()
    c.submit(12, 2.0)
    children = set(w.process_ids()) - {w.pid}
    running = c.wait_running(children, 1)
    child = next(ln.pid for ln in reversed(c.lines()) if ln.task_id in running and ln.pid in children)
    c.fault(lambda: os.kill(child, signal.SIGKILL), {child})
    assert c.settle(120), c.figures().line()
    f = c.record()
    c.check(f, doubled_at_most=f.in_flight)
    assert f.cut == 1 and f.redispatch_s is not None and w.alive()


def test_worker_sigstop_past_its_offline_timeout(chaos: Callable[..., Chaos]) -> None:
    """The main process of a worker stalled (SIGSTOP) past its offline timeout and its task
    lease, then resumed: its tasks ran again elsewhere, and the resumed worker stops its
    superseded runs instead of finishing them (tasks longer than the stall show it)."""
    c = chaos("worker SIGSTOP, then SIGCONT")
    stalled = c.worker()
    c.worker(concurrency=4)
    c.scheduler()
    c.submit(6, 12.0)
    c.wait_running({*stalled.process_ids()}, 2)
    # The main process: its pool children run on.
    c.fault(lambda: os.kill(stalled.pid, signal.SIGSTOP), set(stalled.process_ids()))
    try:
        time.sleep(6)  # > offline_after (1.5 s) and > task_lease (3 s)
    finally:
        os.kill(stalled.pid, signal.SIGCONT)
    assert c.settle(120), c.figures().line()
    f = c.record()
    c.check(f, doubled_at_most=f.in_flight)
    assert f.completed_twice == 0, "a superseded run went on to its end"
    assert stalled.alive()
    stalled.wait_for_log("stopping this run", 30)


def test_worker_sigterm(chaos: Callable[..., Chaos]) -> None:
    """Warm shutdown: the tasks in flight finish, what the worker held goes back; none lost or
    run twice."""
    c = chaos("worker SIGTERM")
    leaving = c.worker()
    c.worker()
    c.scheduler()
    c.submit(16, 2.0)
    pids = set(leaving.process_ids())
    c.wait_running(pids, 2)
    c.fault(lambda: leaving.stop(60), pids)
    assert c.settle(120), c.figures().line()
    f = c.record()
    c.check(f, doubled_at_most=0)
