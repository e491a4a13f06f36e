"""Python task types for tests/integration/test_celery_native.py."""

from __future__ import annotations

from typing import Any

from celery_ext import task_type


@task_type("as_list")
def as_list(**payload: Any) -> list[Any]:
    """The payload's values as a list: a chain step whose result is not a JSON object."""
    return list(payload.values())


@task_type("report_progress")
def report_progress(key: str, steps: int = 2) -> dict[str, Any]:
    """Reports its progress with Celery's ``update_state`` (as celery-progress and most progress
    bars do), then waits until the Redis key ``key`` exists; a report whose meta is not JSON is
    refused, and what was said is returned."""
    import time

    from celery import current_task

    from tests.support.tasks import _redis

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
