"""The event bus core: background delivery, failing handlers, unsubscribe, events as JSON."""

from __future__ import annotations

import threading

import pytest

from celery_ext.config import Config, parse_config
from celery_ext.errors import ConfigError
from celery_ext.events import ALL, Event, EventBus, build_event_bus
from celery_ext.events.hub import ProcessHub, encode_line
from celery_ext.events.local import LocalEventBus
from celery_ext.events.redis import RedisEventBus


def test_event_json_round_trip() -> None:
    e = Event("task_failed", "t1", "w1", {"reason": "x", "n": [1, 2]})
    back = Event.from_json(e.to_json())
    assert back == e
    with pytest.raises(ValueError, match="not an event"):
        Event.from_dict({"nope": 1})


def test_handlers_run_off_the_publishing_thread_and_failures_are_counted() -> None:
    bus = LocalEventBus()
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
    bus = LocalEventBus()
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
    assert isinstance(build_event_bus(Config(), "redis://x"), LocalEventBus)
    cfg = parse_config({"events": {"type": "redis"}})
    assert isinstance(build_event_bus(cfg, "redis://127.0.0.1:6379/0"), RedisEventBus)
    with pytest.raises(ConfigError, match="events.type: no event bus 'kombo'; did you mean 'kombu'"):
        build_event_bus(parse_config({"events": {"type": "kombo"}}), "redis://x")
    with pytest.raises(ConfigError, match="events.config.url: the redis event bus needs a Redis URL"):
        build_event_bus(cfg, "amqp://guest@localhost//")
    with pytest.raises(ConfigError, match="events.config.maxlen"):
        build_event_bus(parse_config({"events": {"type": "redis", "config": {"maxlen": 0}}}), "redis://x")
    assert issubclass(LocalEventBus, EventBus)


def test_hub_lines_stay_atomic_and_reach_the_parent_bus() -> None:
    big = Event("task_failed", "t1", "w", {"task_type": "x", "reason": "r", "message": "m" * 10000})
    line = encode_line(big)
    assert len(line) <= 4096 and line.endswith(b"\n")
    assert Event.from_json(line).data == {"truncated": True, "task_type": "x", "reason": "r"}

    hub, parent = ProcessHub(), LocalEventBus()
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
    hub, parent = ProcessHub(), LocalEventBus()
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
