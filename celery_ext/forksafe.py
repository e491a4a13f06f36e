"""Redis connection pools that a forked pool process can use, or drop, without hanging.

A worker's main process runs threads that use Redis (the event bus sender, the heartbeat) while it
forks pool processes.  redis-py makes a pool fork-aware: its first use in the child resets it.
But that reset first takes the pool's lock, and the child's copy of the lock is whatever it was
at the fork: held, if a parent thread was inside the pool at that instant, by a thread the child
does not have.  The child then waits forever.  Seen here: a pool process that dropped the event
bus's inherited client hung right after claiming its first task.

Every pool registered here gets fresh locks in the child, before any of the child's code runs.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any, TypeVar

C = TypeVar("C")

_POOLS: weakref.WeakSet[Any] = weakref.WeakSet()


def fork_safe(client: C) -> C:
    """Register ``client``'s connection pool (a ``redis.Redis``); returns the client."""
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        fork_safe_pool(pool)
    return client


def fork_safe_pool(pool: C) -> C:
    """Register a ``redis.ConnectionPool``; returns it."""
    _POOLS.add(pool)
    return pool


def _reinit_locks() -> None:
    for pool in list(_POOLS):
        # The names are redis-py's (ConnectionPool.__init__); a version without them is skipped.
        if hasattr(pool, "_lock"):
            pool._lock = threading.RLock()
        if hasattr(pool, "_fork_lock"):
            pool._fork_lock = threading.RLock()


os.register_at_fork(after_in_child=_reinit_locks)
