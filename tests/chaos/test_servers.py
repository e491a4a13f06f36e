"""Server faults: a private Redis restarted (without persistence, and with an append-only file),
a private PostgreSQL stopped for 10 s and for 60 s while tasks run, and one crashed."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable

import pytest

from tests.chaos.harness import Chaos
from tests.support.private import PrivatePostgres

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


@pytest.mark.parametrize("aof", [False, True], ids=["no-persistence", "aof"])
def test_redis_restart(chaos: Callable[..., Chaos], aof: bool) -> None:
    """Redis killed while tasks run and wait, started again 2 s later.  Without persistence the
    queued messages are gone: the scheduler publishes their records again (the broker's epoch
    marker is gone too).  With AOF (``appendfsync always``) they are still there."""
    c = chaos("Redis restart, " + ("AOF" if aof else "no persistence"), aof=aof)
    c.worker()
    c.worker()
    scheduler = c.scheduler()
    c.submit(30, 1.0)
    c.wait_running(None, 3)
    c.fault(c.redis.kill)
    time.sleep(2)
    c.redis.start()
    assert c.settle(180), c.figures().line()
    c.extra["republished"] = sum(int(n) for n in re.findall(r"published again (\d+) task", scheduler.log()))
    f = c.record()
    c.check(f, doubled_at_most=f.in_flight)
    assert all(w.alive() for w in c.cluster.workers)
    if not aof:
        assert c.extra["republished"] > 0, "the restart lost no queued message: nothing was tested"


@pytest.mark.parametrize("outage", [10, 60])
def test_postgresql_stopped(chaos: Callable[..., Chaos], outage: int) -> None:
    """PostgreSQL stopped while tasks run: claims, lease renewals and outcome writes wait for it,
    and a run that reached its end is not run again: an outcome that cannot be written waits in
    the worker's spool, its task held in the registry so that recovery leaves it be, and is
    applied when storage returns (storage/spool.py)."""
    c = chaos(f"PostgreSQL stopped {outage} s")
    c.worker()
    c.worker()
    c.scheduler()
    c.submit(16, 2.0)
    c.wait_running(None, 3)
    c.cluster.runtime.storage.close()  # this process's connections are not what keeps working
    c.fault(c.pg.stop)
    try:
        time.sleep(outage)
    finally:
        c.pg.start()
    assert c.settle(180), c.figures().line()
    f = c.record()
    c.check(f, doubled_at_most=f.in_flight)
    assert f.completed_twice == 0, f"a run that reached its end ran again: {f.line()}"
    assert all(w.alive() for w in c.cluster.workers)


def test_postgresql_crash(chaos: Callable[..., Chaos]) -> None:
    """PostgreSQL crashes (SIGKILL of all its processes: its WAL buffers are lost) right after a
    burst of single submits, while tasks run, and restarts 3 s later.  A submit's record (like a
    claim) is committed without waiting for the disk (storage/sql.py), so the crash undoes the
    burst's records: their messages, already published, make them again on the workers.  To be
    sure the records are still in the buffers when it crashes, as they may be for up to 200 ms,
    the WAL writer and the background writer are paused, and so are the workers (their durable
    writes would flush the buffers) until the crash.  Nothing is lost, and no run that reached
    its end runs again.  On a server of its own with the default durability (the suite's private
    one runs with fsync off)."""
    pg = PrivatePostgres(durable=True).init()
    try:
        # Default settings, and the scheduler started after the crash: its durable writes (the
        # leader's fence) would flush the buffers too.
        c = chaos("PostgreSQL crash", pg=pg, settings="default")
        workers = [c.worker(), c.worker()]
        c.submit(4, 3.0)  # one durable batch, running at the crash
        c.wait_running(None, 2)
        pids = [pid for w in workers for pid in w.process_ids()]
        pg.pause_wal_writer()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            m = c.cluster.manager
            c.accepted += [m.submit("ledger", {"seconds": 0.2}, max_retries=5).task_id for _ in range(30)]
            m.lifecycle.marks.flush()
            c.cluster.runtime.storage.close()
            c.fault(pg.crash)
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        time.sleep(3)
        pg.start()
        c.scheduler()
        assert c.settle(180), c.figures().line()
        logs = "".join(w.log() for w in workers)
        c.extra["records made again"] = logs.count("made again")
        f = c.record()
        c.check(f, doubled_at_most=f.in_flight)
        assert f.completed_twice == 0, f"a run that reached its end ran again: {f.line()}"
        assert all(w.alive() for w in workers)
        assert c.extra["records made again"] > 0, "the crash lost no record: nothing was tested"
    finally:
        pg.destroy()
