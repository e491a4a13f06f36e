"""The bare Celery app the core benchmark compares against (``celery -A bench.bare_app worker``).

Same broker, pool and reliability settings as celery_ext (acks_late, reject_on_worker_lost,
prefetch 1, JSON only, task events on), plus a Redis result backend.
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery(
    "bare",
    broker=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_send_task_events=True,
    task_send_sent_event=True,
    task_default_queue=os.environ.get("BENCH_BARE_QUEUE", "bench_bare"),
    result_expires=600,
)


@app.task(name="bench.noop")
def noop() -> None:
    return None
