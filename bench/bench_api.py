"""``GET /tasks`` latency of the REST API under concurrent clients, over many records in PostgreSQL.

Makes a fresh PostgreSQL database, fills it with ``--records`` task records (one INSERT ... SELECT
from generate_series: statuses, types and workers spread out, 10 years of created_at), starts a
real ``celery-ext api`` process (a token set) with each of ``--workers`` server processes
(``celery-ext api --workers N``) and runs ``--clients`` concurrent clients for ``--seconds``,
``--rounds`` times after 5 s of warm-up with every client, each client looping over a mix of
list queries: the first page, a status filter, a type filter, status + type, a worker filter, and
the next page by cursor. Prints p50, p95 and p99 per query and overall, and requests per second
(sent in the window), per round. Clients and server share
the machine (the clients' event loop is one more busy process).

    .venv/bin/python bench/bench_api.py [--records 1000000] [--clients 50] [--seconds 20] [--workers 1,2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import wait_healthy  # noqa: E402

ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
TOKEN = "bench-token"
PORT = 18899
QUERIES = {
    "first page": {"limit": "50"},
    "status=failed": {"status": "failed", "limit": "50"},
    "type=send_email": {"type": "send_email", "limit": "50"},
    "status+type": {"status": "succeeded", "type": "echo", "limit": "50"},
    "worker": {"worker": "w3@host", "limit": "50"},
}


def fill(url: str, records: int) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        conn.execute(
            text("""
            INSERT INTO tasks (task_id, task_type, payload, status, priority, attempt, max_retries, created_at,
                               finished_at, worker_id, run)
            SELECT md5(i::text), (ARRAY['echo', 'send_email', 'http_request', 'resize'])[1 + i % 4],
                   jsonb_build_object('i', i),
                   (ARRAY['succeeded', 'succeeded', 'succeeded', 'failed', 'queued', 'dead'])[1 + i % 6],
                   i % 10, 1, 3, now() - make_interval(secs => i * 300.0),
                   now() - make_interval(secs => i * 300.0 - 1), 'w' || (i % 8) || '@host', 1
            FROM generate_series(1, :n) AS i"""),
            {"n": records},
        )
        conn.execute(text("ANALYZE tasks"))
    engine.dispose()


async def client(base: str, start: float, stop: float, samples: dict[str, list[float]]) -> None:
    """Loop over the queries until ``stop``; only requests sent from ``start`` on are recorded
    (before it, all the clients connect and warm up together: steady state, not the stampede)."""
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        cursor = None

        async def get(name: str, params: dict[str, str]) -> httpx.Response:
            t0 = time.monotonic()
            r = await c.get("/tasks", params=params)
            if t0 >= start:
                samples[name].append(time.monotonic() - t0)
            r.raise_for_status()
            return r

        while time.monotonic() < stop:
            for name, params in QUERIES.items():
                r = await get(name, params)
                if name == "first page":
                    cursor = r.json()["next_cursor"]
            if cursor:
                await get("next page (cursor)", {"limit": "50", "cursor": cursor})


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000


def measure(clients: int, seconds: float) -> None:
    base = f"http://127.0.0.1:{PORT}"
    wait_healthy(base)
    samples: dict[str, list[float]] = {k: [] for k in [*QUERIES, "next page (cursor)"]}

    async def run() -> None:
        await asyncio.gather(*(client(base, start, stop, samples) for _ in range(clients)))

    start = time.monotonic() + 5  # 5 s of warm-up with every client
    stop = start + seconds
    asyncio.run(run())
    elapsed = seconds
    everything = [v for values in samples.values() for v in values]
    print(f"{clients} clients, {len(everything)} requests in {elapsed:.1f}s = {len(everything) / elapsed:.0f} req/s")
    print(f"{'query':<22} {'n':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    for label, values in [*samples.items(), ("all", everything)]:
        if values:
            print(
                f"{label:<22} {len(values):>6} {statistics.median(values) * 1000:>8.1f} "
                f"{pct(values, 0.95):>8.1f} {pct(values, 0.99):>8.1f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--workers", default="1,2", help="server processes to try, comma-separated")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from sqlalchemy import create_engine, text

    name = f"bench_api_{uuid.uuid4().hex[:8]}"
    admin = create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    tmp = Path(tempfile.mkdtemp(prefix="bench_api_"))
    proc = None
    try:
        config = tmp / "config.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "app": {"name": name},
                    "broker": {"url": "redis://127.0.0.1:6379/0"},
                    "storage": {"type": "postgresql", "config": {"url": url, "pool_size": 10}},
                    "api": {"token": TOKEN, "port": PORT},
                }
            )
        )
        subprocess.run(
            [sys.executable, "-m", "celery_ext.cli", "--config", str(config), "storage", "migrate"],
            check=True,
            capture_output=True,
        )
        t0 = time.monotonic()
        fill(url, args.records)
        print(f"{args.records} records inserted in {time.monotonic() - t0:.0f}s")
        for workers in [int(w) for w in args.workers.split(",")]:
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery_ext.cli", "--config", str(config), "api", "--workers", str(workers)],
                cwd=tmp,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            for round_ in range(1, args.rounds + 1):
                print(f"\n--workers {workers}, round {round_}")
                measure(args.clients, args.seconds)
            proc.terminate()
            proc.wait(30)
            proc = None
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
