"""MongoDB task store on pymongo (``pip install celery-ext[mongo]``).

``storage.type: mongodb``.  ``storage.config`` keys:
  uri                       ``mongodb://[user:password@]host:port/database`` (the database is the path)
  host, port, database, user, password   instead of ``uri`` (defaults 127.0.0.1, 27017, task_manager)
  tasks_collection          default ``tasks``
  logs_collection           default ``task_logs``
  server_selection_timeout  how long an operation waits for a reachable server (default 10s)
  connect_timeout           default 10s

Each task is one document keyed by a unique index on ``task_id``; ``idempotency_key`` has a
partial unique index (only documents that carry a key).  Status moves are ``update_one`` with
the expected statuses and dispatch token in the filter, so they are atomic per document.
Times are integer microseconds since the Unix epoch (see ``mongo_doc``).
"""

from __future__ import annotations

import builtins
import contextlib
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

from pydantic import Field

from celery_ext.config import Model, PositiveDuration, validate_section
from celery_ext.cursor import decode_cursor, encode_cursor
from celery_ext.errors import ConfigError, StorageError
from celery_ext.model import TERMINAL, Task, TaskFilter, TaskLog, TaskPage, TaskStatus, utcnow
from celery_ext.storage.base import (
    Fence,
    FenceRepository,
    LogMaintenance,
    Storage,
    TaskLogRepository,
    TaskMaintenance,
    TaskRepository,
)
from celery_ext.storage.base import status_values as values_of
from celery_ext.storage.mongo_doc import dec, enc, from_doc, set_fields, to_doc
from celery_ext.storage.mongo_groups import MongoGroupRepository
from celery_ext.storage.mongo_schedules import MongoScheduleRepository

# 1: collections and indexes; 2: indexes on root_id and group_id; 3: the schedules collection's
# index; 4: the saved groups collection's index.
# Documents are never rewritten: one lacking a later field (run, args, parent_id, root_id,
# group_id) reads as its default.
SCHEMA_VERSION = 4
_NAME = r"^[A-Za-z][A-Za-z0-9_]*$"  # portable across MongoDB and wire-compatible servers


class MongoSettings(Model):
    uri: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(27017, ge=1, le=65535)
    database: str | None = None
    user: str | None = None
    password: str | None = None
    tasks_collection: str = Field("tasks", pattern=_NAME)
    logs_collection: str = Field("task_logs", pattern=_NAME)
    server_selection_timeout: PositiveDuration = 10.0
    connect_timeout: PositiveDuration = 10.0


def _pymongo() -> Any:
    try:
        import pymongo
    except ModuleNotFoundError as exc:
        raise ConfigError("storage.type 'mongodb' needs pymongo: pip install celery-ext[mongo]") from exc
    return pymongo


def redact(uri: str) -> str:
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", uri)


def _check_uri(uri: str) -> None:
    """Reject a malformed URI at configuration time (``mongodb+srv`` would need DNS: left to use)."""
    if not uri.startswith("mongodb://"):
        return
    from pymongo import uri_parser

    try:
        uri_parser.parse_uri(uri)
    except (ValueError, _pymongo().errors.ConfigurationError) as exc:
        raise ConfigError(f"storage.config.uri: {str(exc).split('. Hint')[0]} (in {redact(uri)})") from None


class MongoStorage(Storage):
    fences: MongoFenceRepository
    schedules: MongoScheduleRepository
    groups: MongoGroupRepository

    def __init__(self, settings: MongoSettings) -> None:
        self.settings = settings
        if settings.uri:
            if not settings.uri.startswith(("mongodb://", "mongodb+srv://")):
                raise ConfigError("storage.config.uri: expected mongodb://host:port/database")
            self.uri = settings.uri
            path = settings.uri.split("://", 1)[1].partition("/")[2].partition("?")[0]
            self.database = path or settings.database or "task_manager"
            _check_uri(self.uri)
        else:
            auth = f"{quote_plus(settings.user)}:{quote_plus(settings.password or '')}@" if settings.user else ""
            self.database = settings.database or "task_manager"
            self.uri = f"mongodb://{auth}{settings.host}:{settings.port}/{self.database}"
        self._client: Any = None
        self._pid = os.getpid()
        self.tasks = MongoTaskRepository(self)
        self.logs = MongoTaskLogRepository(self)
        self.fences = MongoFenceRepository(self)
        self.schedules = MongoScheduleRepository(self)
        self.groups = MongoGroupRepository(self)

    @classmethod
    def from_config(cls, type_name: str, config: dict[str, Any], data_dir: Path) -> MongoStorage:
        return cls(validate_section(MongoSettings, config, "storage.config"))

    @property
    def description(self) -> str:
        return redact(self.uri)

    @property
    def db(self) -> Any:
        if self._pid != os.getpid():
            self.after_fork()
        if self._client is None:
            pymongo = _pymongo()
            self._client = pymongo.MongoClient(
                self.uri,
                tz_aware=True,  # for anything a user stores in a payload
                connect=False,  # connect on first use, in the process that uses it
                serverSelectionTimeoutMS=int(self.settings.server_selection_timeout * 1000),
                connectTimeoutMS=int(self.settings.connect_timeout * 1000),
            )
            self._db = self._client.get_database(self.database)
        return self._db

    def collection(self, which: str) -> Any:
        name = self.settings.tasks_collection if which == "tasks" else self.settings.logs_collection
        return self.db[name]

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        errors = _pymongo().errors
        try:
            yield
        except (errors.DuplicateKeyError, errors.BulkWriteError):
            raise
        except errors.PyMongoError as exc:
            first = str(exc).splitlines()[0][:300] if str(exc) else ""
            raise StorageError(f"task store {self.description} failed: {exc.__class__.__name__}: {first}") from exc

    def after_fork(self) -> None:
        # A MongoClient is not fork-safe: the child builds its own and leaves the parent's alone.
        self._client = None
        self._pid = os.getpid()

    def migrate(self) -> list[str]:
        pymongo = _pymongo()
        asc, desc = pymongo.ASCENDING, pymongo.DESCENDING
        with self.guard():
            tasks, logs = self.collection("tasks"), self.collection("logs")
            tasks.create_index([("task_id", asc)], unique=True, name="ux_task_id")
            tasks.create_index(
                [("idempotency_key", asc)],
                unique=True,
                name="ux_idempotency_key",
                partialFilterExpression={"idempotency_key": {"$type": "string"}},
            )
            for name, keys in (
                ("ix_created", [("created_at", desc), ("task_id", desc)]),
                ("ix_status_type_created", [("status", asc), ("task_type", asc), ("created_at", desc)]),
                ("ix_type_created", [("task_type", asc), ("created_at", desc)]),
                ("ix_worker_created", [("worker_id", asc), ("created_at", desc)]),
                ("ix_status_run_at", [("status", asc), ("run_at", asc)]),
                ("ix_status_lease", [("status", asc), ("lease_until", asc)]),
                ("ix_status_finished", [("status", asc), ("finished_at", asc)]),
                ("ix_root_created", [("root_id", asc), ("created_at", desc)]),  # v2
                ("ix_group_created", [("group_id", asc), ("created_at", desc)]),  # v2
            ):
                tasks.create_index(keys, name=name)
            logs.create_index([("task_id", asc), ("seq", asc)], name="ix_task_seq")
            logs.create_index([("time", asc)], name="ix_time")
            self.schedules.create_indexes()  # v3
            self.groups.create_indexes()  # v4
            self.db["celery_ext_schema"].update_one(
                {"_id": "schema"},
                {"$max": {"version": SCHEMA_VERSION}, "$setOnInsert": {"applied_at": utcnow()}},
                upsert=True,
            )
        return []

    def schema_version(self) -> tuple[int | None, int]:
        with self.guard():
            doc = self.db["celery_ext_schema"].find_one({"_id": "schema"})
        return (doc["version"] if doc else None), SCHEMA_VERSION

    def ping(self) -> None:
        with self.guard():
            self.db.command("ping")

    def close(self) -> None:
        if self._client is not None and self._pid == os.getpid():
            self._client.close()
        self._client = None


class MongoTaskRepository(TaskRepository, TaskMaintenance):
    def __init__(self, storage: MongoStorage) -> None:
        self.storage = storage

    @property
    def col(self) -> Any:
        return self.storage.collection("tasks")

    def _existing(self, task: Task) -> Task:
        found = self.get_by_idempotency_key(task.idempotency_key) if task.idempotency_key else None
        found = found or self.get(task.task_id)
        if found is None:
            raise StorageError(f"task {task.task_id} collided with a record that vanished")
        return found

    def create(self, task: Task, *, durable: bool = True) -> tuple[Task, bool]:
        errors = _pymongo().errors
        doc = to_doc(task)
        try:
            with self.storage.guard():
                self.col.insert_one(doc)
        except errors.DuplicateKeyError:
            return self._existing(task), False
        return task, True

    def create_many(self, new: Sequence[Task]) -> list[tuple[Task, bool]]:
        if not new:
            return []
        errors = _pymongo().errors
        docs = [to_doc(t) for t in new]
        failed: set[int] = set()
        try:
            with self.storage.guard():
                self.col.insert_many(docs, ordered=False)
        except errors.BulkWriteError as exc:
            for err in exc.details.get("writeErrors", []):
                if err.get("code") != 11000:
                    raise StorageError(f"task store {self.storage.description} failed: {err.get('errmsg')}") from exc
                failed.add(err["index"])
        return [(self._existing(t), False) if i in failed else (t, True) for i, t in enumerate(new)]

    def get(self, task_id: str) -> Task | None:
        with self.storage.guard():
            doc = self.col.find_one({"task_id": task_id})
        return from_doc(doc) if doc else None

    def get_by_idempotency_key(self, key: str) -> Task | None:
        with self.storage.guard():
            doc = self.col.find_one({"idempotency_key": key})
        return from_doc(doc) if doc else None

    def update(
        self,
        task_id: str,
        expected: Iterable[TaskStatus],
        *,
        token: str | None = None,
        fence: Fence | None = None,
        durable: bool = True,  # the collection's write concern decides (see create in base.py)
        **fields: Any,
    ) -> bool:
        query: dict[str, Any] = {"task_id": task_id, "status": {"$in": values_of(expected)}}
        if token is not None:
            query["dispatch_token"] = token
        if not self.storage.fences.holds(fence):
            return False
        with self.storage.guard():
            return int(self.col.update_one(query, set_fields(fields)).matched_count) == 1

    def update_many(
        self,
        task_ids: Sequence[str],
        expected: Iterable[TaskStatus],
        *,
        tokens: Sequence[str] | None = None,
        fence: Fence | None = None,
        durable: bool = True,  # as update's
        **fields: Any,
    ) -> int:
        if not task_ids or (tokens is not None and not tokens) or not self.storage.fences.holds(fence):
            return 0
        query = {"task_id": {"$in": list(task_ids)}, "status": {"$in": values_of(expected)}}
        if tokens is not None:
            query["dispatch_token"] = {"$in": list(tokens)}
        with self.storage.guard():
            return int(self.col.update_many(query, set_fields(fields)).matched_count)

    def delete(self, task_id: str) -> bool:
        with self.storage.guard():
            self.storage.collection("logs").delete_many({"task_id": task_id})
            return int(self.col.delete_one({"task_id": task_id}).deleted_count) == 1

    def list(self, flt: TaskFilter) -> TaskPage:
        query: dict[str, Any] = {}
        if flt.status:
            query["status"] = {"$in": values_of(flt.status)}
        if flt.task_type:
            query["task_type"] = {"$in": list(flt.task_type)}
        if flt.worker_id:
            query["worker_id"] = flt.worker_id
        for name in ("root_id", "parent_id", "group_id"):
            value = getattr(flt, name)
            if value is not None:
                query[name] = value
        created: dict[str, Any] = {}
        if flt.created_after:
            created["$gte"] = enc(flt.created_after)
        if flt.created_before:
            created["$lt"] = enc(flt.created_before)
        if created:
            query["created_at"] = created
        if flt.cursor:
            at, last_id = decode_cursor(flt.cursor)
            micros = enc(at)
            query = {
                "$and": [
                    query,
                    {"$or": [{"created_at": {"$lt": micros}}, {"created_at": micros, "task_id": {"$lt": last_id}}]},
                ]
            }
        cur = self.col.find(query).sort([("created_at", -1), ("task_id", -1)])
        if flt.offset and not flt.cursor:
            cur = cur.skip(flt.offset)
        with self.storage.guard():
            rows = [from_doc(d) for d in cur.limit(flt.limit + 1)]
        more = len(rows) > flt.limit
        items = rows[: flt.limit]
        cursor = encode_cursor(items[-1].created_at, items[-1].task_id) if more and items else None
        return TaskPage(items, cursor)

    def scan(
        self,
        statuses: Iterable[TaskStatus],
        *,
        due_before: datetime | None = None,
        lease_expired_before: datetime | None = None,
        updated_before: datetime | None = None,
        limit: int = 100,
    ) -> builtins.list[Task]:
        query: dict[str, Any] = {"status": {"$in": values_of(statuses)}}
        if due_before is not None:
            query["run_at"] = {"$lte": enc(due_before)}
        if lease_expired_before is not None:
            query["lease_until"] = {"$lt": enc(lease_expired_before)}
        if updated_before is not None:
            query["updated_at"] = {"$lt": enc(updated_before)}
        with self.storage.guard():
            # Due records the earliest due first (the status/run_at index), the others oldest first.
            order = [("run_at", 1), ("created_at", 1)] if due_before is not None else [("created_at", 1)]
            return [from_doc(d) for d in self.col.find(query).sort(order).limit(limit)]

    def purge(self, status: TaskStatus, finished_before: datetime, limit: int = 1000) -> int:
        if TaskStatus(status) not in TERMINAL:
            raise ValueError(f"purge only removes terminal tasks, not {status}")
        query = {"status": TaskStatus(status).value, "finished_at": {"$lt": enc(finished_before)}}
        with self.storage.guard():
            ids = [d["task_id"] for d in self.col.find(query, {"task_id": 1}).limit(limit)]
            if not ids:
                return 0
            # The status is checked again: a task re-opened in between is kept.
            deleted = int(self.col.delete_many({**query, "task_id": {"$in": ids}}).deleted_count)
            gone = set(ids) - {d["task_id"] for d in self.col.find({"task_id": {"$in": ids}}, {"task_id": 1})}
            if gone:
                self.storage.collection("logs").delete_many({"task_id": {"$in": list(gone)}})
        return deleted

    def count_by_status(self) -> dict[str, int]:
        with self.storage.guard():
            rows = self.col.aggregate([{"$group": {"_id": "$status", "n": {"$sum": 1}}}])
            return {r["_id"]: int(r["n"]) for r in rows}


class MongoFenceRepository(FenceRepository):
    """Fences in the ``celery_ext_fences`` collection.  MongoDB cannot make one task update
    conditional on another collection's document outside a transaction (which needs a replica
    set), so a fenced write reads the fence just before it: a leader deposed in the few
    milliseconds between the two is not caught here; the status and token conditions still
    keep it from moving a record twice."""

    def __init__(self, storage: MongoStorage) -> None:
        self.storage = storage

    @property
    def col(self) -> Any:
        return self.storage.db["celery_ext_fences"]

    def advance(self, fence: Fence) -> int:
        errors = _pymongo().errors
        try:
            with self.storage.guard():
                self.col.update_one(
                    {"_id": fence.name, "fence": {"$lt": fence.token}},
                    {"$set": {"fence": fence.token, "updated_at": utcnow()}},
                    upsert=True,
                )
        except errors.DuplicateKeyError:
            pass  # a newer (or the same) token is stored
        return self.current(fence.name)

    def current(self, name: str) -> int:
        with self.storage.guard():
            doc = self.col.find_one({"_id": name})
        return int(doc["fence"]) if doc else 0

    def holds(self, fence: Fence | None) -> bool:
        return fence is None or fence.token >= self.current(fence.name)


class MongoTaskLogRepository(TaskLogRepository, LogMaintenance):
    """Lines are ordered by ``seq``: a clock in microseconds that never repeats or goes back within
    a process; one attempt's lines come from one process, and attempts follow each other in time."""

    def __init__(self, storage: MongoStorage) -> None:
        self.storage = storage
        self._last_seq = 0
        self._seq_lock = threading.Lock()

    def _next_seq(self) -> int:
        with self._seq_lock:
            self._last_seq = max(self._last_seq + 1, time.time_ns() // 1000)
            return self._last_seq

    @property
    def col(self) -> Any:
        return self.storage.collection("logs")

    def append(self, logs: Sequence[TaskLog]) -> None:
        if not logs:
            return
        docs = [
            {
                "task_id": l.task_id,
                "attempt": l.attempt,
                "run": l.run,
                "seq": self._next_seq(),
                "time": enc(l.time),
                "level": l.level,
                "message": l.message,
            }
            for l in logs
        ]
        with self.storage.guard():
            self.col.insert_many(docs, ordered=True)

    def list(
        self, task_id: str, *, attempt: int | None = None, run: int | None = None, limit: int = 1000, offset: int = 0
    ) -> list[TaskLog]:
        query: dict[str, Any] = {"task_id": task_id}
        if attempt is not None:
            query["attempt"] = attempt
        if run is not None:
            # Lines written before runs were recorded carry no ``run``: they belong to run 1.
            query["run"] = {"$in": [run, None]} if run == 1 else run
        cur = self.col.find(query).sort([("seq", 1)]).skip(offset).limit(limit)
        with self.storage.guard():
            return [
                TaskLog(
                    d["task_id"],
                    d["attempt"],
                    dec(d["time"]),  # type: ignore[arg-type]
                    d["level"],
                    d["message"],
                    run=d.get("run") or 1,
                )
                for d in cur
            ]

    def purge(self, before: datetime, limit: int = 1000) -> int:
        with self.storage.guard():
            ids = [d["_id"] for d in self.col.find({"time": {"$lt": enc(before)}}, {"_id": 1}).limit(limit)]
            if not ids:
                return 0
            return int(self.col.delete_many({"_id": {"$in": ids}}).deleted_count)
