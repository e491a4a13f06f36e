"""The cursor of a task listing: ``TaskPage.next_cursor``, given back as ``TaskFilter.cursor``.

It names the last record of a page by ``(created_at, task_id)``, the listing's order, so the next
page starts after it whatever was inserted meanwhile.  Opaque to clients (URL-safe base64).
"""

from __future__ import annotations

import base64
from datetime import datetime

from celery_ext.errors import CeleryExtError


def encode_cursor(created_at: datetime, task_id: str) -> str:
    raw = f"{created_at.isoformat()}|{task_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, task_id = raw.split("|", 1)
        return datetime.fromisoformat(created), task_id
    except (ValueError, UnicodeDecodeError) as exc:
        raise CeleryExtError(f"invalid cursor {cursor!r}") from exc
