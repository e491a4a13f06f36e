"""The chaos suite's task type.  ``ledger`` appends ``start <task id> <pid> <time>`` to the file
named by ``$CELERY_EXT_CHAOS_LEDGER``, sleeps, then appends ``end <task id> <pid> <time>``: a
second execution shows in the file even where the task record hides it (a refused outcome)."""

from __future__ import annotations

import os
import time

from celery._state import get_current_task

from celery_ext import task_type

LEDGER_ENV = "CELERY_EXT_CHAOS_LEDGER"


def append(line: str) -> None:
    """One ``write`` on an ``O_APPEND`` file: lines of concurrent processes never interleave."""
    fd = os.open(os.environ[LEDGER_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@task_type("ledger")
def ledger(seconds: float = 0.5) -> int:
    task = get_current_task()
    task_id = task.request.id if task is not None else "?"
    append(f"start {task_id} {os.getpid()} {time.time():.3f}")
    time.sleep(seconds)
    append(f"end {task_id} {os.getpid()} {time.time():.3f}")
    return os.getpid()
