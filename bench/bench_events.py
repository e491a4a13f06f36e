"""Events, metrics and alert plugins on vs all off: end-to-end tasks/s, same run, interleaved.

Three clusters (own app name, own PostgreSQL database, own prefork -c 2 worker), run round by
round in one process:
  off    events.type local, no plugins, metrics null
  kombu  events.type kombu (fanout on Redis) + metrics plugin + alert plugin
  redis  events.type redis (Redis Stream)   + metrics plugin + alert plugin
N ``echo`` tasks via ``submit_many``; done = every record succeeded.  The alert plugin posts
nothing here (no task fails), so it measures its subscription cost; ``--subscribe`` also runs a
subscriber in this process that counts the events of each run.

    .venv/bin/python bench/bench_events.py [--n 1000] [--rounds 3] [--subscribe]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import REDIS, wait_until  # noqa: E402
from celery_ext.runtime import runtime_of  # noqa: E402
from tests.support.scrape import free_port  # noqa: E402
from tests.support.services import create_database, drop_database, unique  # noqa: E402
from tests.support.workers import WorkerProcess, write_config  # noqa: E402


def run(rt: Any, n: int) -> float:
    before = rt.storage.tasks.count_by_status().get("succeeded", 0)
    start = time.perf_counter()
    for i in range(0, n, 500):
        rt.manager.submit_many([{"task_type": "echo", "payload": {}, "max_retries": 0}] * min(500, n - i))
    try:
        wait_until(lambda: rt.storage.tasks.count_by_status().get("succeeded", 0) >= before + n)
    except TimeoutError:
        raise TimeoutError(f"{rt.config.app.name}: {rt.storage.tasks.count_by_status()}") from None
    return n / (time.perf_counter() - start)


def sections(kind: str) -> dict[str, Any]:
    if kind == "off":
        return {}
    return {
        "events": {"type": kind},
        "plugins": [
            {"name": "metrics", "config": {"prometheus_port": free_port()}},
            {"name": "alert", "config": {"webhook_url": f"http://127.0.0.1:{free_port()}/hook"}},
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--subscribe", action="store_true")
    args = parser.parse_args()

    from celery_ext.config import parse_config
    from celery_ext.events import build_event_bus
    from celery_ext.factory import create_app

    kinds = ["off", "kombu", "redis"]
    clusters: dict[str, Any] = {}
    received = {k: 0 for k in kinds}
    lock = threading.Lock()
    try:
        for kind in kinds:
            db = create_database("postgresql")
            data = {
                "app": {"name": unique("bev"), "log_level": "WARNING"},
                "broker": {"url": REDIS},
                "worker": {"capacity": 2},
                "storage": {"type": "postgresql", "config": {"url": db}},
                **sections(kind),
            }
            path = write_config(Path(tempfile.mkdtemp(prefix=f"bench-events-{kind}-")), data)
            cfg = parse_config(data, source=str(path))
            rt = runtime_of(create_app(cfg))
            rt.storage.migrate()
            worker = WorkerProcess(path, concurrency=2, extra_args=["-E"])
            clusters[kind] = {"db": db, "rt": rt, "worker": worker, "rates": []}
            if args.subscribe and kind != "off":
                bus = build_event_bus(cfg, REDIS)

                def count(_: Any, kind: str = kind) -> None:
                    with lock:
                        received[kind] += 1

                bus.subscribe("task_completed", count)
                clusters[kind]["bus"] = bus
            worker.start()
        for c in clusters.values():
            run(c["rt"], 100)  # warm up
        for r in range(args.rounds):
            line = []
            for kind in kinds:
                clusters[kind]["rates"].append(run(clusters[kind]["rt"], args.n))
                line.append(f"{kind} {clusters[kind]['rates'][-1]:.0f}/s")
            print(f"round {r + 1}: " + "  ".join(line), flush=True)
    finally:
        for c in clusters.values():
            c["worker"].stop()
            c["rt"].storage.close()
            drop_database("postgresql", c["db"])

    off = statistics.median(clusters["off"]["rates"])
    print(f"\nend to end, N={args.n}, median of {args.rounds} interleaved rounds, prefork -c 2, PostgreSQL records:")
    print(f"  all off                              : {off:8.0f} tasks/s")
    for kind in ("kombu", "redis"):
        med = statistics.median(clusters[kind]["rates"])
        # Paired per round too: the machine's load drifts, and a round's runs are back to back.
        paired = statistics.median(
            a / b for a, b in zip(clusters[kind]["rates"], clusters["off"]["rates"], strict=True)
        )
        print(
            f"  {kind:<5} events + metrics + alert plugins : {med:8.0f} tasks/s  ratio {med / off:.2f}"
            f"  (median per-round ratio {paired:.2f}; target >= 0.90)"
        )
    if args.subscribe:
        print(
            f"  task_completed events received: kombu {received['kombu']}, redis {received['redis']}"
            f" (expected {100 + args.n * args.rounds} each)"
        )
    os._exit(0)  # subscriber threads are daemons; skip their orderly shutdown


if __name__ == "__main__":
    main()
