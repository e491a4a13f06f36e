"""Task store benchmark: bulk insert rate and query latency with many records.

    .venv/bin/python bench/bench_storage.py --backend postgresql --n 100000
    .venv/bin/python bench/bench_storage.py --backend sqlite postgresql mysql mongodb --n 100000

Each backend gets a fresh database (PostgreSQL/MariaDB on the local servers, SQLite in a temp
folder, MongoDB: ``--mongo-url`` or an nx-27017 server started here), filled with ``--n`` tasks
through ``TaskRepository.create_many`` (the path ``TaskManager.submit_many`` takes), spread over 30
days, 20 task types, 9 statuses and 50 workers.  Then ``--queries`` timed calls of each query:
``list`` by status+type, by a one-hour time range, by worker (50 per page), and ``get`` by id.
Prints a Markdown table (targets: insert >= 10,000 records/s, list p95 <= 50 ms).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from celery_ext.config import StorageConfig  # noqa: E402
from celery_ext.model import Task, TaskFilter, TaskStatus  # noqa: E402
from celery_ext.storage import Storage, open_storage  # noqa: E402

TYPES = [f"type_{i}" for i in range(20)]
WORKERS = [f"worker{i}@host" for i in range(50)]
STATUSES = list(TaskStatus)
END = datetime(2026, 6, 1, tzinfo=UTC)
SPAN = timedelta(days=30)


def make_tasks(start: int, count: int, rng: random.Random) -> list[Task]:
    out = []
    for i in range(start, start + count):
        status = rng.choice(STATUSES)
        created = END - SPAN * rng.random()
        out.append(
            Task(
                task_id=f"{i:012d}{rng.getrandbits(64):016x}",
                task_type=rng.choice(TYPES),
                payload={"to": f"user{i}@example.com", "subject": "hello", "n": i},
                status=status,
                worker_id=rng.choice(WORKERS) if status not in (TaskStatus.PENDING, TaskStatus.SCHEDULED) else None,
                created_at=created,
                updated_at=created,
                finished_at=created + timedelta(seconds=2) if status.terminal else None,
                idempotency_key=f"idem-{i}" if i % 10 == 0 else None,
            )
        )
    return out


def percentiles(samples: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return q[49] * 1000, q[94] * 1000


def timed(fn: Callable[[], Any], runs: int) -> tuple[float, float]:
    fn()  # warm the plan cache and connection
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return percentiles(samples)


def fill(storage: Storage, n: int, batch: int, rng: random.Random) -> tuple[float, list[str]]:
    ids: list[str] = []
    spent = 0.0
    for start in range(0, n, batch):
        tasks = make_tasks(start, min(batch, n - start), rng)
        t = time.perf_counter()
        storage.tasks.create_many(tasks)
        spent += time.perf_counter() - t
        ids.extend(tk.task_id for tk in tasks[:: max(1, len(tasks) // 20)])
        if start and start % (batch * 100) == 0:
            print(f"  {start:,} inserted, {start / spent:,.0f}/s", file=sys.stderr, flush=True)
    return n / spent, ids


def run_backend(kind: str, config: StorageConfig, data_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    storage = open_storage(config, data_dir)
    storage.migrate()
    rng = random.Random(42)
    rate, ids = fill(storage, args.n, args.batch, rng)
    row: dict[str, Any] = {"backend": kind, "n": args.n, "insert_per_s": rate}

    def by_status_type() -> Any:
        return storage.tasks.list(TaskFilter(status=(rng.choice(STATUSES),), task_type=(rng.choice(TYPES),), limit=50))

    def by_time() -> Any:
        start = END - SPAN * rng.random()
        return storage.tasks.list(TaskFilter(created_after=start, created_before=start + timedelta(hours=1), limit=50))

    def by_worker() -> Any:
        return storage.tasks.list(TaskFilter(worker_id=rng.choice(WORKERS), limit=50))

    def get() -> Any:
        return storage.tasks.get(rng.choice(ids))

    for name, fn in (("status_type", by_status_type), ("time_range", by_time), ("worker", by_worker), ("get", get)):
        row[name] = timed(fn, args.queries)
    storage.close()
    return row


def backend_config(kind: str, tmp: Path, args: argparse.Namespace, cleanup: list[Callable[[], None]]) -> StorageConfig:
    from tests.support.services import create_database, drop_database

    if kind == "sqlite":
        return StorageConfig(type="sqlite", config={"path": str(tmp / "bench.db")})
    if kind == "mongodb":
        url = args.mongo_url
        if not url:
            from tests.support.mongo import MongoServer

            server = MongoServer(tmp).start()
            cleanup.append(server.stop)
            url = f"{server.url}/bench"
        return StorageConfig(type="mongodb", config={"uri": url})
    url = create_database(kind)
    if not args.keep:
        cleanup.append(lambda: drop_database(kind, url))
    else:
        print(f"  kept {kind} database {url}", file=sys.stderr)
    return StorageConfig(type=kind, config={"url": url})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--backend", nargs="+", default=["postgresql"], choices=["sqlite", "postgresql", "mysql", "mongodb"]
    )
    parser.add_argument("--n", type=int, default=100_000, help="task records to insert (default 100,000)")
    parser.add_argument("--batch", type=int, default=1000, help="records per create_many call")
    parser.add_argument("--queries", type=int, default=200, help="timed calls of each query")
    parser.add_argument("--mongo-url", help="mongodb://host:port/db of a real server (default: start nx-27017)")
    parser.add_argument("--keep", action="store_true", help="keep the PostgreSQL/MariaDB databases")
    args = parser.parse_args()
    rows = []
    for kind in args.backend:
        cleanup: list[Callable[[], None]] = []
        with tempfile.TemporaryDirectory() as tmp:
            try:
                print(f"{kind}: inserting {args.n:,} tasks", file=sys.stderr, flush=True)
                rows.append(run_backend(kind, backend_config(kind, Path(tmp), args, cleanup), Path(tmp), args))
            finally:
                for fn in cleanup:
                    fn()
    print(
        "\n| backend | records | create_many records/s | list status+type p50/p95 ms "
        "| list time range p50/p95 ms | list worker p50/p95 ms | get p50/p95 ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = " | ".join(f"{r[k][0]:.1f} / {r[k][1]:.1f}" for k in ("status_type", "time_range", "worker", "get"))
        print(f"| {r['backend']} | {r['n']:,} | {r['insert_per_s']:,.0f} | {cells} |")


if __name__ == "__main__":
    main()
