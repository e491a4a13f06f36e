"""The cost on submit of counting ``task_created`` for the cluster (metrics.cluster), same run.

Three producers (own app name, own PostgreSQL database, the shared Redis as broker), single
``manager.submit`` calls, round by round in one process (no worker: the producer side only):
  off      metrics null: nothing counted
  local    the prometheus collector counting in the process (as before: lost in a producer)
  cluster  the prometheus collector summing in Redis (the default when the broker is Redis)
Prints p50/p99 of one submit and the Redis batches the cluster producer wrote; then the cost of
one ``task_created`` call alone (local counter vs ``ClusterCounters.inc``).

    .venv/bin/python bench/bench_metrics.py [--n 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import REDIS  # noqa: E402
from celery_ext.runtime import runtime_of  # noqa: E402
from tests.support.scrape import free_port  # noqa: E402
from tests.support.services import create_database, drop_database, unique  # noqa: E402
from tests.support.workers import write_config  # noqa: E402

KINDS = ("off", "local", "cluster")


def submits(rt: Any, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        rt.manager.submit("echo", {})
        out.append(time.perf_counter() - start)
    return out


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000


def per_call(fn: Any, n: int = 200_000) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn("echo")
    return (time.perf_counter() - start) / n * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import redis

    from celery_ext.config import parse_config
    from celery_ext.factory import create_app
    from celery_ext.metrics.prometheus import PrometheusMetrics

    producers: dict[str, Any] = {}
    try:
        for kind in KINDS:
            db = create_database("postgresql")
            data = {
                "app": {"name": unique("bme"), "log_level": "WARNING"},
                "broker": {"url": REDIS},
                "storage": {"type": "postgresql", "config": {"url": db}},
                "executors": [{"type": "python", "config": {"modules": ["tests.support.tasks"]}}],
            }
            if kind != "off":
                data["plugins"] = [{"name": "metrics", "config": {"prometheus_port": free_port()}}]
            path = write_config(Path(tempfile.mkdtemp(prefix=f"bench-metrics-{kind}-")), data)
            rt = runtime_of(create_app(parse_config(data, source=str(path))))
            rt.storage.migrate()
            if kind == "local":
                metrics = rt.metrics
                metrics.cluster, metrics._m = None, None  # count in the process, as before
            producers[kind] = {"db": db, "rt": rt, "times": []}
        for p in producers.values():
            submits(p["rt"], 100)  # warm up
        for r in range(args.rounds):
            line = []
            for kind in KINDS:
                times = submits(producers[kind]["rt"], args.n)
                producers[kind]["times"] += times
                line.append(f"{kind} p50 {pct(times, 0.5):.3f} ms")
            print(f"round {r + 1}: " + "  ".join(line), flush=True)
        cluster = producers["cluster"]["rt"].metrics.cluster
        cluster.flush()
        total = sum(cluster.totals("task_created").values())
        batches = cluster._seq
    finally:
        client = redis.Redis.from_url(REDIS)
        for p in producers.values():
            app = p["rt"].config.app.name
            keys = list(client.scan_iter(f"{app}.*", count=1000))
            if keys:
                client.delete(*keys)
            p["rt"].close()
            drop_database("postgresql", p["db"])

    n = 100 + args.n * args.rounds
    print(f"\none submit, N={args.n} x {args.rounds} interleaved rounds, PostgreSQL records, Redis broker:")
    off = pct(producers["off"]["times"], 0.5)
    for kind in KINDS:
        times = producers[kind]["times"]
        print(
            f"  {kind:<8} p50 {pct(times, 0.5):.3f} ms  p99 {pct(times, 0.99):.3f} ms"
            f"  (p50 ratio to off {pct(times, 0.5) / off:.3f})"
        )
    print(f"  cluster: {total} counted in Redis for {n} submits, in {batches} batches (one round trip each)")

    local = PrometheusMetrics()
    shared = PrometheusMetrics()
    shared.share_counters(REDIS, unique("bme"))
    print("\none task_created call alone:")
    print(f"  local counter       : {per_call(local.task_created):6.0f} ns")
    print(f"  cluster (Redis sum) : {per_call(shared.task_created):6.0f} ns")
    assert shared.cluster is not None
    shared.cluster.flush()
    redis.Redis.from_url(REDIS).delete(shared.cluster.key("task_created"))
    os._exit(0)


if __name__ == "__main__":
    main()
