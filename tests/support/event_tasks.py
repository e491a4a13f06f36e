"""Python task types for the events, plugins and metrics tests."""

from __future__ import annotations

import os
import time
from typing import Any

from celery_ext import task_type
from celery_ext.errors import PermanentError


@task_type("whoami")
def whoami(seconds: float = 0.0) -> dict[str, Any]:
    """Returns the pool process id after sleeping ``seconds`` (to spread tasks over children)."""
    time.sleep(seconds)
    return {"pid": os.getpid()}


@task_type("doomed")
def doomed(reason: str = "doomed") -> None:
    raise PermanentError(reason, "this task always fails")
