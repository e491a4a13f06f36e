"""A second harness for the end-to-end ratio, independent of bench_core's producers and waits.

bench_core.py times a batch producer in the benchmark's own process (``submit_many`` against
``apply_async``) until it sees the last result.  This harness measures the workers another way,
so that a blind spot of one method shows up as a difference between the two:

- each side runs alone: one worker at a time (prefork -c 2, ``-E``), started afresh for each
  measurement, on a private ``redis-server`` (the system one, by full path, on a free port);
- producers are processes of their own, one message at a time;
- the time of each task's end is the worker's own: the record's ``finished_at`` (celery_ext,
  PostgreSQL) or the result's ``date_done`` (bare Celery, Redis result backend), read after the
  run; the harness polls only the last task meanwhile;
- besides the rate, the CPU a task costs each part (the worker's processes, PostgreSQL, Redis,
  the producer's sends): on a shared 2-core machine a rate moves with the neighbours, CPU less.

Modes (``--modes``, all by default):
  drain         the queue is filled first by a producer that imports only ``celery``
                (bench/plain_send.py, ``send_task`` by name to the default queue ``celery``), then
                the worker starts: rate = (N - 1) / (last end - first end).  celery_ext records
                each message on receipt.
  drain-native  the same with each side's own producer: celery_ext ``submit`` (no worker is
                registered, so messages wait in the type's queue), bare ``apply_async``.
  plain         the worker runs; the plain producer sends N as fast as it can: rate = N / (last
                end - the producer's first send).
  native        the same with ``submit`` against ``apply_async``, one at a time.

    .venv/bin/python bench/bench_plain.py [--n 2000] [--rounds 3] [--modes drain,plain,...]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import bare_worker, cpu_snapshot, wait_until  # noqa: E402
from tests.support.private import PrivateRedis  # noqa: E402
from tests.support.services import create_database, drop_database, unique  # noqa: E402
from tests.support.workers import WorkerProcess, write_config  # noqa: E402

MODES = ("drain", "drain-native", "plain", "native")
BARE_QUEUE = "celery"  # the bare worker consumes Celery's default queue: a plain send needs no queue


def _native(side: str, config_path: str, n: int, out: Any) -> None:
    """A producer process of each side's own API, one task at a time."""
    sys.path.insert(0, str(ROOT))
    if side == "bare":
        from bench.bare_app import app

        noop = app.tasks["bench.noop"]
        noop.apply_async().forget()  # connects before the clock starts (its result is not counted)
        start, cpu = time.time(), time.process_time()
        ids = [noop.apply_async().id for _ in range(n)]
    else:
        from celery_ext.config import load_config
        from celery_ext.factory import create_app

        manager = create_app(load_config(config_path)).celery_ext.manager  # type: ignore[attr-defined]
        manager.submit("echo", {}, max_retries=0)  # connects before the clock starts, as bare's above
        start, cpu = time.time(), time.process_time()
        ids = [manager.submit("echo", {}, max_retries=0).task_id for _ in range(n)]
    out.put({"start": start, "cpu": time.process_time() - cpu, "ids": ids})


class Harness:
    def __init__(self, n: int) -> None:
        import redis
        from sqlalchemy import create_engine

        self.n = n
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-plain-"))
        self.redis = PrivateRedis(self.workdir)
        self.redis.start()
        self.rds = redis.Redis.from_url(self.redis.url)
        self.db_url = create_database("postgresql")
        self.engine = create_engine(self.db_url.replace("postgresql://", "postgresql+psycopg://"))
        self.name = unique("plain")
        data = {
            "app": {"name": self.name, "data_dir": str(self.workdir)},
            "broker": {"url": self.redis.url},
            "worker": {"capacity": 2},
            "storage": {"type": "postgresql", "config": {"url": self.db_url}},
        }
        self.config = write_config(self.workdir, data)
        os.environ["BENCH_REDIS_URL"] = self.redis.url
        os.environ["BENCH_BARE_QUEUE"] = BARE_QUEUE
        from celery_ext.config import parse_config
        from celery_ext.factory import create_app
        from celery_ext.runtime import runtime_of

        rt = runtime_of(create_app(parse_config(data, source=str(self.config))))
        rt.storage.migrate()
        rt.storage.close()

    def close(self) -> None:
        self.engine.dispose()
        self.redis.kill()
        drop_database("postgresql", self.db_url)

    def worker(self, side: str) -> WorkerProcess:
        if side == "bare":
            return bare_worker(self.config, BARE_QUEUE)
        return WorkerProcess(self.config, concurrency=2, extra_args=["-E"])

    # --- producers ---------------------------------------------------------------------------

    def plain(self, side: str) -> dict[str, Any]:
        name = "bench.noop" if side == "bare" else "echo"
        script = str(ROOT / "bench" / "plain_send.py")
        out = subprocess.run(
            [sys.executable, "-I", script, self.redis.url, name, str(self.n)],
            check=True,
            capture_output=True,
            cwd=self.workdir,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        ).stdout
        return dict(json.loads(out))

    def native(self, side: str) -> dict[str, Any]:
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_native, args=(side, str(self.config), self.n, queue))
        proc.start()
        got = dict(queue.get(timeout=600))
        proc.join(60)
        return got

    # --- each side's own record of when its tasks ended ----------------------------------------

    def ends(self, side: str, ids: list[str]) -> list[float | None]:
        """The time each task ended, by the worker's clock (None: not yet)."""
        if side == "bare":
            raw = [
                v
                for i in range(0, len(ids), 500)
                for v in self.rds.mget([f"celery-task-meta-{t}" for t in ids[i : i + 500]])
            ]
            return [_stamp(json.loads(v)["date_done"]) if v else None for v in raw]
        from sqlalchemy import text

        with self.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT task_id, finished_at FROM tasks WHERE task_id = ANY(:ids) AND status = 'succeeded'"),
                {"ids": ids},
            ).all()
        done = {task_id: at.timestamp() for task_id, at in rows}
        return [done.get(t) for t in ids]

    def wait(self, side: str, ids: list[str]) -> list[float]:
        wait_until(lambda: self.ends(side, ids[-1:])[0] is not None, 300)
        ends: list[float | None] = []

        def all_done() -> bool:
            nonlocal ends
            ends = self.ends(side, ids)
            return None not in ends

        wait_until(all_done, 300)
        return [e for e in ends if e is not None]

    # --- one measurement -----------------------------------------------------------------------

    def measure(self, side: str, mode: str) -> tuple[float, dict[str, float]]:
        """The rate of one run, and the CPU ms a task of each part."""
        send = self.plain if mode in ("drain", "plain") else self.native
        cpu: dict[str, float] = {}
        if mode.startswith("drain"):
            sent = send(side)
            worker = self.worker(side).start()
            try:
                before = cpu_snapshot({side: worker.pid})
                ends = sorted(self.wait(side, sent["ids"]))
                after = cpu_snapshot({side: worker.pid})
            finally:
                worker.stop()
            rate = (len(ends) - 1) / (ends[-1] - ends[0])
        else:
            worker = self.worker(side).start()
            try:
                before = cpu_snapshot({side: worker.pid})
                sent = send(side)
                ends = self.wait(side, sent["ids"])
                after = cpu_snapshot({side: worker.pid})
            finally:
                worker.stop()
            rate = len(ends) / (max(ends) - sent["start"])
        for key in ("worker main", "worker pool", "postgres", "redis"):
            full = f"{side} {key}" if key.startswith("worker") else key
            cpu[key] = after[full] - before[full]
        cpu["producer"] = sent["cpu"]  # the sends only, as the producer measured them
        return rate, {key: value * 1000 / len(ends) for key, value in cpu.items()}


def _stamp(value: str) -> float:
    at = datetime.fromisoformat(value)
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="tasks a measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; known: {', '.join(MODES)}")
    harness = Harness(args.n)
    rates: dict[tuple[str, str], list[float]] = {(m, s): [] for m in modes for s in ("bare", "ext")}
    cpu: dict[tuple[str, str], list[dict[str, float]]] = {key: [] for key in rates}
    try:
        for r in range(args.rounds):
            for mode in modes:
                # Each round runs both sides back to back, the order alternating.
                for side in ("bare", "ext") if r % 2 == 0 else ("ext", "bare"):
                    rate, used = harness.measure(side, mode)
                    rates[mode, side].append(rate)
                    cpu[mode, side].append(used)
                bare, ext = rates[mode, "bare"][-1], rates[mode, "ext"][-1]
                print(
                    f"round {r + 1} {mode:<13}: bare {bare:6.0f}/s  celery_ext {ext:6.0f}/s  ratio {ext / bare:.2f}",
                    flush=True,
                )
    finally:
        harness.close()
    report(args, modes, rates, cpu)


def report(
    args: argparse.Namespace,
    modes: list[str],
    rates: dict[tuple[str, str], list[float]],
    cpu: dict[tuple[str, str], list[dict[str, float]]],
) -> None:
    print(f"\nsecond harness, N={args.n}, {args.rounds} rounds, one worker at a time (prefork -c 2, -E):")
    for mode in modes:
        bare, ext = rates[mode, "bare"], rates[mode, "ext"]
        ratios = [e / b for e, b in zip(ext, bare, strict=True)]
        print(
            f"  {mode:<13}: bare {statistics.median(bare):6.0f}/s  celery_ext {statistics.median(ext):6.0f}/s"
            f"  ratio {statistics.median(ratios):.2f} (rounds {min(ratios):.2f}-{max(ratios):.2f})"
        )
    # What a task costs the machine is what bounds the rate on 2 cores: the worker's side (its
    # processes, PostgreSQL, Redis) and the producer's.
    served = ("worker main", "worker pool", "postgres", "redis")
    print("\nCPU ms a task, median of the rounds; ratio = bare / celery_ext of the served side's total:")
    for mode in modes:
        line = []
        totals = {}
        for side in ("bare", "ext"):
            runs = cpu[mode, side]
            parts = {p: statistics.median(u[p] for u in runs) for p in (*served, "producer")}
            totals[side] = statistics.median(sum(u[p] for p in served) for u in runs)
            line.append(
                f"{side} served {totals[side]:.2f} (main {parts['worker main']:.2f}, pool {parts['worker pool']:.2f},"
                f" pg {parts['postgres']:.2f}, redis {parts['redis']:.2f}) producer {parts['producer']:.2f}"
            )
        print(f"  {mode:<13}: " + "\n  ".ljust(18).join(line) + f"\n{'':<17}ratio {totals['bare'] / totals['ext']:.2f}")


if __name__ == "__main__":
    main()
