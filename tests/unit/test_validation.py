"""The limits the worker's guard shares with the edge (celery_ext/validation.py): records render whatever
they hold, list filters and cursors are checked."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import pytest

from celery_ext.model import Task, TaskStatus, new_id
from celery_ext.validation import renderable


def nested(depth: int) -> Any:
    value: Any = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def test_records_render_whatever_they_hold() -> None:
    deep = nested(600)
    task = Task(
        new_id(),
        "echo",
        {"x": math.nan, "k\udc80": "v\ud800"},
        status=TaskStatus.SUCCEEDED,
        result=[math.inf, -math.inf, deep],
        args=[deep],
    )
    data = json.loads(json.dumps(task.to_dict(), allow_nan=False, ensure_ascii=False))
    assert data["payload"] == {"x": "NaN", "k\ufffd": "v\ufffd"}
    assert data["result"][:2] == ["Infinity", "-Infinity"]
    assert "nested deeper than 64 levels" in json.dumps(data["result"][2])
    valid = {"a": [1, 2.5, None, True, {"b": "c"}]}
    assert renderable(valid) == valid and renderable(valid) is not valid  # an equal copy


def test_list_filters_and_cursors_are_checked() -> None:
    from datetime import UTC, datetime

    from celery_ext.cursor import encode_cursor
    from celery_ext.errors import InvalidPayloadError
    from celery_ext.model import TaskFilter
    from celery_ext.validation import check_filter

    check_filter(TaskFilter(cursor=encode_cursor(datetime.now(UTC), new_id()), task_type=("echo",)))
    for flt, field in [
        (TaskFilter(cursor="garbage"), "cursor"),
        (TaskFilter(cursor=base64.urlsafe_b64encode(b"2024-01-01T00:00:00|x").decode()), "cursor"),
        (TaskFilter(cursor="A" * 2000), "cursor"),
        (TaskFilter(limit=0), "limit"),
        (TaskFilter(offset=-1), "offset"),
        (TaskFilter(task_type=("a\x00",)), "type"),
        (TaskFilter(worker_id="\ud800"), "worker"),
    ]:
        with pytest.raises(InvalidPayloadError) as info:
            check_filter(flt)
        assert info.value.field == field
