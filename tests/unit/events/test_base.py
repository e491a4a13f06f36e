"""The event bus core: background delivery, failing handlers, unsubscribe, events as JSON."""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import pytest

from celery_ext.config import Config, parse_config
from celery_ext.errors import ConfigError
from celery_ext.events import ALL, Event, EventBus, Receive, Transport, build_event_bus
from celery_ext.events.hub import ProcessHub, encode_line
from celery_ext.events.local import LocalTransport
from celery_ext.events.redis import RedisTransport


def test_event_json_round_trip() -> None:
    e = Event("task_failed", "t1", "w1", {"reason": "x", "n": [1, 2]})
    back = Event.from_json(e.to_json())
    assert back == e
    with pytest.raises(ValueError, match="not an event"):
        Event.from_dict({"nope": 1})


def test_handlers_run_off_the_publishing_thread_and_failures_are_counted() -> None:
    bus = EventBus()
    threads, got = [], []

    def good(event: Event) -> None:
        threads.append(threading.current_thread().name)
        got.append(event.type)

    def bad(event: Event) -> None:
        raise RuntimeError("broken subscriber")

    bus.subscribe(ALL, bad)
    bus.subscribe("task_completed", good)
    bus.publish(Event("task_completed", "t1"))  # must not raise although `bad` does
    bus.publish(Event("task_started", "t1"))
    assert bus.flush(5)
    assert got == ["task_completed"]
    assert threads and threads[0] != threading.current_thread().name
    assert bus.stats.handler_errors == 2 and bus.stats.delivered == 1

    bus.unsubscribe("task_completed", good)
    bus.publish(Event("task_completed", "t2"))
    assert bus.flush(5)
    assert got == ["task_completed"]
    bus.close()
    bus.publish(Event("task_completed", "t3"))  # after close: dropped, not raised
    assert bus.stats.dropped == 1


def test_local_only_handlers_skip_events_from_other_processes() -> None:
    bus = EventBus()
    seen_local, seen_all = [], []
    bus.subscribe(ALL, seen_local.append, local_only=True)
    bus.subscribe(ALL, seen_all.append)
    bus._received(Event("task_completed", "remote"), origin="someone-else")
    bus._received(Event("task_completed", "echo"), origin=bus.origin)  # our own, come back
    bus.publish(Event("task_completed", "mine"))
    assert bus.flush(5)
    assert [e.task_id for e in seen_local] == ["mine"]
    assert sorted(e.task_id for e in seen_all) == ["mine", "remote"]
    bus.close()


def test_build_event_bus_names_and_errors() -> None:
    assert isinstance(build_event_bus(Config(), "redis://x").transport, LocalTransport)
    cfg = parse_config({"events": {"type": "redis"}})
    assert isinstance(build_event_bus(cfg, "redis://127.0.0.1:6379/0").transport, RedisTransport)
    with pytest.raises(ConfigError, match="events.type: no event bus 'kombo'; did you mean 'kombu'"):
        build_event_bus(parse_config({"events": {"type": "kombo"}}), "redis://x")
    with pytest.raises(ConfigError, match="events.config.url: the redis event bus needs a Redis URL"):
        build_event_bus(cfg, "amqp://guest@localhost//")
    with pytest.raises(ConfigError, match="events.config.maxlen"):
        build_event_bus(parse_config({"events": {"type": "redis", "config": {"maxlen": 0}}}), "redis://x")
    assert issubclass(LocalTransport, Transport)


def test_hub_lines_stay_atomic_and_reach_the_parent_bus() -> None:
    big = Event("task_failed", "t1", "w", {"task_type": "x", "reason": "r", "message": "m" * 10000})
    line = encode_line(big)
    assert len(line) <= 4096 and line.endswith(b"\n")
    assert Event.from_json(line).data == {"truncated": True, "task_type": "x", "reason": "r"}

    hub, parent = ProcessHub(), EventBus()
    got: list[Event] = []
    parent.subscribe(ALL, got.append)
    hub.start(parent)
    hub.write(Event("task_started", "t2"))
    hub.write(big)
    deadline = threading.Event()
    for _ in range(100):
        if len(got) == 2:
            break
        deadline.wait(0.05)
    assert [e.task_id for e in got] == ["t2", "t1"]
    hub.close()
    parent.close()


def test_hub_forwards_only_what_the_parent_subscribed_to() -> None:
    hub, parent = ProcessHub(), EventBus()
    hub.start(parent)
    assert not hub.wants("task_failed")
    parent.subscribe("task_failed", lambda e: None, local_only=True)
    assert hub.wants("task_failed") and not hub.wants("task_started") and not hub.wants("custom")
    parent.subscribe("custom", lambda e: None)
    assert hub.wants("custom") and hub.wants("other_custom")
    parent.subscribe(ALL, lambda e: None)
    assert hub.wants("task_started")
    hub.close()
    parent.close()


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
