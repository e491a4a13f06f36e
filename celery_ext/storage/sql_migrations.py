"""Schema versions of the SQL task store and the ordered steps that upgrade a database in place.

A fresh database gets the newest schema (``sql_schema.metadata``) and every version is recorded
in ``celery_ext_schema``.  An existing database runs each step newer than its highest recorded
version, in order, under a database lock so that workers starting together migrate it once.
Steps only add (tables, columns, indexes): upgrading never drops data, and code one version
older keeps working against the upgraded schema (rolling upgrades).

To change the schema: change ``sql_schema`` (tables as they should be now), add a ``Step`` here
that brings the previous version there, and bump ``SCHEMA_VERSION``.
"""

from __future__ import annotations

import contextlib
import logging
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, Table, func, insert, inspect, select, text
from sqlalchemy.schema import CreateColumn

from celery_ext.model import utcnow
from celery_ext.storage.sql_schema import (
    SCHEMA_VERSION,
    fences,
    groups,
    metadata,
    schedules,
    schema_version,
    task_logs,
    tasks,
)

logger = logging.getLogger("celery_ext.storage.migrations")
_LOCK = "celery_ext_migrate"


@dataclass(frozen=True)
class Step:
    version: int
    description: str
    apply: Callable[[Connection], None]


def _add_columns(conn: Connection, table: Table, names: Sequence[str]) -> None:
    """``ALTER TABLE ... ADD COLUMN`` for each of ``names`` the table lacks, as ``sql_schema``
    declares it (type, nullability, server default).  Skipping present columns makes a step safe
    to run again: MySQL commits each DDL statement, so a step that failed half-way is re-run."""
    have = {c["name"] for c in inspect(conn).get_columns(table.name)}
    prep = conn.dialect.identifier_preparer
    for name in names:
        if name in have:
            continue
        spec = CreateColumn(table.c[name]).compile(dialect=conn.dialect)
        conn.exec_driver_sql(f"ALTER TABLE {prep.format_table(table)} ADD COLUMN {spec}")


def _create_indexes(conn: Connection, table: Table, names: Sequence[str]) -> None:
    for name in names:
        next(i for i in table.indexes if i.name == name).create(conn, checkfirst=True)


def _v2_retention_indexes(conn: Connection) -> None:
    _create_indexes(conn, tasks, ["ix_tasks_status_finished"])
    _create_indexes(conn, task_logs, ["ix_task_logs_time"])


def _v3_runs_and_canvas(conn: Connection) -> None:
    # Every new column is nullable or has a server default, so v2 code keeps inserting.
    _add_columns(conn, tasks, ["run", "args", "parent_id", "root_id", "group_id"])
    _add_columns(conn, task_logs, ["run"])
    _create_indexes(conn, tasks, ["ix_tasks_root", "ix_tasks_group"])


def _v4_fences(conn: Connection) -> None:
    fences.create(conn, checkfirst=True)


def _v5_schedules(conn: Connection) -> None:
    schedules.create(conn, checkfirst=True)
    _create_indexes(conn, schedules, ["ix_schedules_due"])  # a table made by a step that stopped half-way


def _v6_chart_index(conn: Connection) -> None:
    _create_indexes(conn, tasks, ["ix_tasks_created_status_type"])


def _v7_groups_and_progress(conn: Connection) -> None:
    _add_columns(conn, tasks, ["progress"])  # nullable: v6 code keeps inserting
    groups.create(conn, checkfirst=True)
    _create_indexes(conn, groups, ["ix_groups_saved"])


STEPS: list[Step] = [
    Step(2, "indexes for retention purges: tasks(status, finished_at), task_logs(time)", _v2_retention_indexes),
    Step(
        3,
        "runs and Celery canvas ids: tasks(run, args, parent_id, root_id, group_id), task_logs(run), "
        "indexes tasks(root_id, created_at), tasks(group_id, created_at)",
        _v3_runs_and_canvas,
    ),
    Step(4, "leader fencing tokens: celery_ext_fences(name, fence)", _v4_fences),
    Step(5, "periodic schedules: celery_ext_schedules, index (paused, next_fire_at)", _v5_schedules),
    Step(
        6,
        "index tasks(created_at, status, task_type): the dashboard's counts over time read the index only",
        _v6_chart_index,
    ),
    Step(
        7,
        "Celery's update_state: tasks(progress); groups saved by GroupResult.save(): celery_ext_groups, "
        "index (saved_at)",
        _v7_groups_and_progress,
    ),
]
assert [s.version for s in STEPS] == list(range(2, SCHEMA_VERSION + 1)), "STEPS must end at SCHEMA_VERSION"


def current_version(conn: Connection) -> int | None:
    """The database's schema version; ``None`` for an empty database."""
    insp = inspect(conn)
    if not insp.has_table(tasks.name):
        return None
    if not insp.has_table(schema_version.name):
        return 1  # made before versions were recorded: that is the first schema
    return int(conn.execute(select(func.max(schema_version.c.version))).scalar() or 1)


def pending(version: int | None) -> list[Step]:
    return [s for s in STEPS if version is not None and s.version > version]


@contextlib.contextmanager
def _lock(conn: Connection) -> Iterator[None]:
    dialect = conn.dialect.name
    if dialect == "postgresql":
        # Released when the surrounding transaction ends.
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": zlib.crc32(_LOCK.encode())})
        yield
    elif dialect in ("mysql", "mariadb"):
        # A session lock, because MySQL commits implicitly around each DDL statement.
        conn.execute(text("SELECT GET_LOCK(:k, 120)"), {"k": _LOCK})
        try:
            yield
        finally:
            conn.execute(text("SELECT RELEASE_LOCK(:k)"), {"k": _LOCK})
    else:
        # SQLite: take the write lock before reading the version.  pysqlite only begins a
        # transaction at the first INSERT, so without this two processes can both see an empty
        # database and both create it; the loser failed on a duplicate version row.
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        yield


def upgrade(conn: Connection) -> list[Step]:
    """Bring the database to ``SCHEMA_VERSION``; returns the steps applied."""
    with _lock(conn):
        version = current_version(conn)
        if version is None:
            metadata.create_all(conn, checkfirst=True)
            existing = set(conn.execute(select(schema_version.c.version)).scalars())
            for v in range(1, SCHEMA_VERSION + 1):
                if v not in existing:
                    conn.execute(insert(schema_version).values(version=v, applied_at=utcnow()))
            return []
        schema_version.create(conn, checkfirst=True)
        if version == 1 and not conn.execute(select(schema_version.c.version)).first():
            conn.execute(insert(schema_version).values(version=1, applied_at=utcnow()))
        if version > SCHEMA_VERSION:
            logger.warning("task store schema is version %d, newer than this celery_ext (%d)", version, SCHEMA_VERSION)
        applied = []
        for step in pending(version):
            logger.warning("migrating task store schema to version %d: %s", step.version, step.description)
            step.apply(conn)
            conn.execute(insert(schema_version).values(version=step.version, applied_at=utcnow()))
            applied.append(step)
        return applied
