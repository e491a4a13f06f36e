"""Python task types for tests/integration/test_celery_native.py."""

from __future__ import annotations

from typing import Any

from celery_ext import task_type


@task_type("as_list")
def as_list(**payload: Any) -> list[Any]:
    """The payload's values as a list: a chain step whose result is not a JSON object."""
    return list(payload.values())
