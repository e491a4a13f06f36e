"""``ProcessHub``: pool children hand their events to the worker's main process over a pipe.

The pipe is made before the pool forks, so every child (replacements too) inherits its write end.
A child's bus forwards each event as one JSON line; lines up to ``PIPE_BUF`` are written
atomically, so lines from concurrent children never interleave.  The main process reads them and
publishes them on its own bus: its plugins see every task of the worker, and only the main
process holds a transport connection.  Writes never block: if the main process stops reading,
the child drops the event (and counts it) instead of stalling its sender thread.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading

from celery_ext.events.base import Event, EventBus

logger = logging.getLogger("celery_ext.events")

_MAX_LINE = select.PIPE_BUF - 1


class ProcessHub:
    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._owner = os.getpid()
        self.dropped = 0

    def attach_child(self, bus: EventBus) -> None:
        """In a pool child: forward this process's events to the parent."""
        os.close(self._read_fd)
        bus.forward_to(self.write)

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
                    bus.publish(Event.from_json(line))
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
        small = Event(event.type, event.task_id, event.worker_id,
                      {"truncated": True, **{k: v for k, v in event.data.items() if k in ("task_type", "reason")}},
                      event.timestamp, event.id)
        line = small.to_json().encode()[:_MAX_LINE]
    return line + b"\n"
