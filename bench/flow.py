"""A steady background flow of no-op tasks, from a process of its own, for latency under load.

``Flow("ext", config_path, rate)`` submits celery_ext ``echo`` tasks (``submit_many`` every
10 ms) with the config at ``config_path``; ``Flow("bare", None, rate)`` sends ``bench.noop`` with
bare Celery's ``apply_async`` (bench/bare_app.py, its queue from ``BENCH_BARE_QUEUE``), in a loop
every 10 ms.  The process is spawned, so the probe that measures latency shares no interpreter
lock with it.  ``stop()`` returns the rate the flow kept (tasks sent per second).

The two batched flows arrive differently: ``submit_many`` writes a tick's tasks at once, while
bare Celery's loop spreads them over its sends (0.6 ms each).  ``paced=True`` gives both sides the
same arrivals instead: one task at a time, evenly spaced (``1 / rate`` apart), with ``submit``
against ``apply_async``.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

TICK = 0.01


def _sender(side: str, config_path: str | None, paced: bool = False) -> Any:
    """A function sending ``n`` tasks at once, for ``side`` (``paced``: one at a time)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if side == "bare":
        from bench.bare_app import app

        noop = app.tasks["bench.noop"]

        def send_bare(n: int) -> None:
            with app.producer_or_acquire() as producer:
                for _ in range(n):
                    noop.apply_async(producer=producer, ignore_result=True)

        return send_bare
    from celery_ext.config import load_config
    from celery_ext.factory import create_app

    manager = create_app(load_config(config_path)).celery_ext.manager  # type: ignore[attr-defined]

    def send_ext(n: int) -> None:
        if paced:
            manager.submit("echo", {}, max_retries=0)
        else:
            manager.submit_many([{"task_type": "echo", "payload": {}, "max_retries": 0}] * n)

    return send_ext


def _run(side: str, config_path: str | None, rate: float, stop: Any, sent: Any, paced: bool = False) -> None:
    send = _sender(side, config_path, paced)
    send(1)  # connects (and checks the schema) before the clock starts
    start, scheduled = time.monotonic(), 0.0
    while not stop.is_set():
        due = rate * (time.monotonic() - start)
        # Fallen behind: skip ahead rather than catch up with a burst (the kept rate says so).
        scheduled = max(scheduled, due - rate * 0.1)
        n = int(due - scheduled)
        if n >= 1:
            n = 1 if paced else n
            send(n)
            scheduled += n
            sent.value += n
        # Paced: sleep until the next task is due.
        time.sleep(max(0.0, (scheduled + 1) / rate - (time.monotonic() - start)) if paced else TICK)


class Flow:
    def __init__(self, side: str, config_path: Path | None, rate: float, *, paced: bool = False) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._sent = ctx.Value("q", 0)
        self._proc = ctx.Process(
            target=_run, args=(side, str(config_path) if config_path else None, rate, self._stop, self._sent, paced)
        )
        self._started = 0.0

    def start(self, warmup: float = 2.0) -> Flow:
        self._proc.start()
        time.sleep(warmup)  # the child imports and connects, and the flow reaches its pace
        self._started, self._base = time.monotonic(), int(self._sent.value)
        return self

    def stop(self) -> float:
        """Stop sending; the rate kept since ``start`` returned."""
        sent, elapsed = int(self._sent.value) - self._base, time.monotonic() - self._started
        self._stop.set()
        self._proc.join(30)
        return sent / elapsed if elapsed > 0 else 0.0
