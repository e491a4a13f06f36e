"""Core benchmark: N no-op tasks end to end through bare Celery and through celery_ext.

Same Redis broker, same pool (prefork -c 2), same reliability settings (acks_late,
reject_on_worker_lost, prefetch 1, JSON, task events on), interleaved round by round in one run:
  bare  ``bench.noop`` on bench/bare_app.py with a Redis result backend; done = every result stored.
  ext   celery_ext ``echo`` with task records in PostgreSQL (a fresh database); done = every record
        succeeded.  Submitted with ``submit_many`` (one insert, one producer).
Also the submit rate of ``submit``, ``submit_many`` and bare ``apply_async`` (no worker running),
and submit-to-result latency of one task at a time, four ways interleaved: ``manager.submit`` +
``manager.wait``, ``manager.submit`` + ``AsyncResult.get``, ``send_task(...).get()`` on celery_ext's
app (a plain Celery call: the worker records it on receipt), bare ``apply_async().get()``.

    .venv/bin/python bench/bench_core.py [--n 2000] [--rounds 5] [--storage postgresql|sqlite|mysql]

``--memory-only``: only the workers' memory, ``--rounds`` times: both workers started afresh, the
same short load through each (``--n`` tasks, 200 by default here), then PSS of each worker's main
process and pool children once idle.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import REDIS, cpu_snapshot, tree_pss_mb, wait_until  # noqa: E402
from bench import bare_worker as bare_worker_process  # noqa: E402
from celery_ext.runtime import runtime_of  # noqa: E402
from tests.support.services import create_database, drop_database, unique  # noqa: E402
from tests.support.workers import WorkerProcess, write_config  # noqa: E402

# Waiting must cost both sides alike and little: poll one cheap thing (the last task of the
# batch) until it is done, then check the whole batch once.  A full count every poll would
# steal the workers' CPU on a 2-core machine and skew the ratio.


def run_bare(app: Any, rds: Any, n: int) -> float:
    start = time.perf_counter()
    with app.producer_or_acquire() as producer:
        ids = [app.tasks["bench.noop"].apply_async(producer=producer).id for _ in range(n)]
    keys = [f"celery-task-meta-{i}" for i in ids]
    wait_until(lambda: rds.exists(keys[-1]) == 1)
    wait_until(lambda: sum(int(rds.exists(*keys[i : i + 500])) for i in range(0, n, 500)) >= n)
    return n / (time.perf_counter() - start)


def run_ext(manager: Any, storage: Any, n: int, before: int) -> float:
    from celery_ext.model import TERMINAL

    start = time.perf_counter()
    for i in range(0, n, 500):
        last = manager.submit_many([{"task_type": "echo", "payload": {}, "max_retries": 0}] * min(500, n - i))[-1]
    wait_until(lambda: storage.tasks.get(last.task_id).status in TERMINAL)
    wait_until(lambda: storage.tasks.count_by_status().get("succeeded", 0) >= before + n)
    return n / (time.perf_counter() - start)


def submit_rates(manager: Any, app: Any, n: int) -> dict[str, float]:
    rates = {}
    start = time.perf_counter()
    for _ in range(n):
        manager.submit("echo", {}, max_retries=0)
    rates["submit"] = n / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(0, n, 100):
        manager.submit_many([{"task_type": "echo", "payload": {}, "max_retries": 0}] * min(100, n - i))
    rates["submit_many(100)"] = n / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(n):
        app.tasks["bench.noop"].apply_async()
    rates["bare apply_async"] = n / (time.perf_counter() - start)
    return rates


def probes(manager: Any, ext_app: Any, bare: Any) -> dict[str, Callable[[], float]]:
    """Each way of waiting for one task, as a function that submits one and returns the time to
    its result."""
    noop = bare.tasks["bench.noop"]

    def wait() -> float:
        start = time.perf_counter()
        manager.wait(manager.submit("echo", {}, max_retries=0).task_id, 30)
        return time.perf_counter() - start

    def get() -> float:
        start = time.perf_counter()
        ext_app.AsyncResult(manager.submit("echo", {}, max_retries=0).task_id).get(timeout=30)
        return time.perf_counter() - start

    def celery_get() -> float:
        start = time.perf_counter()
        ext_app.send_task("echo", kwargs={}).get(timeout=30)
        return time.perf_counter() - start

    def bare_get() -> float:
        start = time.perf_counter()
        noop.apply_async().get(timeout=30)
        return time.perf_counter() - start

    return {
        "celery_ext manager.wait": wait,
        "celery_ext AsyncResult.get": get,
        "celery_ext send_task().get": celery_get,
        "bare Celery AsyncResult.get": bare_get,
    }


def latencies(ways: dict[str, Callable[[], float]], n: int) -> dict[str, list[float]]:
    """Submit-to-result time of one task at a time, the ways interleaved."""
    out: dict[str, list[float]] = {key: [] for key in ways}
    order = list(ways.items())
    shuffle = random.Random(n).shuffle
    # Not measured: each way's first waits set up its subscription, and bare Celery's first
    # drains what the throughput rounds left on it (apply_async subscribes to every task's
    # result channel; the rounds never read them): 1.5 s, which was the whole p99 at n=100.
    for _ in range(3):
        for _key, probe in order:
            probe()
    for _ in range(n):
        # A fresh order each time: what one way leaves behind (its worker finishing the task's
        # ack and events on this 2-core machine, a late message) lands on each other way alike.
        # A rotation kept the cycle, so the way after bare Celery's paid 0.1-0.2 ms more at p50.
        shuffle(order)
        for key, probe in order:
            out[key].append(probe())
    return out


def loaded_latencies(
    ways: dict[str, Callable[[], float]],
    config_path: Path,
    rds: Any,
    storage: Any,
    n: int,
    rate: float,
    queue: str,
    paced: bool = False,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """``latencies`` while a background flow of ``rate`` tasks/s (``bench.flow``, its own process)
    runs through the same worker as the probe: celery_ext's two ways under a celery_ext flow, bare
    Celery's under a bare flow.  In blocks, the sides' order alternating; each block drains its
    backlog before the next.  Also returns each block's flow rate kept, and its backlog at the end."""
    from bench.flow import Flow
    from celery_ext.model import TERMINAL

    def backlog(side: str) -> int:
        if side == "bare":
            return int(rds.llen(queue))
        return sum(v for k, v in storage.tasks.count_by_status().items() if k not in {s.value for s in TERMINAL})

    sides = {"ext": {k: w for k, w in ways.items() if k.startswith("celery_ext")}}
    sides["bare"] = {k: w for k, w in ways.items() if k not in sides["ext"]}
    out: dict[str, list[float]] = {key: [] for key in ways}
    kept: dict[str, list[float]] = {"ext rate": [], "bare rate": [], "ext backlog": [], "bare backlog": []}
    blocks = 4
    for b in range(blocks):
        for side in ("ext", "bare") if b % 2 == 0 else ("bare", "ext"):
            flow = Flow(side, config_path if side == "ext" else None, rate, paced=paced).start()
            try:
                for key, values in latencies(sides[side], max(1, n // blocks)).items():
                    out[key] += values
            except Exception as exc:  # noqa: BLE001 - a probe timed out: more flow than this side sustains
                print(f"block {b + 1}, {side}: a probe gave up ({exc}); flow not sustained", flush=True)
            kept[f"{side} backlog"].append(backlog(side))
            kept[f"{side} rate"].append(flow.stop())
            wait_until(lambda side=side: backlog(side) == 0)
    return out, kept


def start_workers(config_path: Path, name: str) -> tuple[WorkerProcess, WorkerProcess]:
    """The two workers compared, same settings (prefork -c 2, events on): bare Celery's
    (``bench/bare_app.py`` on its own queue) and celery_ext's, both started."""
    bare_worker = bare_worker_process(config_path, f"{name}.bare")
    ext_worker = WorkerProcess(config_path, concurrency=2, extra_args=["-E"])
    try:
        bare_worker.start()
        ext_worker.start()
    except BaseException:
        bare_worker.stop()
        ext_worker.stop()
        raise
    return bare_worker, ext_worker


def worker_memory(bare_worker: WorkerProcess, ext_worker: WorkerProcess) -> dict[str, list[float]]:
    """PSS (MB) of each worker's main process, then of its pool children, once idle."""
    time.sleep(2)  # idle after the run
    return {"bare": tree_pss_mb(bare_worker.pid), "ext": tree_pss_mb(ext_worker.pid)}


def memory_only(config_path: Path, name: str, bare: Any, rds: Any, rt: Any, n: int, rounds: int) -> None:
    """``--memory-only``: fresh workers each round, the same ``n`` tasks through each, then their
    memory; the median and range of the rounds."""
    totals: dict[str, list[float]] = {"bare": [], "ext": []}
    ratios = []
    for r in range(rounds):
        bare_worker, ext_worker = start_workers(config_path, name)
        try:
            run_bare(bare, rds, n)
            run_ext(rt.manager, rt.storage, n, rt.storage.tasks.count_by_status().get("succeeded", 0))
            memory = worker_memory(bare_worker, ext_worker)
        finally:
            bare_worker.stop()
            ext_worker.stop()
        parts = []
        for side in ("bare", "ext"):
            totals[side].append(sum(memory[side]))
            parts.append(f"{side} {totals[side][-1]:5.1f} MB (" + " + ".join(f"{v:.1f}" for v in memory[side]) + ")")
        ratios.append(totals["ext"][-1] / totals["bare"][-1])
        print(f"round {r + 1}: " + "   ".join(parts) + f"   ratio {ratios[-1]:.3f}", flush=True)
    print(f"\nworker memory, PSS of the main process + its 2 pool children, idle after {n} tasks, {rounds} rounds:")
    for side, label in (("bare", "bare Celery"), ("ext", "celery_ext")):
        values = totals[side]
        print(f"  {label:<12}: median {statistics.median(values):6.1f} MB   range {min(values):.1f}-{max(values):.1f}")
    print(
        f"  ratio       : median {statistics.median(ratios):.3f}   range {min(ratios):.3f}-{max(ratios):.3f}"
        "   (target <= 1.15)"
    )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=None, help="tasks a round and side (2000)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--storage", default="postgresql", choices=["postgresql", "mysql", "sqlite"])
    parser.add_argument("--latency-n", type=int, default=300, help="tasks per side for submit-to-result latency")
    parser.add_argument(
        "--latency-only", action="store_true", help="only the latency probes (no rounds, memory or submit rates)"
    )
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="only the workers' memory, --rounds times, after --n tasks each (200 unless given)",
    )
    parser.add_argument(
        "--synchronous-commit",
        default="outcomes",
        choices=["outcomes", "always"],
        help="PostgreSQL: storage.config.synchronous_commit of celery_ext's records",
    )
    parser.add_argument(
        "--cpu", action="store_true", help="also CPU ms per task of each process, per side, summed over the rounds"
    )
    parser.add_argument(
        "--load-rate", type=float, default=0, help="also latency under a background flow of this many tasks/s"
    )
    parser.add_argument(
        "--paced",
        action="store_true",
        help="the --load-rate flow sends one task at a time, evenly spaced (submit against apply_async), "
        "instead of a batch every 10 ms (bench/flow.py)",
    )
    args = parser.parse_args()
    if args.n is None:
        args.n = 200 if args.memory_only else 2000
    return args


class Setup(NamedTuple):
    name: str
    bare: Any  # bench/bare_app.py's app, on its own queue
    db_url: str | None
    config_path: Path
    rt: Any  # celery_ext's runtime, in this process
    rds: Any


def setup(args: argparse.Namespace) -> Setup:
    """A fresh database and config for celery_ext, and the bare app, both on one Redis."""
    import redis

    from celery_ext.config import parse_config
    from celery_ext.factory import create_app

    name = unique("bench")
    os.environ["BENCH_REDIS_URL"] = REDIS
    os.environ["BENCH_BARE_QUEUE"] = f"{name}.bare"
    from bench.bare_app import app as bare

    db_url = create_database(args.storage) if args.storage != "sqlite" else None
    workdir = Path(tempfile.mkdtemp(prefix="bench-core-"))
    data = {
        "app": {"name": name, "log_level": "WARNING"},
        "broker": {"url": REDIS},
        "worker": {"capacity": 2},
        "storage": {
            "type": args.storage,
            "config": {"url": db_url, "synchronous_commit": args.synchronous_commit} if db_url else {},
        },
    }
    config_path = write_config(workdir, data)
    rt = runtime_of(create_app(parse_config(data, source=str(config_path))))
    rt.storage.migrate()
    return Setup(name, bare, db_url, config_path, rt, redis.Redis.from_url(REDIS))


def main() -> None:
    args = parse_args()
    run = setup(args)
    try:
        if args.memory_only:
            memory_only(run.config_path, run.name, run.bare, run.rds, run.rt, args.n, args.rounds)
        else:
            full(args, run)
    finally:
        run.rt.storage.close()
        if run.db_url:
            drop_database(args.storage, run.db_url)


def full(args: argparse.Namespace, run: Setup) -> None:
    """Everything but ``--memory-only``: submit rates, rounds, latency, memory."""
    name, bare, _, config_path, rt, rds = run
    # Submit rates first, with no worker consuming (queues are purged afterwards).
    rates = {} if args.latency_only else submit_rates(rt.manager, bare, max(200, args.n // 4))
    for key in rds.scan_iter(f"{name}.*"):
        rds.delete(key)
    rt.storage.tasks.purge_all() if hasattr(rt.storage.tasks, "purge_all") else None

    results: dict[str, list[float]] = {"bare": [], "ext": []}
    ratios: list[float] = []
    rounds = 0 if args.latency_only else args.rounds
    bare_worker, ext_worker = start_workers(config_path, name)
    workers = {"bare": bare_worker, "ext": ext_worker}
    pids = {key: w.pid for key, w in workers.items()}
    cpu: dict[str, dict[str, float]] = {"bare": {}, "ext": {}}
    try:
        run_bare(bare, rds, 100)  # warm up both
        run_ext(rt.manager, rt.storage, 100, rt.storage.tasks.count_by_status().get("succeeded", 0))
        for r in range(rounds):
            # Each round runs both back to back, the order alternating, so that a slow spell of a
            # shared machine lands on both sides of a round's ratio.
            for side in ("bare", "ext") if r % 2 == 0 else ("ext", "bare"):
                before_cpu = cpu_snapshot(pids) if args.cpu else {}
                if side == "bare":
                    results["bare"].append(run_bare(bare, rds, args.n))
                else:
                    before = rt.storage.tasks.count_by_status().get("succeeded", 0)
                    results["ext"].append(run_ext(rt.manager, rt.storage, args.n, before))
                for key, value in cpu_snapshot(pids).items() if args.cpu else ():
                    cpu[side][key] = cpu[side].get(key, 0.0) + value - before_cpu[key]
            ratios.append(results["ext"][-1] / results["bare"][-1])
            print(
                f"round {r + 1}: bare {results['bare'][-1]:.0f}/s  celery_ext {results['ext'][-1]:.0f}/s  "
                f"ratio {ratios[-1]:.2f}",
                flush=True,
            )
        ways = probes(rt.manager, rt.celery, bare)
        latency = latencies(ways, args.latency_n)
        loaded = (
            loaded_latencies(
                ways, config_path, rds, rt.storage, args.latency_n, args.load_rate, f"{name}.bare", args.paced
            )
            if args.load_rate
            else None
        )
        memory = worker_memory(bare_worker, ext_worker)
    finally:
        bare_worker.stop()
        ext_worker.stop()

    if rounds:
        report_rounds(args, results, ratios)
    if args.cpu and rounds:
        report_cpu(cpu, args.n * rounds)
    print(f"\nsubmit-to-result latency, one task at a time (n={args.latency_n} each, interleaved):")
    bare_p50 = pct(latency["bare Celery AsyncResult.get"], 0.5)
    for key, values in latency.items():
        p50 = pct(values, 0.5)
        print(
            f"  {key:<28}: p50 {p50 * 1000:6.2f} ms   p99 {pct(values, 0.99) * 1000:6.2f} ms"
            f"   p50 ratio to bare {p50 / bare_p50:.3f}"
        )
    if loaded is not None:
        report_loaded(args, *loaded)
    if args.latency_only:
        return
    report_memory(memory)
    print("\nsubmit rate (no worker running):")
    for key, value in rates.items():
        print(f"  {key:<20}: {value:8.0f} /s")


def report_cpu(cpu: dict[str, dict[str, float]], tasks: int) -> None:
    print(f"\nCPU per task, ms, summed over the rounds ({tasks} tasks a side), while each side ran:")
    print(f"  {'process':<26}{'bare run':>10}{'ext run':>10}")
    for key in cpu["bare"]:
        print(f"  {key:<26}{cpu['bare'][key] * 1000 / tasks:>10.3f}{cpu['ext'][key] * 1000 / tasks:>10.3f}")
    totals = {side: sum(cpu[side].values()) * 1000 / tasks for side in ("bare", "ext")}
    print(f"  {'total':<26}{totals['bare']:>10.3f}{totals['ext']:>10.3f}")


def report_memory(memory: dict[str, list[float]]) -> None:
    print("\nworker memory, PSS of the main process and its 2 pool children, idle after the run:")
    bare_mb, ext_mb = sum(memory["bare"]), sum(memory["ext"])
    print(f"  bare Celery : {bare_mb:6.1f} MB")
    print(f"  celery_ext  : {ext_mb:6.1f} MB   ratio {ext_mb / bare_mb:.2f} (target <= 1.15)")


def report_loaded(args: argparse.Namespace, latency: dict[str, list[float]], kept: dict[str, list[float]]) -> None:
    shape = "one task at a time, evenly spaced" if args.paced else "a batch every 10 ms"
    print(f"\nsubmit-to-result latency under a background flow of {args.load_rate:g} tasks/s ({shape}):")
    for side in ("ext", "bare"):
        rates, left = kept[f"{side} rate"], kept[f"{side} backlog"]
        print(f"  {side} flow kept {min(rates):.0f}-{max(rates):.0f}/s, backlog at the blocks' ends {left}")
    for key, values in latency.items():
        if values:
            print(f"  {key:<28}: p50 {pct(values, 0.5) * 1000:6.1f} ms   p99 {pct(values, 0.99) * 1000:6.1f} ms")


def report_rounds(args: argparse.Namespace, results: dict[str, list[float]], ratios: list[float]) -> None:
    bare_med, ext_med = statistics.median(results["bare"]), statistics.median(results["ext"])
    print(f"\nend to end, N={args.n}, median of {args.rounds} rounds, prefork -c 2, events on:")
    print(f"  bare Celery + Redis result backend : {bare_med:8.0f} tasks/s")
    print(f"  celery_ext + {args.storage:<10} records   : {ext_med:8.0f} tasks/s")
    print(
        f"  ratio celery_ext / bare            : {statistics.median(ratios):8.2f}  (median of the rounds' "
        f"ratios {min(ratios):.2f}-{max(ratios):.2f}; target >= 1.0)"
    )


if __name__ == "__main__":
    main()
