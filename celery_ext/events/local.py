"""The ``local`` event bus: events reach handlers in the publishing process only.

In a prefork worker, pool children forward their events to the worker's main process (see
``events.hub``), so plugins hosted there see every task of that worker.  No config keys.
"""

from __future__ import annotations

from celery_ext.events.base import Event, EventBus


class LocalEventBus(EventBus):
    name = "local"
    transports = False

    def _send(self, events: list[Event]) -> None:
        """Nothing leaves the process."""
