"""Task types for the storage outage tests (imported by workers via the python executor config)."""

from __future__ import annotations

import logging
import time

from celery_ext import task_type

logger = logging.getLogger("tests.storage_tasks")


@task_type("drip")
def drip(lines: int = 10, interval: float = 0.5) -> int:
    """Logs ``lines`` numbered lines, ``interval`` seconds apart: a task that spans an outage."""
    for i in range(lines):
        logger.info("drip %d", i)
        time.sleep(interval)
    return lines


@task_type("mark_file")
def mark(path: str, key: str, seconds: float = 1.0) -> str:
    """Appends ``start <key>`` and ``end <key>`` lines to ``path``, ``seconds`` apart: a run is
    counted by the file even when its record hides it (a duplicate execution)."""
    with open(path, "a") as f:
        f.write(f"start {key}\n")
    time.sleep(seconds)
    with open(path, "a") as f:
        f.write(f"end {key}\n")
    return key
