"""``Transport``: how events leave one process and reach the others (the ``events.type`` point).

``EventBus`` (``celery_ext.events.base``) is the one bus class: it queues what is published,
batches it on a sender thread, runs handlers on a thread of their own and counts what happens.
A transport only moves batches: ``send`` puts one on the wire, ``listen`` takes them off until
told to stop, ``close`` releases connections.  The bus calls ``send`` and ``listen`` on its own
threads (one each), never on the publisher's.

Built-ins (``events.type``): ``local`` (nothing leaves the process), ``kombu`` (a fanout exchange
on the broker), ``redis`` (a Redis Stream).  A third-party transport subclasses ``Transport``
and is registered under the ``celery_ext.eventbus`` entry-point group, or named as
``module:Class`` in ``events.type``.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from celery_ext.events.model import Event

#: What ``listen`` calls for each event it takes: ``receive(event, origin, ack)``.  ``origin`` is
#: the one ``send`` was given (the bus drops its own events when they come back); ``ack``, if not
#: None, is called once the bus's handlers had the event.
Receive = Callable[[Event, str | None, Callable[[], None] | None], None]


class Transport(abc.ABC):
    """Moves batches of events between processes.  Built from ``events.config`` with no I/O:
    connections open on first use, on the bus's threads."""

    name: ClassVar[str] = "abstract"  # names the bus's threads and log lines
    #: False: events never leave the process, and the bus skips its sender work for them.
    remote: ClassVar[bool] = True
    #: After the first event of a batch, the bus waits this long for more: one send then carries
    #: the events of many tasks, which costs a busy process far less than one send per event.
    linger: float = 0.05

    def __init__(
        self, config: Mapping[str, Any] | None = None, *, app_name: str = "celery_ext", broker_url: str = ""
    ) -> None:
        self.config = dict(config or {})
        self.app_name = app_name
        self.broker_url = broker_url

    @abc.abstractmethod
    def send(self, events: Sequence[Event], origin: str) -> None:
        """Put ``events`` on the wire, with ``origin`` (a failure raises: the bus logs it, counts
        the events as dropped, and calls ``send`` again with the next batch)."""

    def listen(self, receive: Receive, stop: threading.Event, ready: threading.Event) -> None:
        """Take events from other processes until ``stop`` is set, calling ``receive`` for each;
        set ``ready`` once events sent from now on will be taken.  Raising makes the bus call it
        again after a pause.  The default receives nothing (a transport that only sends)."""
        ready.set()

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections (the bus is closing; ``send`` is not called again)."""

    def after_fork(self) -> None:  # noqa: B027 - optional hook
        """This is a forked child: forget connections inherited from the parent (their sockets
        are the parent's; do not close them), so that the next ``send`` opens its own."""
