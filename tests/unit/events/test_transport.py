"""The ``Transport`` ABC: a third party's transport carries events between buses."""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import pytest

from celery_ext.config import parse_config
from celery_ext.errors import ConfigError
from celery_ext.events import ALL, Event, EventBus, Receive, Transport, build_event_bus


class PipeTransport(Transport):
    """A third party's transport, written against the public ``Transport`` ABC only: every
    ``send`` reaches every ``listen`` in this process (a stand-in for a broker's fanout)."""

    name = "pipe"
    listeners: ClassVar[list[queue.Queue[tuple[str, list[Event]]]]] = []

    def __init__(self, config: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.linger = float(self.config.get("linger", 0.0))
        self.closed = False

    def send(self, events: Sequence[Event], origin: str) -> None:
        for listener in self.listeners:
            listener.put((origin, list(events)))

    def listen(self, receive: Receive, stop: threading.Event, ready: threading.Event) -> None:
        mine: queue.Queue[tuple[str, list[Event]]] = queue.Queue()
        self.listeners.append(mine)
        ready.set()
        try:
            while not stop.is_set():
                try:
                    origin, events = mine.get(timeout=0.05)
                except queue.Empty:
                    continue
                for event in events:
                    receive(event, origin, None)
        finally:
            self.listeners.remove(mine)

    def close(self) -> None:
        self.closed = True


def test_a_third_party_transport_carries_events_between_buses() -> None:
    cfg = parse_config({"app": {"name": "pipes"}, "events": {"type": f"{__name__}:PipeTransport"}})
    publisher, subscriber = build_event_bus(cfg, ""), build_event_bus(cfg, "")
    assert isinstance(subscriber.transport, PipeTransport) and subscriber.transport.app_name == "pipes"
    got: list[Event] = []
    subscriber.subscribe(ALL, got.append)
    mine: list[Event] = []
    publisher.subscribe(ALL, mine.append)  # it also listens: its own event comes back to it
    publisher.publish(Event("task_created", "t1"))
    assert publisher.flush(5)
    pause = threading.Event()
    for _ in range(100):
        if got:
            break
        pause.wait(0.05)
    pause.wait(0.2)  # time for the echo to reach the publisher's listener
    assert publisher.flush(5) and subscriber.flush(5)
    assert [e.task_id for e in got] == ["t1"] and [e.task_id for e in mine] == ["t1"]  # once each
    assert publisher.stats.sent == 1 and publisher.stats.send_errors == 0
    publisher.close()
    subscriber.close()
    assert publisher.transport.closed and subscriber.transport.closed  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="not a subclass of Transport"):
        build_event_bus(parse_config({"events": {"type": f"{__name__}:OldStyleBus"}}), "")


class OldStyleBus(EventBus):
    """A bus written the old way (a subclass of the bus, not a transport): refused by name."""
