"""The dashboard: server-rendered pages under ``/ui`` of ``celery-ext api``.

Jinja2 templates (autoescaped) and htmx (vendored in ``static/``, no CDN, no build step) for the
live parts: the task list, a task's page, the workers and counts over time.  Auth is the API's
token, through a login form and a session cookie (``auth.py``).  See docs/api.md, "Dashboard".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jinja2  # noqa: F401 - fail at import (``celery-ext api`` names the missing extra), not at the first page

from celery_ext.ui.views import mount

if TYPE_CHECKING:
    from fastapi import FastAPI

    from celery_ext.runtime import Runtime


def mount_ui(app: FastAPI, rt: Runtime) -> None:
    """Add the dashboard's routes (kept out of the OpenAPI document) and its static files."""
    mount(app, rt)
