"""Render time of the dashboard's pages (``/ui``) over many records in PostgreSQL.

Makes a fresh PostgreSQL database, fills it with ``--records`` task records (one INSERT ... SELECT
from generate_series; statuses, types and workers spread out; all created within ``--spread-hours``
of now, so the 24 h chart counts every one of them: its worst case), gives one task ``--log-lines``
log lines over two runs and two attempts, starts a real ``celery-ext api`` process (token set) and
requests each page ``--requests`` times from one client, one after the other (the page's own time,
not queueing).  Prints p50, p95 and p99 per page.

    .venv/bin/python bench/bench_ui.py [--records 100000] [--requests 200]
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
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
TOKEN = "bench-token"
PORT = 18898


def fill(url: str, records: int, spread_hours: float, log_lines: int) -> str:
    from sqlalchemy import create_engine, text

    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        conn.execute(
            text("""
            INSERT INTO tasks (task_id, task_type, payload, status, priority, attempt, max_retries, created_at,
                               started_at, finished_at, worker_id, run, error_reason, error_message)
            SELECT md5(i::text), (ARRAY['echo', 'send_email', 'http_request', 'resize'])[1 + i % 4],
                   jsonb_build_object('i', i, 'to', 'user' || i || '@example.com'),
                   (ARRAY['succeeded', 'succeeded', 'succeeded', 'failed', 'queued', 'dead'])[1 + i % 6],
                   i % 10, 1, 3, now() - make_interval(secs => i * :step),
                   now() - make_interval(secs => i * :step - 0.5),
                   now() - make_interval(secs => i * :step - 1), 'w' || (i % 8) || '@host', 1,
                   CASE WHEN i % 6 = 3 THEN 'timeout' END, CASE WHEN i % 6 = 3 THEN 'took too long' END
            FROM generate_series(1, :n) AS i"""),
            {"n": records, "step": spread_hours * 3600 / records},
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


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--spread-hours", type=float, default=20.0)
    parser.add_argument("--log-lines", type=int, default=400)
    parser.add_argument("--requests", type=int, default=200)
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
        victim = fill(url, args.records, args.spread_hours, args.log_lines)
        print(f"{args.records} records inserted in {time.monotonic() - t0:.1f}s")
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery_ext.cli", "--config", str(config), "api"],
            cwd=tmp,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        base = f"http://127.0.0.1:{PORT}"
        for _ in range(300):
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        with httpx.Client(base_url=base, timeout=60) as c:
            login = c.post("/ui/login", data={"token": TOKEN})
            assert login.status_code == 303, login.text
            first = c.get("/ui/tasks/rows")
            cursor = first.text.split("cursor=")[-1].split('"')[0].replace("&amp;", "&")
            pages = {
                "list: first page": ("/ui/tasks", {}),
                "list: status=failed": ("/ui/tasks", {"status": "failed"}),
                "list: type+status": ("/ui/tasks", {"status": "succeeded", "type": "echo"}),
                "list: worker, last 1h": ("/ui/tasks", {"worker": "w3@host", "since": "1h"}),
                "list: older (cursor)": ("/ui/tasks", {"cursor": httpx.QueryParams(f"c={cursor}")["c"]}),
                "list rows (live refresh)": ("/ui/tasks/rows", {}),
                f"task page ({args.log_lines} log lines)": (f"/ui/tasks/{victim}", {}),
                "task live fragment": (f"/ui/tasks/{victim}/live", {}),
                "chart 24h by status": ("/ui/chart", {"window": "24h", "by": "status"}),
                "chart 24h by type": ("/ui/chart", {"window": "24h", "by": "type"}),
                "workers": ("/ui/workers", {}),
            }
            print(f"{'page':<30} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
            for label, (path, params) in pages.items():
                for _ in range(5):  # warm-up
                    c.get(path, params=params).raise_for_status()
                times = []
                for _ in range(args.requests):
                    t0 = time.perf_counter()
                    r = c.get(path, params=params)
                    times.append(time.perf_counter() - t0)
                    r.raise_for_status()
                    assert "flash error" not in r.text, r.text[:2000]
                print(
                    f"{label:<30} {len(times):>5} {statistics.median(times) * 1000:>8.1f} "
                    f"{pct(times, 0.95):>8.1f} {pct(times, 0.99):>8.1f}"
                )
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(20)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
