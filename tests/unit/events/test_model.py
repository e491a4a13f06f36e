"""``Event``: the event model and its JSON form."""

from __future__ import annotations

import pytest

from celery_ext.events import Event


def test_event_json_round_trip() -> None:
    e = Event("task_failed", "t1", "w1", {"reason": "x", "n": [1, 2]})
    back = Event.from_json(e.to_json())
    assert back == e
    with pytest.raises(ValueError, match="not an event"):
        Event.from_dict({"nope": 1})
