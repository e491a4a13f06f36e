"""Fenced SQL writes: the condition that a leader's fencing token is not older than the one stored
in ``celery_ext_fences`` (checked in the same statement as the write it guards)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, func, literal_column, select

from celery_ext.storage.base import Fence
from celery_ext.storage.sql_schema import fences


def fence_holds() -> Any:
    """``:p_fence >= the stored fence of :p_fence_name`` (0 when none is stored)."""
    stored = select(fences.c.fence).where(fences.c.name == bindparam("p_fence_name")).scalar_subquery()
    return bindparam("p_fence", type_=fences.c.fence.type) >= func.coalesce(stored, literal_column("0"))


def fence_params(fence: Fence | None) -> dict[str, Any]:
    """The parameters of ``fence_holds`` for ``fence`` (none without one)."""
    return {} if fence is None else {"p_fence": fence.token, "p_fence_name": fence.name}
