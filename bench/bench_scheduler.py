"""Scheduler benchmark: how fast one leader publishes due work, how late delayed tasks start,
and how long a failover takes with the default settings.

  dispatch  N records already due (SCHEDULED, PostgreSQL) published by one in-process leader,
            round after round: tasks/s, next to bare Celery publishing N messages with
            ``apply_async`` on one producer (the same Redis), in the same run.
  due lag   D tasks delayed 2-8 s (spread evenly), a scheduler process and a worker process
            (prefork -c 2) with default scheduler settings: published - due, and started - due,
            p50 / p99 (negative: published ahead with the rest as a countdown).
  failover  two scheduler processes with the default settings; SIGKILL the leader and time until
            the other logs that it leads (``scheduler.leader_lease`` 3 s, ``interval`` 1 s).

    .venv/bin/python bench/bench_scheduler.py [--n 20000] [--due 3000] [--failovers 3]
"""

from __future__ import annotations

import argparse
import functools
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import REDIS, postgres_bench, wait_until  # noqa: E402
from tests.support.schedulers import due_records  # noqa: E402
from tests.support.services import drop_database  # noqa: E402
from tests.support.workers import WorkerProcess, subprocess_env  # noqa: E402


def dispatch_rate(rt: Any, n: int) -> float:
    from celery_ext.scheduler import Scheduler

    due_records(rt.storage, n, -5.0, -1.0)
    scheduler = Scheduler(rt)
    start = time.perf_counter()
    published = 0
    while published < n:
        report = scheduler.tick()
        assert report.leader and not report.errors, report
        published += len(report.due)
    rate = n / (time.perf_counter() - start)
    assert scheduler.lease is not None
    scheduler.lease.release()
    return rate


def bare_publish_rate(bare: Any, n: int) -> float:
    noop = bare.tasks["bench.noop"]
    start = time.perf_counter()
    with bare.producer_or_acquire() as producer:
        for _ in range(n):
            noop.apply_async(producer=producer)
    return n / (time.perf_counter() - start)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Proc:
    def __init__(self, config: Path, log: Path) -> None:
        import subprocess

        self.log_path = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "celery_ext", "scheduler", "-l", "INFO"],
                env=subprocess_env(CELERY_EXT_CONFIG=str(config)),
                cwd=config.parent,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def leads(self) -> bool:
        return "is the leader" in self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)


def due_lag(rt: Any, config: Path, workdir: Path, n: int) -> dict[str, list[float]]:
    from celery_ext.model import TaskFilter, TaskStatus

    worker = WorkerProcess(config, concurrency=2)
    worker.start()
    scheduler = Proc(config, workdir / "lag-scheduler.log")
    try:
        wait_until(scheduler.leads, 60)
        # Submitted the way producers do, spread over the next 2-8 s.
        specs = [{"task_type": "echo", "payload": {"i": i}, "delay": 2 + 6 * i / n} for i in range(n)]
        ids = []
        for i in range(0, n, 500):
            ids += [t.task_id for t in rt.manager.submit_many(specs[i : i + 500])]
        wait_until(lambda: rt.storage.tasks.count_by_status().get("succeeded", 0) >= n, 300)
        lags: dict[str, list[float]] = {"published - due": [], "started - due": []}
        page = rt.storage.tasks.list(TaskFilter(status=(TaskStatus.SUCCEEDED,), limit=n))
        for t in page.items:
            lags["published - due"].append((t.queued_at - t.run_at).total_seconds())
            lags["started - due"].append((t.started_at - t.run_at).total_seconds())
        return lags
    finally:
        scheduler.stop()
        worker.stop()


def any_leads(procs: list[Proc]) -> bool:
    return any(p.leads() for p in procs)


def failovers(config: Path, workdir: Path, times: int) -> list[float]:
    out = []
    for k in range(times):
        procs = [Proc(config, workdir / f"failover-{k}-{i}.log") for i in range(2)]
        try:
            wait_until(functools.partial(any_leads, procs), 60)
            (leader,) = [p for p in procs if p.leads()]
            (standby,) = [p for p in procs if p is not leader]
            time.sleep(1.5)  # a lease renewed just now: the worst case is a full lease
            leader.proc.send_signal(signal.SIGKILL)
            killed = time.perf_counter()
            wait_until(standby.leads, 60)
            out.append(time.perf_counter() - killed)
        finally:
            for p in procs:
                p.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000, help="due records for the dispatch rate")
    parser.add_argument("--due", type=int, default=3000, help="delayed tasks for the due lag")
    parser.add_argument("--failovers", type=int, default=3)
    args = parser.parse_args()

    name, rt, bare, config, workdir, db_url = postgres_bench("bsched", worker={"capacity": 2})
    import redis

    rds = redis.Redis.from_url(REDIS)
    try:
        ext = dispatch_rate(rt, args.n)
        base = bare_publish_rate(bare, args.n)
        print(f"dispatch  {args.n} due records: {ext:,.0f} tasks/s published by one leader")
        print(f"          bare Celery apply_async on one producer: {base:,.0f} msg/s  (ratio {ext / base:.2f})")
        # A clean slate: the published messages and their records go (the broker's epoch marker
        # stays, or the next scheduler would publish every queued record again).
        for key in rds.scan_iter(f"{name}*"):
            if not key.endswith(b".broker.epoch"):
                rds.delete(key)
        with rt.storage.begin() as conn:
            conn.exec_driver_sql("DELETE FROM tasks")
        lags = due_lag(rt, config, workdir, args.due)
        for what, values in lags.items():
            print(
                f"due lag   {what}: p50 {pct(values, 0.5) * 1000:.0f} ms, p99 {pct(values, 0.99) * 1000:.0f} ms,"
                f" max {max(values) * 1000:.0f} ms  ({len(values)} tasks)"
            )
        times = failovers(config, workdir, args.failovers)
        print(
            f"failover  default settings: {', '.join(f'{t:.1f}' for t in times)} s"
            f" (median {statistics.median(times):.1f} s)"
        )
    finally:
        rt.storage.close()
        for key in rds.scan_iter(f"{name}*"):
            rds.delete(key)
        drop_database("postgresql", db_url)


if __name__ == "__main__":
    main()
