"""Benchmarks against bare Celery in the same run (see docs/benchmarks.md)."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

REDIS = "redis://127.0.0.1:6379/0"


def wait_until(predicate: Callable[[], object], timeout: float = 600.0) -> None:
    """Poll ``predicate`` every 10 ms (cheap for both sides of a benchmark) until it is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark tasks did not finish in time")
        time.sleep(0.01)


def tree_pss_mb(pid: int) -> list[float]:
    """Proportional set size of a process, then of each of its children (a prefork worker and its
    pool), MB: pages shared after the fork count once across the tree, unlike RSS."""
    import psutil

    root = psutil.Process(pid)
    out = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            out.append(proc.memory_full_info().pss / 2**20)
        except psutil.Error:
            continue
    return out


def cpu_snapshot(workers: dict[str, int] | None = None) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each part of the system: each worker's main
    process (``workers``: side -> pid) and its pool children, the PostgreSQL and Redis servers,
    and this process (the producer and the waiting)."""
    import psutil

    def cpu(proc: psutil.Process) -> float:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            return 0.0
        return float(times.user + times.system)

    out: dict[str, float] = {}
    for side, pid in (workers or {}).items():
        main = psutil.Process(pid)
        out[f"{side} worker main"] = cpu(main)
        out[f"{side} worker pool"] = sum(cpu(child) for child in main.children(recursive=True))
    out["postgres"] = 0.0
    out["redis"] = 0.0
    for proc in psutil.process_iter(["name"]):
        name = proc.info["name"] or ""
        if name.startswith("postgres"):
            out["postgres"] += cpu(proc)
        elif name.startswith("redis-server"):
            out["redis"] += cpu(proc)
    out["producer (bench process)"] = cpu(psutil.Process())
    return out


def with_app(worker: Any, module: str) -> Any:
    """``worker`` (a ``WorkerProcess``, not started) made to run the Celery app of ``module``
    (``-A module``) instead of celery_ext's, with this repository importable."""
    worker.args[worker.args.index("celery_ext")] = module
    root = str(Path(__file__).resolve().parents[1])
    worker.env["PYTHONPATH"] = f"{root}{os.pathsep}{worker.env.get('PYTHONPATH', '')}"
    return worker


def bare_worker(config_path: Path, queue: str, *, concurrency: int = 2, app: str = "bench.bare_app") -> Any:
    """A ``WorkerProcess`` (not started) of bare Celery's app (``bench/bare_app.py``, or ``app``
    built on it) on ``queue``, events on, with the same options as celery_ext's workers in the
    benchmarks."""
    from tests.support.workers import WorkerProcess

    worker = with_app(WorkerProcess(config_path, concurrency=concurrency, extra_args=["-E"]), app)
    worker.args += ["-Q", queue]
    return worker


def wait_healthy(base: str, timeout: float = 60.0) -> None:
    """Wait until the ``celery-ext api`` at ``base`` answers ``/healthz``."""
    import httpx

    def healthy() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(healthy, timeout)


class PostgresBench(NamedTuple):
    """An in-process celery_ext runtime on a fresh PostgreSQL database, and the bare Celery app
    on its own queue, for a benchmark (``drop_database("postgresql", db_url)`` at the end)."""

    name: str
    rt: Any
    bare: Any
    config: Path
    workdir: Path
    db_url: str


def postgres_bench(prefix: str, **sections: dict[str, Any]) -> PostgresBench:
    """Set up ``PostgresBench``: app ``<prefix><random>``, broker ``REDIS``, ``sections`` merged in."""
    from celery_ext.config import parse_config
    from celery_ext.factory import create_app
    from celery_ext.runtime import runtime_of
    from tests.support.services import create_database, unique
    from tests.support.workers import write_config

    name = unique(prefix)
    os.environ["BENCH_REDIS_URL"] = REDIS
    os.environ["BENCH_BARE_QUEUE"] = f"{name}.bare"
    from bench.bare_app import app as bare

    db_url = create_database("postgresql")
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{prefix}-"))
    data: dict[str, Any] = {
        "app": {"name": name, "data_dir": str(workdir), **sections.pop("app", {})},
        "broker": {"url": REDIS},
        "storage": {"type": "postgresql", "config": {"url": db_url}},
        **sections,
    }
    config = write_config(workdir, data)
    rt = runtime_of(create_app(parse_config(data, source=str(config))))
    rt.storage.migrate()
    return PostgresBench(name, rt, bare, config, workdir, db_url)
