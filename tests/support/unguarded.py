"""Imported by a worker (listed in its python executor's modules) to switch off the guard's
checks of messages (celery_ext/guard.py), so a test can show what the guard's second line, at
the pool hand-off, does with a message that reaches the pool.  Only with
``CELERY_EXT_TEST_UNGUARDED=1`` in the worker's environment."""

from __future__ import annotations

import os
from typing import Any

from celery_ext import guard

if os.environ.get("CELERY_EXT_TEST_UNGUARDED") == "1":

    def check(self: Any, message: Any) -> tuple[str | None, guard.Reading]:
        return None, guard.Reading()

    guard.MessageGuard.check = check  # type: ignore[method-assign]
