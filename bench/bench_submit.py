"""Submit benchmark: producer-side rates only (no worker), against bare Celery in the same run.

Round after round, interleaved, on one Redis broker and task records in PostgreSQL (a fresh
database):
  bare       ``apply_async`` of a no-op task, one call per message (the default producer pool)
  submit     ``manager.submit`` one task at a time (insert written queued, publish: no mark on Redis)
  submit-durable  the same with every write waiting for the disk (``synchronous_commit: always``)
  many(B)    ``manager.submit_many`` in batches of B (one insert, one pipelined publish)
  dispatch   N due records (SCHEDULED) published by one in-process leader (``Scheduler.tick``)
Each round prints its rates and the ratios to ``bare`` of the same round; ``--cpu`` also the CPU
each side cost a task, summed over the rounds: this process (the producer), the PostgreSQL
server (all its processes: the insert, its WAL) and Redis.

    .venv/bin/python bench/bench_submit.py [--n 5000] [--batch 1000] [--rounds 5] [--only many] [--cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import REDIS, cpu_snapshot, postgres_bench  # noqa: E402
from tests.support.schedulers import due_records  # noqa: E402
from tests.support.services import drop_database  # noqa: E402


def rate(n: int, run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return n / (time.perf_counter() - start)


def bare(app: Any, n: int) -> float:
    noop = app.tasks["bench.noop"]
    return rate(n, lambda: [noop.apply_async() for _ in range(n)] and None)


def submit(rt: Any, n: int) -> float:
    return rate(n, lambda: [rt.manager.submit("echo", {}, max_retries=0) for _ in range(n)] and None)


def many(rt: Any, n: int, batch: int) -> float:
    def run() -> None:
        for i in range(0, n, batch):
            rt.manager.submit_many([{"task_type": "echo", "payload": {"i": i}, "max_retries": 0}] * min(batch, n - i))

    return rate(n, run)


def dispatch(rt: Any, n: int) -> float:
    from celery_ext.scheduler import Scheduler

    with rt.storage.begin() as conn:  # no queued records left for the leader to re-publish
        conn.exec_driver_sql("DELETE FROM tasks")
    due_records(rt.storage, n, -5.0, -1.0)
    scheduler = Scheduler(rt)

    def run() -> None:
        published = 0
        while published < n:
            report = scheduler.tick()
            assert report.leader and not report.errors, report
            published += len(report.due)

    try:
        return rate(n, run)
    finally:
        scheduler.close()  # its storage thread
        assert scheduler.lease is not None
        scheduler.lease.release()


def durable(rt: Any, run: Callable[[], float]) -> float:
    """``run`` with every write waiting for the disk (``synchronous_commit: always``)."""
    tasks = rt.storage.tasks
    tasks.no_wait, kept = False, tasks.no_wait
    try:
        return run()
    finally:
        tasks.no_wait = kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", nargs="*", default=["submit", "many", "dispatch"])
    parser.add_argument("--cpu", action="store_true", help="also CPU us per task of each process, per side")
    args = parser.parse_args()

    import redis

    name, rt, bare_app, _, _, db_url = postgres_bench("bsubmit", app={"log_level": "WARNING"})
    rds = redis.Redis.from_url(REDIS)
    sides: dict[str, Callable[[], float]] = {
        "bare": lambda: bare(bare_app, args.n),
        "submit": lambda: submit(rt, args.n),
        "submit-durable": lambda: durable(rt, lambda: submit(rt, args.n)),
        "many": lambda: many(rt, args.n, args.batch),
        "dispatch": lambda: dispatch(rt, args.n),
    }
    order = ["bare", *args.only]
    results: dict[str, list[float]] = {k: [] for k in order}
    ratios: dict[str, list[float]] = {k: [] for k in args.only}
    cpu: dict[str, dict[str, float]] = {k: {} for k in order}
    try:
        many(rt, 500, 250)  # warm up
        submit(rt, 100)
        bare(bare_app, 200)
        for r in range(args.rounds):
            for side in order if r % 2 == 0 else order[::-1]:
                before = cpu_snapshot() if args.cpu else {}
                results[side].append(sides[side]())
                for key, value in cpu_snapshot().items() if args.cpu else ():
                    cpu[side][key] = cpu[side].get(key, 0.0) + value - before[key]
                for key in rds.scan_iter(f"{name}*"):
                    if not key.endswith(b".broker.epoch"):
                        rds.delete(key)
            for side in args.only:
                ratios[side].append(results[side][-1] / results["bare"][-1])
            print(
                f"round {r + 1}: "
                + "  ".join(f"{k} {results[k][-1]:,.0f}/s" for k in order)
                + "  ratios "
                + " ".join(f"{k} {ratios[k][-1]:.2f}" for k in args.only),
                flush=True,
            )
    finally:
        rt.storage.close()
        for key in rds.scan_iter(f"{name}*"):
            rds.delete(key)
        drop_database("postgresql", db_url)
    label = {"many": f"submit_many({args.batch})", "dispatch": "due dispatch"}
    print(f"\nmedian of {args.rounds} rounds, n={args.n} each, no worker running:")
    print(f"  {'bare apply_async':<20}: {statistics.median(results['bare']):8,.0f} /s")
    for side in args.only:
        print(
            f"  {label.get(side, side):<20}: {statistics.median(results[side]):8,.0f} /s   ratio to bare "
            f"{statistics.median(ratios[side]):.2f} (rounds {min(ratios[side]):.2f}-{max(ratios[side]):.2f})"
        )
    if args.cpu:
        tasks = args.n * args.rounds
        print(f"\nCPU per task, us, summed over the rounds ({tasks:,} tasks a side), while each side ran:")
        print(f"  {'side':<20}" + "".join(f"{key.split(' ')[0]:>12}" for key in cpu["bare"]))
        for side in order:
            print(f"  {label.get(side, side):<20}" + "".join(f"{v * 1e6 / tasks:>12.0f}" for v in cpu[side].values()))


if __name__ == "__main__":
    main()
