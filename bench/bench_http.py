"""http tasks/s through celery_ext vs the same httpx call in a bare Celery task.

Both run in the same worker process (prefork, -c 2), on the same Redis broker, in the same run,
interleaved round by round, against one local HTTP server (a thread of this process):
  ext   ``http_request`` tasks via ``TaskManager.submit_many``; done = terminal in storage.
  bare  a plain ``@shared_task`` doing ``httpx.Client.get`` (one client per process) and an INCR
        on Redis so the bench can see it finish; published with one producer.
The worker imports this module (as a ``python`` executor module) to register the bare task.

    .venv/bin/python bench/bench_http.py [--n 300] [--rounds 3] [--redis redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from celery import shared_task

from celery_ext.runtime import runtime_of

ROOT = Path(__file__).resolve().parents[1]
_client: Any = None
_redis: Any = None


def bare_http(url: str, counter: str) -> None:
    global _client, _redis
    import httpx
    import redis

    if _client is None:  # one pooled client per worker process, as the http executor has
        _client = httpx.Client(timeout=30)
        _redis = redis.Redis.from_url(_redis_url_from_env())
    _client.get(url).raise_for_status()
    _redis.incr(counter)


if __name__ != "__main__":  # registered once, by the import the worker (and create_app) makes
    bare_http = shared_task(name="bench.bare_http", ignore_result=True)(bare_http)


def _redis_url_from_env() -> str:
    import os

    return os.environ["BENCH_REDIS_URL"]


def run_ext(manager: Any, storage: Any, url: str, n: int, done_before: int) -> float:
    from bench import wait_until
    from celery_ext.model import TERMINAL

    start = time.perf_counter()
    last = manager.submit_many([{"task_type": "http_request", "payload": {"url": url}, "max_retries": 0}] * n)[-1]

    def finished() -> bool:
        counts = storage.tasks.count_by_status()
        return int(counts.get("succeeded", 0)) + int(counts.get("failed", 0)) >= done_before + n

    # Poll one cheap thing (the last task) first, then count once or twice: counting every poll
    # took the workers' CPU, which the bare side's single Redis counter does not.
    wait_until(lambda: storage.tasks.get(last.task_id).status in TERMINAL)
    wait_until(finished)
    elapsed = time.perf_counter() - start
    failed = storage.tasks.count_by_status().get("failed", 0)
    if failed:
        raise RuntimeError(f"{failed} http_request tasks failed")
    return n / elapsed


def run_bare(app: Any, rds: Any, queue: str, url: str, n: int) -> float:
    from bench import wait_until

    counter = f"bench:{uuid.uuid4().hex}"
    start = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for _ in range(n):
            app.send_task("bench.bare_http", args=(url, counter), queue=queue, producer=producer)
    wait_until(lambda: int(rds.get(counter) or 0) >= n)
    elapsed = time.perf_counter() - start
    rds.delete(counter)
    return n / elapsed


def main() -> int:
    sys.path.insert(0, str(ROOT))
    import redis

    from celery_ext.config import parse_config
    from celery_ext.dispatch import queue_name
    from celery_ext.factory import create_app
    from tests.support.httpserver import HttpTestServer
    from tests.support.workers import WorkerProcess, write_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="tasks per round and kind")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--storage", default="sqlite", help="sqlite, or a postgresql:// / mysql:// URL")
    args = ap.parse_args()

    server = HttpTestServer().start()
    url = server.url("/json")
    tmp = Path(tempfile.mkdtemp(prefix="bench_http_"))
    storage = (
        {"type": "sqlite", "config": {"path": str(tmp / "tasks.db")}}
        if args.storage == "sqlite"
        else {"type": args.storage.split(":")[0], "config": {"url": args.storage}}
    )
    data = {
        "app": {"name": f"bench{uuid.uuid4().hex[:8]}", "log_level": "WARNING", "data_dir": str(tmp)},
        "broker": {"url": args.redis},
        "worker": {"capacity": 2},
        "storage": storage,
        "executors": [
            {"type": "http", "config": {"allow_networks": ["127.0.0.1/32"]}},
            {"type": "python", "config": {"modules": ["bench.bench_http"]}},
        ],
    }
    config_path = write_config(tmp, data)
    app = create_app(parse_config(data, source=str(config_path)))
    rt = runtime_of(app)
    rt.storage.migrate()
    worker = WorkerProcess(config_path, concurrency=2, env={"BENCH_REDIS_URL": args.redis}).start()
    rds = redis.Redis.from_url(args.redis)
    queue = queue_name(data["app"]["name"], "default")
    ext: list[float] = []
    bare: list[float] = []
    try:
        run_ext(rt.manager, rt.storage, url, 20, 0)  # warm-up: forks, connections, schema
        run_bare(app, rds, queue, url, 20)
        done = 20
        for r in range(args.rounds):
            ext.append(run_ext(rt.manager, rt.storage, url, args.n, done))
            done += args.n
            bare.append(run_bare(app, rds, queue, url, args.n))
            print(f"round {r + 1}: celery_ext {ext[-1]:7.1f} tasks/s   bare celery {bare[-1]:7.1f} tasks/s")
    finally:
        worker.stop()
        server.stop()
    e, b = statistics.median(ext), statistics.median(bare)
    print(
        f"median of {args.rounds} rounds x {args.n} tasks: celery_ext {e:.1f}/s, bare {b:.1f}/s, "
        f"ratio celery_ext/bare = {e / b:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
