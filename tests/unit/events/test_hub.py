"""``ProcessHub``: a worker's child processes send their events to the parent's bus."""

from __future__ import annotations

import threading

from celery_ext.events import ALL, Event, EventBus
from celery_ext.events.hub import ProcessHub, encode_line


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
