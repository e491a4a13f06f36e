"""Benchmarks against bare Celery in the same run (see docs/benchmarks.md)."""

from __future__ import annotations

import time
from collections.abc import Callable

REDIS = "redis://127.0.0.1:6379/0"


def wait_until(predicate: Callable[[], object], timeout: float = 600.0) -> None:
    """Poll ``predicate`` every 10 ms (cheap for both sides of a benchmark) until it is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark tasks did not finish in time")
        time.sleep(0.01)


def tree_pss_mb(pid: int) -> float:
    """Proportional set size of a process and its children (a prefork worker and its pool), MB:
    pages shared after the fork count once across the tree, unlike RSS."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except psutil.Error:
            continue
    return total / 2**20


def wait_healthy(base: str, timeout: float = 60.0) -> None:
    """Wait until the ``celery-ext api`` at ``base`` answers ``/healthz``."""
    import httpx

    def healthy() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(healthy, timeout)
