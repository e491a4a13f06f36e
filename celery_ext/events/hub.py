"""``ProcessHub``: pool children hand their events to the worker's main process over a pipe.

The pipe is made before the pool forks, so every child (replacements too) inherits its write end.
A child forwards only the event types the main process has handlers for (a bitmask in shared
memory that the main process updates on every subscribe), as one JSON line each; lines up to
``PIPE_BUF`` are written atomically, so lines from concurrent children never interleave.  The
main process hands them to its own handlers: plugins see every task of the worker.  Children
send to the transport themselves, which keeps that work off the worker's busy main process.
Writes never block: if the main process stops reading, the child drops the event and counts it.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import select
import struct
import threading
from collections.abc import Iterable

from celery_ext.events.base import EventBus
from celery_ext.events.model import ALL, EVENT_TYPES, Event

logger = logging.getLogger("celery_ext.events")

_MAX_LINE = select.PIPE_BUF - 1
_BITS = {kind: i for i, kind in enumerate(sorted(EVENT_TYPES))}
_OTHER, _ALL = 62, 63  # a type we do not know by name; every type


class ProcessHub:
    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._owner = os.getpid()
        self._mask = mmap.mmap(-1, 8)  # anonymous and shared: children see the parent's updates
        self.dropped = 0

    def set_wanted(self, types: Iterable[str]) -> None:
        """In the main process: the event types its handlers want."""
        mask = 0
        for kind in types:
            if kind == ALL:
                mask |= 1 << _ALL
            elif kind in _BITS:
                mask |= 1 << _BITS[kind]
            else:
                mask |= 1 << _OTHER  # custom types: forward every custom type
        self._mask[:8] = struct.pack("<Q", mask)

    def wants(self, kind: str) -> bool:
        mask: int = struct.unpack("<Q", self._mask[:8])[0]
        bit = _BITS.get(kind, _OTHER)
        return bool(mask & (1 << _ALL | 1 << bit))

    def attach_child(self, bus: EventBus) -> None:
        """In a pool child: forward the events the parent wants to the parent."""
        os.close(self._read_fd)
        bus.forward_to(self.write, self.wants)

    def write(self, event: Event) -> None:
        line = encode_line(event)
        try:
            os.write(self._write_fd, line)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EPIPE):
                raise
            self.dropped += 1

    def start(self, bus: EventBus) -> None:
        """In the main process: publish every event the children send."""
        bus.watch_subscriptions(self.set_wanted)
        threading.Thread(target=self._read_loop, args=(bus,), name="celery_ext-events-hub", daemon=True).start()

    def _read_loop(self, bus: EventBus) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._read_fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                try:
                    bus.deliver_local(Event.from_json(line))
                except ValueError as exc:
                    logger.warning("event from a pool child dropped: %s", exc)

    def close(self) -> None:
        if os.getpid() != self._owner:
            return
        for fd in (self._write_fd, self._read_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def encode_line(event: Event) -> bytes:
    line = event.to_json().encode()
    if len(line) > _MAX_LINE:
        # Keep the line atomic: drop the data but say so, rather than lose the event.
        small = Event(
            event.type,
            event.task_id,
            event.worker_id,
            {"truncated": True, **{k: v for k, v in event.data.items() if k in ("task_type", "reason")}},
            event.timestamp,
            event.id,
        )
        line = small.to_json().encode()[:_MAX_LINE]
    return line + b"\n"
