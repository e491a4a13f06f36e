"""Render time of the dashboard's pages (``/ui``) over many records in PostgreSQL.

Makes a fresh PostgreSQL database (``bench_ui_<random>`` on the shared server, dropped at the end),
fills it with ``--records`` task records (one INSERT ... SELECT from generate_series; four statuses,
six types and twelve workers spread out; created over ``--spread-hours`` up to now: with the
default 120 h, the 24 h chart counts a fifth of them and the 7 d chart all; ``--spread-hours 20``
is the 24 h chart's worst case), gives one task in ``--logged-every`` 10 log lines, and one failed
task ``--log-lines`` lines over two runs and two attempts, registers 12 workers in the registry,
starts a real ``celery-ext api`` process (token set) and requests each page ``--requests`` times
from one client, one after the other (the page's own time, not queueing), ``--rounds`` times.
Prints p50, p95 and p99 per page, and the time of counting the chart's records (what a chart
request pays when its counts are older than ``ui.stats.MAX_AGE``; otherwise it is served the last
counts while a background thread recounts).

    .venv/bin/python bench/bench_ui.py [--records 1000000] [--spread-hours 120] [--requests 100] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import wait_healthy  # noqa: E402
from celery_ext.runtime import runtime_of  # noqa: E402

ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
TOKEN = "bench-token"
PORT = 18898


TYPES = "ARRAY['echo', 'send_email', 'http_request', 'resize', 'report', 'sync_crm']"


def fill(url: str, records: int, spread_hours: float, log_lines: int, logged_every: int) -> str:
    from sqlalchemy import create_engine, text

    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        conn.execute(
            text(
                """
            INSERT INTO tasks (task_id, task_type, payload, status, priority, attempt, max_retries, created_at,
                               started_at, finished_at, worker_id, run, error_reason, error_message)
            SELECT md5(i::text), ({TYPES})[1 + i % 6],
                   jsonb_build_object('i', i, 'to', 'user' || i || '@example.com'),
                   (ARRAY['succeeded', 'succeeded', 'succeeded', 'failed', 'queued', 'dead'])[1 + i % 6],
                   i % 10, 1, 3, now() - make_interval(secs => i * :step),
                   now() - make_interval(secs => i * :step - 0.5),
                   now() - make_interval(secs => i * :step - 1), 'w' || (i % 12) || '@host', 1,
                   CASE WHEN i % 6 = 3 THEN 'timeout' END, CASE WHEN i % 6 = 3 THEN 'took too long' END
            FROM generate_series(1, :n) AS i""".replace("{TYPES}", TYPES)
            ),
            {"n": records, "step": spread_hours * 3600 / records},
        )
        conn.execute(
            text("""
            INSERT INTO task_logs (task_id, attempt, run, time, level, message)
            SELECT md5(i::text), 1, 1, now() - make_interval(secs => i), 'INFO', 'step ' || j || ' of task ' || i
            FROM generate_series(:every, :n, :every) AS i, generate_series(1, 10) AS j"""),
            {"n": records, "every": logged_every},
        )
        victim = conn.execute(text("SELECT md5('4')")).scalar_one()  # a failed one
        conn.execute(
            text("""
            INSERT INTO task_logs (task_id, attempt, run, time, level, message)
            SELECT :id, 1 + (i / (:n / 2)) % 2, 1 + i / (:n / 2 + 1), now() - make_interval(secs => :n - i),
                   (ARRAY['INFO', 'INFO', 'INFO', 'WARNING'])[1 + i % 4], 'line ' || i || ' of the task log'
            FROM generate_series(0, :n - 1) AS i"""),
            {"id": victim, "n": log_lines},
        )
        conn.execute(text("ANALYZE"))
    engine.dispose()
    return str(victim)


def register_workers(config: Path, n: int) -> Callable[[], None]:
    """``n`` workers in the registry (as their heartbeats leave them), for the workers page;
    returns what removes them."""
    from celery_ext.factory import create_app
    from celery_ext.routing.workers import WorkerInfo

    rt = runtime_of(create_app(config_path=config))
    registry = rt.router.registry
    for i in range(n):
        info = WorkerInfo(
            id=f"w{i}@host",
            queue=f"celery_ext.w{i}",
            hostname="host",
            capacity=8,
            supported_types=("echo", "send_email") if i % 2 else ("http_request", "resize", "report", "sync_crm"),
            config_version="bench",
        )
        registry.heartbeat(info, ttl=3600, held=i % 8)

    def remove() -> None:
        registry.client.delete(*registry.keys, registry.strategy_key)
        rt.close()

    return remove


def count_time(config: Path) -> None:
    """What counting the chart's records costs (``ui.stats.count``, no cache), per window."""
    from celery_ext.factory import create_app
    from celery_ext.ui import stats

    rt = runtime_of(create_app(config_path=config))
    for name, window in stats.WINDOWS.items():
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            counts = stats.count(rt.storage, window)
            times.append(time.perf_counter() - t0)
        n = sum(counts.cells.values())
        print(
            f"{'count ' + name + f' ({n} records)':<36} {len(times):>5} {statistics.median(times) * 1000:>8.1f} "
            f"{max(times) * 1000:>8.1f} (max)"
        )
    rt.close()


def measure(base: str, victim: str, log_lines: int, requests: int) -> None:
    with httpx.Client(base_url=base, timeout=60) as c:
        login = c.post("/ui/login", data={"token": TOKEN})
        assert login.status_code == 303, login.text
        first = c.get("/ui/tasks/rows")
        cursor = first.text.split("cursor=")[-1].split('"')[0].replace("&amp;", "&")
        now = datetime.now(UTC).replace(tzinfo=None)
        span = {"from": (now - timedelta(hours=30)).isoformat(), "to": (now - timedelta(hours=29)).isoformat()}
        pages = {
            "list: first page": ("/ui/tasks", {}),
            "list: status=failed": ("/ui/tasks", {"status": "failed"}),
            "list: type=resize": ("/ui/tasks", {"type": "resize"}),
            "list: type+status": ("/ui/tasks", {"status": "succeeded", "type": "echo"}),
            "list: worker=w3@host": ("/ui/tasks", {"worker": "w3@host"}),
            "list: worker, last 1h": ("/ui/tasks", {"worker": "w3@host", "since": "1h"}),
            "list: from 30h ago to 29h": ("/ui/tasks", span),
            "list: older (cursor)": ("/ui/tasks", {"cursor": httpx.QueryParams(f"c={cursor}")["c"]}),
            "list rows (live refresh)": ("/ui/tasks/rows", {}),
            f"task page ({log_lines} log lines)": (f"/ui/tasks/{victim}", {}),
            "task live fragment": (f"/ui/tasks/{victim}/live", {}),
            "chart 24h by status": ("/ui/chart", {"window": "24h", "by": "status"}),
            "chart 7d by type": ("/ui/chart", {"window": "7d", "by": "type"}),
            "workers (12)": ("/ui/workers", {}),
        }
        print(f"{'page':<36} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
        for label, (path, params) in pages.items():
            for _ in range(5):  # warm-up
                c.get(path, params=params).raise_for_status()
            times = []
            for _ in range(requests):
                t0 = time.perf_counter()
                r = c.get(path, params=params)
                times.append(time.perf_counter() - t0)
                r.raise_for_status()
                assert "flash error" not in r.text, r.text[:2000]
            print(
                f"{label:<36} {len(times):>5} {statistics.median(times) * 1000:>8.1f} "
                f"{pct(times, 0.95):>8.1f} {pct(times, 0.99):>8.1f}"
            )


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--spread-hours", type=float, default=120.0)
    parser.add_argument("--log-lines", type=int, default=400)
    parser.add_argument("--logged-every", type=int, default=100)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from sqlalchemy import create_engine, text

    name = f"bench_ui_{uuid.uuid4().hex[:8]}"
    admin = create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    tmp = Path(tempfile.mkdtemp(prefix="bench_ui_"))
    proc = None
    try:
        config = tmp / "config.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "app": {"name": name},
                    "broker": {"url": "redis://127.0.0.1:6379/0"},
                    "storage": {"type": "postgresql", "config": {"url": url, "pool_size": 5}},
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
        victim = fill(url, args.records, args.spread_hours, args.log_lines, args.logged_every)
        print(f"{args.records} records inserted in {time.monotonic() - t0:.1f}s", flush=True)
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery_ext.cli", "--config", str(config), "api"],
            cwd=tmp,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        base = f"http://127.0.0.1:{PORT}"
        wait_healthy(base)
        unregister = register_workers(config, 12)
        try:
            for round_ in range(1, args.rounds + 1):
                print(f"\nround {round_}", flush=True)
                measure(base, victim, args.log_lines, args.requests)
                count_time(config)
        finally:
            unregister()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(20)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
