"""Routing benchmark: the router's decision cost, and end-to-end throughput with celery_ext
routing vs Celery's default (static shared-queue) routing, in the same run.

    .venv/bin/python bench/bench_routing.py [--tasks 1000] [--rounds 3] [--decisions 20000]
        [--strategies least_task,weighted_round_robin,...] [--states local,shared] [--e2e-strategy S]

Part 1 registers 10, 100 and 1,000 workers in a real Redis and times, per decision:
``choose`` (filter the cached candidates and run the balancer in process: the local decision
itself, no I/O), ``route`` (the router call a publish makes: with ``local`` state the decision
plus the one-round-trip reservation; with ``shared`` state the one Lua call that reads and
advances the cluster's balancer state and reserves, see routing/shared.py), and a registry read
(what a cache refresh costs, once per ``scheduler.routing_cache``).  Strategies without state
(least_task, random, consistent_hash) route the same way under both settings.
Part 2 runs two real workers (prefork, concurrency 2) and drains ``--tasks`` echo tasks,
alternating routed (``--e2e-strategy``, shared state) and static rounds; figures are medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from celery_ext.config import parse_config  # noqa: E402
from celery_ext.factory import create_app  # noqa: E402
from celery_ext.routing.base import RoutedTask  # noqa: E402
from celery_ext.routing.router import build_balancer  # noqa: E402
from celery_ext.routing.workers import WorkerInfo, direct_queue_name  # noqa: E402
from celery_ext.runtime import runtime_of
from tests.support.services import unique  # noqa: E402
from tests.support.workers import WorkerProcess, write_config  # noqa: E402

REDIS = "redis://127.0.0.1:6379/0"


def percentiles(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    return samples[len(samples) // 2], samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def decision_cost(n_workers: int, strategy: str, decisions: int, state: str = "local") -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp())
    config = parse_config(
        {
            "app": {"name": unique("bench")},
            "broker": {"url": REDIS},
            "scheduler": {"load_balance_strategy": strategy, "load_balance_state": state},
            "storage": {"type": "sqlite"},
        },
        source=str(tmp / "config.yaml"),
    )
    app = create_app(config)
    router = runtime_of(app).router
    assert router.registry is not None
    for i in range(n_workers):
        wid = f"w{i:04d}"
        router.registry.heartbeat(
            WorkerInfo(
                id=wid,
                queue=direct_queue_name(router.prefix, wid),
                weight=1 + i % 3,
                capacity=10**9,
                supported_types=("echo", "sleep"),
            ),
            300,
            0,
        )
    router.cache_ttl = 3600.0  # time the decision on a warm cache; refreshes are timed apart
    router.invalidate()
    router.snapshot()
    task = RoutedTask("echo", "id", {"k": 1})
    choose, route, read = [], [], []
    clock = time.perf_counter
    for i in range(decisions):
        t0 = clock()
        router.choose(task)
        choose.append(clock() - t0)
        if i % 4 == 0:
            t0 = clock()
            router("echo", (), {"task_id": str(i), "payload": {}}, {})
            route.append(clock() - t0)
        if i % 200 == 0:
            t0 = clock()
            router.registry.online()
            read.append(clock() - t0)
    router.registry.client.delete(*router.registry.keys)
    if router.state is not None:
        router.state.forget()
    runtime_of(app).storage.close()
    (c50, c99), (r50, r99), (g50, _) = percentiles(choose), percentiles(route), percentiles(read)
    return {
        "choose_p50": c50 * 1e6,
        "choose_p99": c99 * 1e6,
        "route_p50": r50 * 1e6,
        "route_p99": r99 * 1e6,
        "read_p50": g50 * 1e6,
    }


def throughput(n_tasks: int, rounds: int, strategy: str) -> dict[str, list[float]]:
    directory = Path(tempfile.mkdtemp())
    data = {
        "app": {"name": unique("bench"), "log_level": "WARNING"},
        "broker": {"url": REDIS},
        "storage": {"type": "sqlite"},
        "worker": {"capacity": 2},
        "scheduler": {"load_balance_strategy": strategy},
    }
    path = write_config(directory, data)
    rt = runtime_of(create_app(parse_config(data, source=str(path))))
    router = rt.router
    registry = router.registry
    workers = [WorkerProcess(path, concurrency=2).start() for _ in range(2)]
    results: dict[str, list[float]] = {"celery_ext routing": [], "default routing": []}
    try:
        rt.manager.wait(rt.manager.submit("echo", {}).task_id, 30)  # warm up both sides
        for _ in range(rounds):
            for mode in results:
                router.registry = registry if mode == "celery_ext routing" else None
                results[mode].append(drain(rt, n_tasks))
    finally:
        router.registry = registry
        for w in workers:
            w.stop()
        rt.storage.close()
    return results


def drain(rt: object, n: int) -> float:
    manager, tasks = rt.manager, rt.storage.tasks  # type: ignore[attr-defined]
    before = tasks.count_by_status().get("succeeded", 0)
    t0 = time.perf_counter()
    for start in range(0, n, 100):
        manager.submit_many([{"task_type": "echo", "payload": {"i": i}} for i in range(start, min(n, start + 100))])
    while tasks.count_by_status().get("succeeded", 0) < before + n:
        time.sleep(0.02)
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decisions", type=int, default=20000)
    parser.add_argument("--strategies", default="least_task,weighted_round_robin,round_robin,affinity")
    parser.add_argument("--states", default="local,shared", help="balancer state: local (per process), shared")
    parser.add_argument("--workers", default="10,100,1000")
    parser.add_argument("--e2e-strategy", default="weighted_round_robin")
    parser.add_argument("--skip-e2e", action="store_true")
    args = parser.parse_args()
    for strategy in args.strategies.split(","):
        build_balancer(parse_config({"scheduler": {"load_balance_strategy": strategy}}))
    print(
        "| strategy | workers | state | choose p50 µs | choose p99 µs | route p50 µs | route p99 µs "
        "| registry read µs |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for strategy in args.strategies.split(","):
        for n in map(int, args.workers.split(",")):
            for state in args.states.split(","):
                r = decision_cost(n, strategy, args.decisions, state)
                choose = f"{r['choose_p50']:.1f} | {r['choose_p99']:.1f}" if state == "local" else "- | -"
                print(
                    f"| {strategy} | {n} | {state} | {choose} | {r['route_p50']:.1f} | {r['route_p99']:.1f} "
                    f"| {r['read_p50']:.0f} |",
                    flush=True,
                )
    if args.skip_e2e:
        return
    results = throughput(args.tasks, args.rounds, args.e2e_strategy)
    print(
        f"\nend-to-end ({args.e2e_strategy}), {args.tasks} echo tasks x {args.rounds} rounds, "
        f"2 workers x 2 processes (tasks/s):"
    )
    for mode, rates in results.items():
        print(f"  {mode}: median {statistics.median(rates):.0f}  (runs: {', '.join(f'{x:.0f}' for x in rates)})")
    routed, static = (statistics.median(v) for v in results.values())
    print(f"  ratio routed/default: {routed / static:.2f}x")


if __name__ == "__main__":
    main()
