"""The worker's main process renders the pool's task writes before the pool forks
(``worker.warm_statements``): a claim and an outcome through the real ``Lifecycle`` against an id
no record has, and the insert of a plain message's receipt (``TaskRepository.prepare``).  It
writes nothing, and a real run afterwards needs no statement shape that was not made then
(PostgreSQL and SQLite render each shape once, ``SqlTaskRepository.update``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import select

from celery_ext.message import ExtHeader
from celery_ext.model import Task, TaskStatus, new_id
from celery_ext.runner import Delivery
from celery_ext.storage.sql_schema import task_logs, tasks
from celery_ext.worker import warm_statements


def rows(storage: Any) -> list[tuple[Any, ...]]:
    with storage.begin() as conn:
        return [tuple(r) for r in conn.execute(select(tasks).order_by(tasks.c.task_id))] + [
            tuple(r) for r in conn.execute(select(task_logs))
        ]


@pytest.mark.parametrize("kind", ["postgresql", "sqlite", "mysql"])
def test_warming_writes_nothing_and_makes_the_shapes_a_run_uses(make_cluster: Callable[..., Any], kind: str) -> None:
    rt = make_cluster(kind).runtime
    rt.storage.migrate()
    token = new_id()
    queued = Task(new_id(), "echo", {"x": 1}, status=TaskStatus.QUEUED, dispatch_token=token)
    rt.storage.tasks.create(queued)
    before = rows(rt.storage)

    warm_statements(rt)

    assert rows(rt.storage) == before  # not a record made, changed or logged
    compiled = set(getattr(rt.storage.tasks, "_compiled", {}))
    if kind != "mysql":  # MySQL goes through SQLAlchemy's own statement cache
        assert rt.storage.tasks._reader is not None  # the read by id

    # A real run of the queued record: claim, the echo, its outcome, on the statements made above.
    delivery = Delivery(queued.task_id, "echo", [], {"x": 1}, ExtHeader(token, 1))
    assert rt.runner.run(delivery, "w1").kind == "succeeded"
    record = rt.storage.tasks.get(queued.task_id)
    assert record is not None and record.status is TaskStatus.SUCCEEDED
    # And a plain Celery message, recorded on receipt (its INSERT: ``TaskRepository.prepare``).
    plain = Delivery(new_id(), "echo", [], {"x": 2}, None)
    assert rt.runner.run(plain, "w1").kind == "succeeded"
    assert set(getattr(rt.storage.tasks, "_compiled", {})) == compiled  # no shape left to render
