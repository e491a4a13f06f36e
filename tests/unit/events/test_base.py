"""The event bus core: background delivery, failing handlers, unsubscribe, local-only handlers."""

from __future__ import annotations

import threading

from celery_ext.events import ALL, Event, EventBus


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


def test_delivers_says_whether_an_event_of_a_type_would_reach_anyone() -> None:
    """What a producer asks before building an event (``EventBridge``): a local bus delivers a
    type only to its handlers (or a catch-all), a forwarding bus everything, a closed one nothing;
    and the bridge's events reach a handler subscribed after the first ones were skipped."""
    from celery_ext.events.bridge import EventBridge
    from celery_ext.metrics import NullMetrics
    from celery_ext.model import Task

    bus = EventBus()
    assert not bus.delivers("task_created")
    bridge = EventBridge(bus, NullMetrics())
    task = Task(task_id="t1", task_type="echo", payload={})
    bridge.task_created(task)  # nobody listens: not built, not counted
    assert bus.stats.published == 0
    got: list[str] = []
    bus.subscribe("task_created", lambda e: got.append(e.type))
    assert bus.delivers("task_created") and not bus.delivers("task_queued")
    bridge.task_created(task)
    bridge.task_queued(task)
    assert bus.flush(5)
    assert got == ["task_created"] and bus.stats.published == 1
    bus.subscribe(ALL, lambda e: None)
    assert bus.delivers("task_queued")
    forwarding = EventBus()
    forwarding.forward_to(lambda e: None)
    assert forwarding.delivers("anything")
    bus.close()
    assert not bus.delivers("task_created")
