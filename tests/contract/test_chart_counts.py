"""The dashboard's counts per status and type over time (``celery_ext.ui.stats``), on every backend."""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import timedelta

import pytest

pytest.importorskip("jinja2")  # celery_ext.ui is in the api extra

from celery_ext.model import Task, TaskStatus, utcnow  # noqa: E402
from celery_ext.storage import Storage  # noqa: E402
from celery_ext.ui import stats  # noqa: E402
from tests.support.scrape import poll  # noqa: E402

S = TaskStatus
DAY = timedelta(hours=24)


def test_counts_per_bucket_status_and_type(storage: Storage) -> None:
    now = utcnow().replace(microsecond=0)
    statuses = itertools.cycle([S.SUCCEEDED, S.FAILED, S.QUEUED, S.SUCCEEDED, S.DEAD])
    types = itertools.cycle(["echo", "resize", "send_email"])
    expected: Counter[tuple[int, str, str]] = Counter()
    batch = []
    for i in range(60):
        hours_ago = i % 24  # created half an hour into bucket 23 - hours_ago
        task = Task(
            task_id=f"chart-{i}",
            task_type=next(types),
            payload={},
            status=next(statuses),
            created_at=now - timedelta(hours=hours_ago, minutes=30),
        )
        batch.append(task)
        expected[(23 - hours_ago, task.status.value, task.task_type)] += 1
    batch.append(Task(task_id="too-old", task_type="echo", payload={}, created_at=now - timedelta(hours=25)))
    storage.tasks.create_many(batch)

    counts = stats.count(storage, DAY, now)
    assert counts.cells == expected
    assert not counts.truncated and counts.end == now
    by_status = stats.chart(counts, "status")
    assert by_status.total == 60
    assert {name: n for name, _, n in by_status.legend} == {"succeeded": 24, "failed": 12, "queued": 12, "dead": 12}
    by_type = stats.chart(counts, "type")
    assert {name: n for name, _, n in by_type.legend} == {"echo": 20, "resize": 20, "send_email": 20}


def test_recent_counts_are_shared_and_recounted_in_the_background(storage: Storage) -> None:
    storage.tasks.create(Task(task_id="first", task_type="echo", payload={}, created_at=utcnow()))
    live = stats.Recent(storage, cheap=60.0)  # every count cheap: made for every request
    assert sum(live.get(DAY)[0].cells.values()) == 1
    recent = stats.Recent(storage, max_age=5.0, cheap=0.0)  # every count treated as expensive
    first, stale = recent.get(DAY)  # never counted: counted now
    assert sum(first.cells.values()) == 1 and not stale
    storage.tasks.create(Task(task_id="second", task_type="echo", payload={}, created_at=utcnow()))
    assert sum(live.get(DAY)[0].cells.values()) == 2
    again, stale = recent.get(DAY)
    assert again is first and not stale  # younger than max_age: the same counts, not a count per request
    # Once stale, a request still gets the previous counts at once, told that a recount runs behind it.
    poll(lambda: recent.get(DAY)[1], 30, "the counts to be stale")
    poll(lambda: sum(recent.get(DAY)[0].cells.values()) == 2, 30, "the background recount")
    newer, stale = recent.get(DAY)
    assert newer.end > first.end and not stale
    assert sum(recent.get(timedelta(hours=1))[0].cells.values()) == 2  # each window counted on its own
