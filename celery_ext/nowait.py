"""Fire-and-forget Redis writes: what the per-task path sends and never reads the reply of.

Used for the routing's in-flight counts (below), the pushed completions (``completion``), and by
celery_ext's transport for task events and kombu's unacked bookkeeping (``transport``).

Each task moves its worker's in-flight count twice (+1 when the worker's main process receives it
from a shared queue, -1 when a pool process finishes it).  A normal call waits for the reply and
runs redis-py's pool, retry and parser machinery: about 0.1-0.2 ms of CPU per call on the hot path
of the worker's event loop.  Nothing uses the reply, so this connection switches replies off
(``CLIENT REPLY OFF``) and only writes: Redis still applies each command in order, at once.

A write that fails drops the connection (the next write reconnects) and raises; the caller logs
it and the heartbeat corrects the count, as it did for a failed synchronous call.  A connection
the server closed (a restart, ``CLIENT KILL``, its idle ``timeout``) would take one more write
without an error, which would be lost: since Redis sends nothing on this connection, a socket
that is readable before a write means it was closed, and the writer reconnects first.  Errors Redis
would have replied with are not seen; the commands used (HINCRBY, EVAL of a fixed script, PUBLISH,
ZADD/HSET and ZREM/HDEL in MULTI/EXEC) cannot fail on well-formed keys.  ``sync`` waits for
Redis to have applied everything written so far, for a reader on another connection.  One
connection per process (pool children reconnect after fork).
"""

from __future__ import annotations

import os
import select
import threading
from typing import Any


class NoReplyWriter:
    def __init__(self, client: Any) -> None:
        self.client = client
        self._conn: Any = None
        self._pid = 0
        self._lock = threading.Lock()  # the threads pool finishes tasks on several threads

    def send(self, *args: Any) -> None:
        self.send_many([args])

    def send_many(self, commands: list[tuple[Any, ...]]) -> None:
        """``commands`` in one write (a ``MULTI`` ... ``EXEC`` among them works as usual)."""
        with self._lock:
            try:
                conn = self._conn
                if conn is not None and (self._pid != os.getpid() or _closed(conn)):
                    self._drop()  # a parent's connection is left alone, only forgotten
                    conn = None
                if conn is None:
                    conn = self._connect()
                conn.send_packed_command(conn.pack_commands(commands), check_health=False)
            except Exception:
                self._drop()
                raise

    def sync(self) -> None:
        """Wait until Redis has applied every write sent so far: one round trip (replies on for a
        ``PING``, then off again).  For a reader on another connection that must see them."""
        with self._lock:
            conn = self._conn
            if conn is None or self._pid != os.getpid():
                return  # nothing sent from this process on a live connection
            try:
                conn.send_packed_command(conn.pack_commands([("CLIENT", "REPLY", "ON"), ("PING",)]), check_health=False)
                conn.read_response()  # OK
                conn.read_response()  # PONG: everything before it is applied
                conn.send_command("CLIENT", "REPLY", "OFF")
            except Exception:
                self._drop()
                raise

    def _connect(self) -> Any:
        # A connection of our own, never returned to the client's pool (replies stay off on it).
        conn = self.client.connection_pool.make_connection()
        conn.connect()
        conn.send_command("CLIENT", "REPLY", "OFF")
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._pid == os.getpid():
            try:
                conn.disconnect()
            except Exception:  # noqa: BLE001, S110 - it is being thrown away
                pass

    def close(self) -> None:
        with self._lock:
            self._drop()


def _closed(conn: Any) -> bool:
    """Whether the server closed ``conn`` (readable: end of file or an error sent before closing;
    a connection with replies off is sent nothing else)."""
    sock = conn._sock
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)
