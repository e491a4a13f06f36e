"""Python task types used by the integration tests (imported by workers via executors config)."""

from __future__ import annotations

import logging
import os
from typing import Any

import redis

from celery_ext import task_type
from celery_ext.errors import PermanentError

logger = logging.getLogger("tests.tasks")


def _redis() -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=6379, db=0)


@task_type("flaky")
def flaky(key: str, fail_times: int) -> dict[str, Any]:
    """Fails ``fail_times`` times (counted in Redis), then succeeds; each run is recorded."""
    r = _redis()
    n = int(r.incr(key))
    r.rpush(f"{key}:times", repr(__import__("time").time()))
    r.expire(key, 600)
    r.expire(f"{key}:times", 600)
    logger.info("flaky run %d of key %s", n, key)
    if n <= fail_times:
        raise RuntimeError(f"planned failure {n}")
    return {"runs": n}


@task_type("reject")
def reject(reason: str = "nope") -> None:
    raise PermanentError("rejected", reason)


@task_type("chatty")
def chatty(lines: int = 3) -> int:
    for i in range(lines):
        logger.info("line %d", i)
    logger.warning("done after %d lines", lines)
    return lines


@task_type("crash")
def crash() -> None:
    """Kills its own pool process, as an OOM kill or segfault would."""
    os._exit(1)


@task_type("stubborn")
def stubborn(seconds: float = 30.0) -> None:
    """Swallows the soft time limit, so only the hard limit can stop it."""
    import time

    from celery.exceptions import SoftTimeLimitExceeded

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(0.05)
        except SoftTimeLimitExceeded:
            logger.warning("ignoring the soft time limit")


@task_type("mark")
def mark(key: str) -> int:
    """Appends to a Redis list, so tests can see which tasks ran and in what order."""
    return int(_redis().rpush(key, key.rsplit(":", 1)[-1] if ":" in key else key))


@task_type("record")
def record(key: str, value: str) -> None:
    r = _redis()
    r.rpush(key, value)
    r.expire(key, 600)


@task_type("add")
def add(x: int, y: int) -> int:
    """Positional-friendly, as Celery's canvas examples are: ``chain(add.s(2, 2), add.s(4))``."""
    return x + y


@task_type("tsum")
def tsum(values: list[int]) -> int:
    """A chord body: the list of the group's results."""
    return sum(values)


@task_type("span")
def span(key: str, seconds: float = 1.0) -> None:
    """Records when each run starts and ends (Redis list ``key``), so tests can see overlaps."""
    import time

    r = _redis()
    r.rpush(key, f"start {time.time()!r}")
    r.expire(key, 600)
    time.sleep(seconds)
    r.rpush(key, f"end {time.time()!r}")


@task_type("talk_then_wait")
def talk_then_wait(seconds: float = 3.0) -> None:
    """Logs a line, then keeps running: its log must be readable while it runs."""
    import time

    logger.info("started, now waiting %.1fs", seconds)
    time.sleep(seconds)


@task_type("report_progress")
def report_progress(key: str, steps: int = 2) -> dict[str, Any]:
    """Reports its progress with Celery's ``update_state`` (as celery-progress and most progress
    bars do), then waits until the Redis key ``key`` exists; a report whose meta is not JSON is
    refused, and what was said is returned."""
    import time

    from celery import current_task

    for done in range(1, steps + 1):
        current_task.update_state(state="PROGRESS", meta={"done": done, "total": steps})
    deadline = time.monotonic() + 30
    while not _redis().exists(key) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        current_task.update_state(state="PROGRESS", meta={"when": time})  # a module: not JSON
    except ValueError as exc:
        return {"steps": steps, "refused": str(exc)}
    return {"steps": steps, "refused": None}
