"""SQL schema of the task store (SQLAlchemy Core tables) and the column types it needs."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Double,
    Float,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect

# Bump together with a step in ``sql_migrations.STEPS``; ``metadata`` is always the newest schema.
SCHEMA_VERSION = 7


class UtcDateTime(TypeDecorator[datetime]):
    """Naive UTC in the database (microseconds everywhere), aware UTC in Python."""

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name in ("mysql", "mariadb"):
            from sqlalchemy.dialects import mysql  # imported only where used (worker memory)

            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime())

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the task store; use aware UTC")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class LongText(TypeDecorator[str]):
    """TEXT; MEDIUMTEXT on MySQL/MariaDB, whose TEXT stops at 64 KB.  A decorator rather than
    ``with_variant`` so that SQLAlchemy's MySQL dialect is imported only for a MySQL store."""

    impl = Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name in ("mysql", "mariadb"):
            from sqlalchemy.dialects import mysql

            return dialect.type_descriptor(mysql.MEDIUMTEXT())
        return self.impl_instance


JsonDoc = JSON().with_variant(postgresql.JSONB(), "postgresql")
# None stored as SQL NULL (not JSON ``null``), as in rows that predate the column.
NullableJsonDoc = JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
LogId = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData()

tasks = Table(
    "tasks",
    metadata,
    Column("task_id", String(64), primary_key=True),
    Column("task_type", String(128), nullable=False),
    Column("payload", JsonDoc, nullable=False),
    Column("status", String(16), nullable=False),
    Column("priority", SmallInteger, nullable=False, default=0),
    Column("attempt", Integer, nullable=False, default=0),
    Column("max_retries", Integer, nullable=False, default=0),
    Column("timeout", Float, nullable=True),
    Column("run_at", UtcDateTime, nullable=True),
    Column("worker_id", String(255), nullable=True),
    Column("result", JsonDoc, nullable=True),
    Column("error_reason", String(64), nullable=True),
    Column("error_message", LongText, nullable=True),
    Column("idempotency_key", String(255), nullable=True, unique=True),
    Column("dispatch_token", String(64), nullable=True),
    Column("lease_until", UtcDateTime, nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("queued_at", UtcDateTime, nullable=True),
    Column("started_at", UtcDateTime, nullable=True),
    Column("finished_at", UtcDateTime, nullable=True),
    Column("updated_at", UtcDateTime, nullable=True),
    # v3: runs and Celery canvas ids (nullable or with a server default: v2 code keeps inserting)
    Column("run", Integer, nullable=False, default=1, server_default=text("1")),
    Column("args", NullableJsonDoc, nullable=True),
    Column("parent_id", String(64), nullable=True),
    Column("root_id", String(64), nullable=True),
    Column("group_id", String(64), nullable=True),
    Column("progress", NullableJsonDoc, nullable=True),  # v7: Celery's update_state of a running task
    Index("ix_tasks_created", "created_at", "task_id"),
    Index("ix_tasks_status_type_created", "status", "task_type", "created_at"),
    Index("ix_tasks_type_created", "task_type", "created_at"),
    Index("ix_tasks_worker_created", "worker_id", "created_at"),
    Index("ix_tasks_status_run_at", "status", "run_at"),
    Index("ix_tasks_status_lease", "status", "lease_until"),
    Index("ix_tasks_status_finished", "status", "finished_at"),  # v2: retention purges
    Index("ix_tasks_root", "root_id", "created_at"),  # v3: a workflow's tasks
    Index("ix_tasks_group", "group_id", "created_at"),  # v3: a group's tasks
    # v6: the dashboard's counts per status and type over time read only this index (ui/stats.py)
    Index("ix_tasks_created_status_type", "created_at", "status", "task_type"),
)

task_logs = Table(
    "task_logs",
    metadata,
    Column("id", LogId, primary_key=True, autoincrement=True),
    Column("task_id", String(64), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("time", UtcDateTime, nullable=False),
    Column("level", String(16), nullable=False),
    Column("message", LongText, nullable=False),
    Column("run", Integer, nullable=False, default=1, server_default=text("1")),  # v3
    Index("ix_task_logs_task", "task_id", "id"),
    Index("ix_task_logs_time", "time"),  # v2: retention purges
)

# v4: the newest fencing token of each leader role (``scheduler``): a write only a leader may make
# carries its token and is refused once a newer leader has recorded a higher one.
fences = Table(
    "celery_ext_fences",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("fence", BigInteger, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)

# v5: periodic schedules (celery_ext/schedules); ``advance`` is conditional on next_fire_at and fenced.
schedules = Table(
    "celery_ext_schedules",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("task_type", String(128), nullable=False),
    Column("payload", JsonDoc, nullable=False),
    Column("cron", String(255), nullable=True),
    Column("every", Double, nullable=True),
    Column("timezone", String(64), nullable=False),
    Column("catch_up", String(8), nullable=False),
    Column("paused", Boolean, nullable=False),
    Column("priority", SmallInteger, nullable=False),
    Column("max_retries", Integer, nullable=True),
    Column("timeout", Double, nullable=True),
    Column("source", String(16), nullable=False),
    Column("next_fire_at", UtcDateTime, nullable=True),
    Column("last_fire_at", UtcDateTime, nullable=True),
    Column("last_task_id", String(64), nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Index("ix_schedules_due", "paused", "next_fire_at"),
)

# v7: groups saved by Celery's ``GroupResult.save()`` (the result backend's ``_save_group``).
groups = Table(
    "celery_ext_groups",
    metadata,
    Column("group_id", String(255), primary_key=True),
    Column("result", JsonDoc, nullable=False),
    Column("saved_at", UtcDateTime, nullable=False),
    Index("ix_groups_saved", "saved_at"),  # retention purges
)

schema_version = Table(
    "celery_ext_schema",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at", UtcDateTime, nullable=False),
)
