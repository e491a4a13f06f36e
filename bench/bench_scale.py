"""Scale curve: end-to-end no-op throughput as workers grow, celery_ext against bare Celery in the
same run; then ``list`` over a large store while tasks flow.

Part 1, for each shape (one worker with ``-c`` 1, 2 and 4; then 1, 2 and 3 workers of ``-c 2`` on
this one machine): start that shape's workers for both sides (bare Celery on bench/bare_app.py with
Redis results, celery_ext with PostgreSQL records; the same settings as bench_core), run N no-op
tasks through each side, round after round, the order alternating, and stop them.  The ratio of a
shape is the median of its rounds' ratios.

Part 2 (``--records``, default 1,000,000; 0 skips it): fill the store with that many records (one
INSERT ... SELECT from generate_series, as bench_api), start one celery_ext worker (``-c 2``) and a
background flow of ``--flow-rate`` tasks/s (bench/flow.py), and time ``TaskManager.list`` from one
thread, one call after another, for ``--seconds``: the first page, a status filter, a type filter
and the next page by cursor.  Then the same without the flow.

    .venv/bin/python bench/bench_scale.py [--n 1500] [--rounds 3] [--records 1000000] [--flow-rate 40]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import REDIS, postgres_bench  # noqa: E402
from bench.bench_api import fill  # noqa: E402
from bench.bench_core import pct, run_bare, run_ext  # noqa: E402
from tests.support.services import drop_database  # noqa: E402
from tests.support.workers import WorkerProcess  # noqa: E402

SHAPES = [(1, 1), (1, 2), (1, 4), (2, 2), (3, 2)]  # (workers, processes each)


def workers(config: Path, side: str, count: int, concurrency: int, queue: str) -> list[WorkerProcess]:
    import os

    out = []
    for _ in range(count):
        extra = ["-E"] if side == "bare" else ["-E", "--capacity", str(concurrency)]
        w = WorkerProcess(config, concurrency=concurrency, extra_args=extra)
        if side == "bare":
            w.args[w.args.index("celery_ext")] = "bench.bare_app"
            w.args += ["-Q", queue]
            w.env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{w.env.get('PYTHONPATH', '')}"
        out.append(w.start())
    return out


def curve(b: Any, rds: Any, n: int, rounds: int) -> list[tuple[tuple[int, int], list[float], list[float]]]:
    rt = b.rt
    out = []
    for shape in SHAPES:
        count, concurrency = shape
        started = workers(b.config, "bare", count, concurrency, f"{b.name}.bare") + workers(
            b.config, "ext", count, concurrency, ""
        )
        bare, ext = [], []
        try:
            run_bare(b.bare, rds, 100)  # warm up both
            run_ext(rt.manager, rt.storage, 100, rt.storage.tasks.count_by_status().get("succeeded", 0))
            for r in range(rounds):
                for side in ("bare", "ext") if r % 2 == 0 else ("ext", "bare"):
                    if side == "bare":
                        bare.append(run_bare(b.bare, rds, n))
                    else:
                        before = rt.storage.tasks.count_by_status().get("succeeded", 0)
                        ext.append(run_ext(rt.manager, rt.storage, n, before))
            ratios = [e / x for e, x in zip(ext, bare, strict=True)]
            print(
                f"{count} worker(s) x -c {concurrency}: bare {statistics.median(bare):,.0f}/s  celery_ext "
                f"{statistics.median(ext):,.0f}/s  ratio {statistics.median(ratios):.2f} "
                f"(rounds {min(ratios):.2f}-{max(ratios):.2f})",
                flush=True,
            )
            out.append((shape, bare, ext))
        finally:
            for w in started:
                w.stop()
            for key in rds.scan_iter("celery-task-meta-*"):
                rds.delete(key)
    return out


def list_timings(manager: Any, seconds: float) -> dict[str, list[float]]:
    from celery_ext.model import TaskFilter, TaskStatus

    queries = {
        "first page": TaskFilter(limit=50),
        "status=failed": TaskFilter(status=(TaskStatus.FAILED,), limit=50),
        "type=send_email": TaskFilter(task_type=("send_email",), limit=50),
    }
    out: dict[str, list[float]] = {k: [] for k in [*queries, "next page (cursor)"]}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for key, flt in queries.items():
            t0 = time.perf_counter()
            page = manager.list(flt)
            out[key].append(time.perf_counter() - t0)
            if key == "first page" and page.next_cursor:
                t0 = time.perf_counter()
                manager.list(TaskFilter(limit=50, cursor=page.next_cursor))
                out["next page (cursor)"].append(time.perf_counter() - t0)
    return out


def report_list(title: str, timings: dict[str, list[float]], seconds: float) -> None:
    calls = sum(len(v) for v in timings.values())
    print(f"\n{title}: {calls / seconds:,.0f} list calls/s from one thread")
    for key, values in timings.items():
        print(f"  {key:20s} p50 {pct(values, 0.5) * 1e3:6.1f} ms  p95 {pct(values, 0.95) * 1e3:6.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--flow-rate", type=float, default=40.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--skip-curve", action="store_true")
    args = parser.parse_args()

    import redis

    from bench.flow import Flow

    b = postgres_bench("bscale", app={"log_level": "WARNING"})
    rds = redis.Redis.from_url(REDIS)
    try:
        if not args.skip_curve:
            curve(b, rds, args.n, args.rounds)
        if args.records:
            t0 = time.monotonic()
            fill(b.db_url, args.records)
            print(f"\n{args.records:,} records written in {time.monotonic() - t0:.0f} s", flush=True)
            (worker,) = workers(b.config, "ext", 1, 2, "")
            try:
                flow = Flow("ext", b.config, args.flow_rate).start()
                try:
                    flowing = list_timings(b.rt.manager, args.seconds)
                finally:
                    kept = flow.stop()
                report_list(f"list with {args.records:,} records, {kept:.0f} tasks/s flowing", flowing, args.seconds)
                report_list(
                    f"list with {args.records:,} records, no flow",
                    list_timings(b.rt.manager, args.seconds),
                    args.seconds,
                )
            finally:
                worker.stop()
    finally:
        b.rt.storage.close()
        for key in rds.scan_iter(f"{b.name}*"):
            rds.delete(key)
        drop_database("postgresql", b.db_url)


if __name__ == "__main__":
    main()
