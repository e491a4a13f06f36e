"""The ``local`` transport: events reach handlers in the publishing process only.

In a prefork worker, pool children forward their events to the worker's main process (see
``events.hub``), so plugins hosted there see every task of that worker.  No config keys.
"""

from __future__ import annotations

from collections.abc import Sequence

from celery_ext.events.model import Event
from celery_ext.events.transport import Transport


class LocalTransport(Transport):
    name = "local"
    remote = False

    def send(self, events: Sequence[Event], origin: str) -> None:
        """Nothing leaves the process."""
