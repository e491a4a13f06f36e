"""PostgreSQL's ``take_due``: the scheduler's due records taken and moved on in one statement.

    UPDATE tasks SET status = ..., dispatch_token = ..., queued_at = ..., updated_at = ...
    FROM (SELECT task_id, status AS was FROM tasks
          WHERE status IN (...) AND run_at <= :before
          ORDER BY run_at LIMIT :limit FOR UPDATE SKIP LOCKED) AS due
    WHERE tasks.task_id = due.task_id [AND <the fence holds>]
    RETURNING tasks.*, due.was

One round trip instead of a scan, an UPDATE with an IN list of the ids and, when some record
moved on in between, a read of each.  The rows are locked as they are chosen (``FOR UPDATE``
re-checks the status of a row changed since the statement began), so a record cancelled or
started meanwhile is not taken, and a row another taker holds is skipped (``SKIP LOCKED``): two
takers at once never take the same record.  A fence older than the stored one refuses every row.
"""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import Integer, bindparam, select, update

from celery_ext.storage.sql_fence import fence_holds
from celery_ext.storage.sql_schema import tasks

#: The name of the returned column after the task's: the status each record had.
WAS = "was"


@functools.cache
def take_due_statement(columns: tuple[str, ...], n_status: int, with_fence: bool) -> Any:
    """The statement for one set of changed columns, built once (as ``sql._update_statement``)."""
    statuses: list[Any] = [bindparam(f"p_status{i}") for i in range(n_status)]
    due = (
        select(tasks.c.task_id, tasks.c.status.label(WAS))
        .where(tasks.c.status.in_(statuses), tasks.c.run_at <= bindparam("p_before", type_=tasks.c.run_at.type))
        .order_by(tasks.c.run_at)
        .limit(bindparam("p_limit", type_=Integer()))
        .with_for_update(skip_locked=True)
        .subquery("due")
    )
    cond = [tasks.c.task_id == due.c.task_id]
    if with_fence:
        cond.append(fence_holds())
    values = {c: bindparam(f"v_{c}", type_=tasks.c[c].type) for c in columns}
    return update(tasks).where(*cond).values(values).returning(*tasks.columns, due.c[WAS])
