"""SQL task store on SQLAlchemy 2 Core: SQLite, PostgreSQL (psycopg 3), MySQL/MariaDB (PyMySQL).

``storage.type``: ``sqlite``, ``postgresql`` or ``mysql``.  ``storage.config`` keys:
  url                      full SQLAlchemy URL (``postgresql://`` and ``mysql://`` get the right driver)
  host, port, database, user, password   instead of ``url``
  path                     SQLite file (default ``<data_dir>/celery_ext.db``)
  pool_size, max_overflow, pool_recycle, connect_timeout, echo
  synchronous_commit       PostgreSQL: ``outcomes`` (default) or ``always``; see below

PostgreSQL commits a task's start (a submit's record, its queued mark, a worker's claim or a
plain message's receipt) with ``synchronous_commit`` off for that one statement: the write is
visible to every connection at once, but its commit does not wait for the WAL to reach the disk
(0.2-1.5 ms a commit on the development machine, more when the server is busy).  Each is made
durable within ``wal_writer_delay`` (200 ms) by the server, and at the latest by the run's
outcome, which always waits for the disk: its flush carries every earlier record with it.  What a
database crash inside that window loses is rebuilt (``Lifecycle``): a record lost before its run
is created again from its message, and a lost claim is repaired by the run's outcome.
``always`` makes every write wait for the disk.  SQLite (``synchronous=NORMAL`` in WAL mode) and
MySQL keep their own settings.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import os
import select as io_select
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import Field
from sqlalchemy import (
    ARRAY,
    Connection,
    Engine,
    and_,
    any_,
    bindparam,
    cast,
    create_engine,
    delete,
    event,
    func,
    insert,
    literal_column,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from celery_ext.config import Model, validate_section
from celery_ext.cursor import decode_cursor, encode_cursor
from celery_ext.errors import ConfigError, StorageError
from celery_ext.model import TERMINAL, Task, TaskFilter, TaskLog, TaskPage, TaskStatus, utcnow
from celery_ext.storage import sql_migrations
from celery_ext.storage.base import (
    Fence,
    FenceRepository,
    LogMaintenance,
    Storage,
    TaskLogRepository,
    TaskMaintenance,
    TaskRepository,
    from_record,
    record_changes,
    status_values,
    to_record,
)
from celery_ext.storage.sql_due import take_due_statement
from celery_ext.storage.sql_fence import fence_holds, fence_params
from celery_ext.storage.sql_groups import SqlGroupRepository
from celery_ext.storage.sql_schedules import SqlScheduleRepository
from celery_ext.storage.sql_schema import SCHEMA_VERSION, fences, task_logs, tasks

_DRIVERS = {"sqlite": "sqlite", "postgresql": "postgresql+psycopg", "mysql": "mysql+pymysql"}
_EXTRAS = {"postgresql": "postgres", "mysql": "mysql"}
INSERT_ROWS = 5000  # rows per INSERT in create_many (PostgreSQL)


class SqlSettings(Model):
    url: str | None = None
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    database: str | None = None
    user: str | None = None
    password: str | None = None
    path: str | None = None
    pool_size: int = Field(5, ge=1)
    max_overflow: int = Field(10, ge=0)
    pool_recycle: float = Field(1800.0, gt=0)
    connect_timeout: float = Field(10.0, gt=0)
    echo: bool = False
    synchronous_commit: Literal["outcomes", "always"] = "outcomes"


def build_url(type_name: str, settings: SqlSettings, data_dir: Path) -> URL:
    if settings.url:
        url = make_url(settings.url)
        family = url.get_backend_name()
        if family == "mariadb":
            family = "mysql"
        if family != type_name:
            raise ConfigError(f"storage.config.url: a {family} URL for storage.type {type_name!r}")
        if "+" not in url.drivername:
            url = url.set(drivername=_DRIVERS[type_name])
        return url
    if type_name == "sqlite":
        path = Path(settings.path or settings.database or data_dir / "celery_ext.db")
        return URL.create("sqlite", database=str(path if path.is_absolute() else data_dir / path))
    if not settings.database:
        raise ConfigError("storage.config: give either url or host, port and database")
    return URL.create(
        _DRIVERS[type_name],
        username=settings.user,
        password=settings.password,
        host=settings.host or "127.0.0.1",
        port=settings.port,
        database=settings.database,
    )


def _engine(type_name: str, url: URL, settings: SqlSettings) -> Engine:
    if type_name == "sqlite":
        engine = create_engine(url, echo=settings.echo, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            # Index pages of a large store stay in memory (the default 2 MB thrashes past ~50k tasks).
            cur.execute("PRAGMA cache_size=-32768")
            cur.close()

        return engine
    connect_args: dict[str, Any] = {"connect_timeout": int(settings.connect_timeout)}
    if type_name == "mysql":
        connect_args["charset"] = "utf8mb4"
    try:
        return create_engine(
            url,
            echo=settings.echo,
            pool_size=settings.pool_size,
            max_overflow=settings.max_overflow,
            pool_recycle=settings.pool_recycle,
            # No pre-ping: it costs a round trip per checkout on the per-task hot path.  A dropped
            # connection fails one statement, SQLAlchemy invalidates the pool, and callers retry.
            connect_args=connect_args,
        )
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"storage.type {type_name!r} needs {exc.name}: pip install celery-ext[{_EXTRAS[type_name]}]"
        ) from exc


class SqlStorage(Storage):
    def __init__(self, type_name: str, url: URL, settings: SqlSettings) -> None:
        self.type_name = type_name
        self.url = url
        self.settings = settings
        self._engine: Engine | None = None
        self._held = threading.local()  # each thread's autocommit connection (see single())
        self._pid = os.getpid()
        self.tasks = SqlTaskRepository(self)
        self.logs = SqlTaskLogRepository(self)
        self.fences = SqlFenceRepository(self)
        self.schedules = SqlScheduleRepository(self)
        self.groups = SqlGroupRepository(self)

    @classmethod
    def from_config(cls, type_name: str, config: dict[str, Any], data_dir: Path) -> SqlStorage:
        settings = validate_section(SqlSettings, config, "storage.config")
        return cls(type_name, build_url(type_name, settings, data_dir), settings)

    @property
    def description(self) -> str:
        return self.url.render_as_string(hide_password=True)

    @property
    def engine(self) -> Engine:
        if self._pid != os.getpid():
            self.after_fork()
        if self._engine is None:
            if self.type_name == "sqlite" and self.url.database:
                Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
            self._engine = _engine(self.type_name, self.url, self.settings)
        return self._engine

    def after_fork(self) -> None:
        """In a forked child: drop the connections inherited from the parent, which the child must
        neither use nor close (SQLAlchemy's ``dispose(close=False)``: a new, empty pool, the old
        connections forgotten).  The engine itself is kept: its dialect and compiled statements,
        built in the parent before the pool forked, stay in pages the child shares with it
        (docs/benchmarks.md, worker memory)."""
        if self._engine is not None:
            self._engine.dispose(close=False)
        self._held = threading.local()
        self._pid = os.getpid()

    @contextlib.contextmanager
    def begin(self) -> Iterator[Connection]:
        """A transaction: everything inside commits together."""
        with self._translated():
            with self.engine.begin() as conn:
                yield conn

    @contextlib.contextmanager
    def single(self) -> Iterator[Connection]:
        """One statement that needs no transaction around it (the per-task claim, finish, get).

        PostgreSQL and SQLite run it in autocommit on a connection this thread keeps: one round
        trip instead of a pool checkout, BEGIN, the statement, COMMIT and the checkin's reset
        (measured: ~1.4 ms -> ~0.5 ms per statement).  A failed statement drops that connection;
        the next call opens a fresh one.  PyMySQL would spend round trips toggling autocommit, so
        MySQL keeps the pool and its implicit transaction."""
        if self.type_name == "mysql":
            with self.begin() as conn:
                yield conn
            return
        engine = self.engine  # after a fork this also drops the parent's connections
        held: Connection | None = getattr(self._held, "conn", None)
        if held is None or held.closed or held.engine is not engine:
            with self._translated():
                held = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            self._held.conn = held
        conn = held
        try:
            with self._translated():
                yield conn
        except StorageError:
            self._held.conn = None
            with contextlib.suppress(Exception):
                conn.invalidate()
            raise

    def live_connection(self) -> bool:
        """Whether this thread keeps ``single()``'s connection, open, from this process, and the
        server has not ended it.  A connection idle between statements is sent nothing, so one
        with something to read was ended by the server (a shutdown's "terminating connection",
        or the end of the stream): it is dropped here, and the next statement opens another."""
        held: Connection | None = getattr(self._held, "conn", None)
        if held is None or held.closed or self._pid != os.getpid():
            return False
        try:
            dbapi_conn: Any = held.connection.dbapi_connection
            readable, _, _ = io_select.select([dbapi_conn.fileno()], [], [], 0)
        except Exception:  # noqa: BLE001 - an invalidated or closed connection: not one to keep
            readable = [True]
        if readable:
            self._held.conn = None
            with contextlib.suppress(Exception):
                held.invalidate()
            return False
        return True

    @contextlib.contextmanager
    def single_dbapi(self) -> Iterator[Any]:
        """The DBAPI connection under ``single()``, for the per-task statements run without
        SQLAlchemy's per-execution machinery (see ``SqlTaskRepository.update``); its driver
        errors become ``StorageError`` and drop the connection like any other failure."""
        with self.single() as conn, self._dbapi_errors():
            yield conn.connection.dbapi_connection

    @contextlib.contextmanager
    def single_cursor(self) -> Iterator[Any]:
        """A cursor of ``single_dbapi``'s connection, kept with it and reused by every
        statement of this thread: a new psycopg cursor builds its adapters anew (each
        parameter's dumper looked up again), 0.02 ms of CPU a statement (measured,
        docs/benchmarks.md).  A statement reads what it needs of its result before the next one.
        SQLite gets a cursor of its own each time, closed after it: an open sqlite3 cursor would
        keep its read transaction until its next statement."""
        with self.single_dbapi() as dbapi_conn:
            if self.type_name != "postgresql":
                cursor = dbapi_conn.cursor()
                try:
                    yield cursor
                finally:
                    cursor.close()
                return
            kept = getattr(self._held, "cursor", None)
            if kept is None or kept[0] is not dbapi_conn:
                kept = self._held.cursor = (dbapi_conn, dbapi_conn.cursor())
            yield kept[1]

    @contextlib.contextmanager
    def begin_dbapi(self) -> Iterator[Any]:
        """The DBAPI connection of a transaction from the pool (``begin()``), for a statement run
        as ``single_dbapi``'s on a thread that keeps no connection (the scheduler's storage
        thread: ``take_due``)."""
        with self.begin() as conn, self._dbapi_errors():
            yield conn.connection.dbapi_connection

    @contextlib.contextmanager
    def _dbapi_errors(self) -> Iterator[None]:
        try:
            yield
        except self.engine.dialect.loaded_dbapi.Error as exc:
            raise StorageError(
                f"task store {self.description} failed: {exc.__class__.__name__}: {_short(exc)}"
            ) from exc

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except IntegrityError:
            raise
        except SQLAlchemyError as exc:
            raise StorageError(
                f"task store {self.description} failed: {exc.__class__.__name__}: {_short(exc)}"
            ) from exc

    def migrate(self) -> list[str]:
        """Create or upgrade the schema in place; returns the descriptions of the steps applied."""
        for attempt in range(3):
            try:
                with self.begin() as conn:
                    return [f"{s.version}: {s.description}" for s in sql_migrations.upgrade(conn)]
            except (IntegrityError, StorageError):
                # Another process created the same tables at the same moment; look again.
                if attempt == 2:
                    raise
        return []

    def schema_version(self) -> tuple[int | None, int]:
        with self.begin() as conn:
            return sql_migrations.current_version(conn), SCHEMA_VERSION

    def upkeep_warnings(self) -> list[str]:
        """PostgreSQL: autovacuum off, on the server or for a table of records.  Every task leaves
        dead row versions behind it (its claim and its outcome are updates), which only VACUUM
        reclaims: without it the tables and their indexes grow with every task, retention or not."""
        if self.type_name != "postgresql":
            return []
        tables = [tasks.name, task_logs.name]
        with self.begin() as conn:
            server = conn.exec_driver_sql("SELECT current_setting('autovacuum')").scalar_one()
            rows = conn.execute(
                text(
                    "SELECT relname, reloptions FROM pg_class WHERE relname = ANY(:names) AND relkind = 'r'"
                    " AND relnamespace = to_regnamespace(current_schema())"
                ),
                {"names": tables},
            )
            off = [name for name, options in rows if _autovacuum_disabled(options or [])]
        warnings = []
        if server != "on":
            warnings.append(
                f"{self.description}: the server runs with autovacuum = {server}; each task leaves dead rows "
                "in the tasks table and its indexes that only VACUUM reclaims. Turn autovacuum on, or run "
                "VACUUM ANALYZE on the tasks and task_logs tables regularly (docs/storage.md, Vacuum)"
            )
        for name in sorted(off):
            warnings.append(
                f"{self.description}: table {name} has autovacuum_enabled = false; its dead rows are never "
                f"reclaimed. ALTER TABLE {name} RESET (autovacuum_enabled), or VACUUM it regularly"
            )
        return warnings

    def ping(self) -> None:
        with self.begin() as conn:
            conn.exec_driver_sql("SELECT 1")

    def close(self) -> None:
        conn = getattr(self._held, "conn", None)
        if conn is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                conn.close()
        self._held = threading.local()
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


def _autovacuum_disabled(options: Iterable[str]) -> bool:
    """Whether a table's ``reloptions`` turn autovacuum off (``autovacuum_enabled=false``, or
    any other spelling of a false boolean)."""
    for option in options:
        key, _, value = option.partition("=")
        if key.strip().lower() == "autovacuum_enabled" and value.strip().lower() in ("false", "off", "no", "0"):
            return True
    return False


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return text.splitlines()[0] if text else exc.__class__.__name__


# --- row <-> Task --------------------------------------------------------------------------


def _from_row(row: Any) -> Task:
    return from_record(row._mapping)


def _no_flush_wait() -> Any:
    """``(SELECT set_config('synchronous_commit', 'off', true))``: joined into a statement run in
    autocommit, it makes that statement's own transaction commit without waiting for the WAL
    flush (PostgreSQL reads the setting at commit; ``true``: for this transaction only), in the
    same round trip, leaving the session's setting as it was."""
    sc = func.set_config(literal_column("'synchronous_commit'"), literal_column("'off'"), true())
    return select(sc.label("sc")).subquery("no_flush_wait")


@functools.cache
def _update_statement(
    columns: tuple[str, ...], with_token: bool, n_status: int, with_fence: bool = False, no_wait: bool = False
) -> Any:
    """The conditional UPDATE for one set of columns, built once: the state machine's moves are
    a handful of shapes, run for every task, so statement construction is kept off that path.
    The expected statuses are ``n_status`` plain parameters, not one expanding IN parameter,
    which SQLAlchemy would re-render on every execution (a third of a claim's client CPU).
    ``no_wait``: committed without waiting for the disk (PostgreSQL, see the module's doc)."""
    statuses: list[Any] = [bindparam(f"p_status{i}") for i in range(n_status)]
    cond = [tasks.c.task_id == bindparam("p_id"), tasks.c.status.in_(statuses)]
    if with_token:
        cond.append(tasks.c.dispatch_token == bindparam("p_token"))
    if with_fence:
        cond.append(fence_holds())
    if no_wait:
        cond.append(_no_flush_wait().c.sc.is_not(None))
    return update(tasks).where(*cond).values({c: bindparam(f"v_{c}", type_=tasks.c[c].type) for c in columns})


class _Compiled(NamedTuple):
    """A statement rendered once for one dialect, to run on the DBAPI cursor directly."""

    sql: str
    order: tuple[str, ...] | None  # parameter names in order for positional paramstyles
    processors: tuple[tuple[str, Callable[[Any], Any]], ...]  # the column types' bind processing

    @classmethod
    def of(cls, stmt: Any, dialect: Any) -> _Compiled:
        compiled = stmt.compile(dialect=dialect)
        processors = []
        for name, bind in compiled.binds.items():
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                processors.append((name, process))
        order = tuple(compiled.positiontup) if compiled.positional else None
        return cls(compiled.string, order, tuple(processors))

    def args(self, params: dict[str, Any]) -> Any:
        for name, process in self.processors:
            params[name] = process(params[name])
        return params if self.order is None else [params[name] for name in self.order]


class _Reader:
    """``SELECT <every column> FROM tasks WHERE task_id = ?`` rendered once, with the column
    types' result processing (JSON, times; made from the driver's column types on first use),
    to run on the DBAPI cursor directly."""

    def __init__(self, dialect: Any) -> None:
        self.dialect = dialect
        stmt = select(*tasks.columns).where(tasks.c.task_id == bindparam("p_id", type_=tasks.c.task_id.type))
        self.select = _Compiled.of(stmt, dialect)
        self.columns: list[tuple[str, Callable[[Any], Any] | None]] | None = None

    def fetch(self, cursor: Any, task_id: str) -> dict[str, Any] | None:
        cursor.execute(self.select.sql, self.select.args({"p_id": task_id}))
        row = cursor.fetchone()
        if self.columns is None:
            self.columns = _result_processors(self.dialect, cursor.description)
        return None if row is None else _decoded(self.columns, row)


def _result_processors(dialect: Any, description: Any) -> list[tuple[str, Callable[[Any], Any] | None]]:
    """Each column of ``tasks`` (the first columns of a cursor's ``description``) with its
    type's result processing for the driver's column type."""
    return [
        (c.name, c.type.dialect_impl(dialect).result_processor(dialect, d[1]))
        for c, d in zip(tasks.columns, description, strict=False)
    ]


def _decoded(columns: list[tuple[str, Callable[[Any], Any] | None]], row: Sequence[Any]) -> dict[str, Any]:
    """A row of ``tasks``' columns (any further ones ignored) as a record; NULL stays None
    without a call to the column's processing (a due record has a dozen NULL columns)."""
    return {
        name: (process(value) if process is not None and value is not None else value)
        for (name, process), value in zip(columns, row, strict=False)
    }


@functools.cache
def _can_send_alone() -> bool:
    """Whether this psycopg has the cursor's execution generator ``create_sent`` runs in two
    halves (psycopg 3.1 to 3.3 have it; a later one without it gets the plain ``create``)."""
    import psycopg

    return hasattr(psycopg.Cursor, "_execute_gen")


def _resumed(execution: Generator[Any, Any, Any], waiting: Any) -> Generator[Any, Any, Any]:
    """A psycopg generator stopped at its first wait (``waiting``), to be run on by
    ``Connection.wait`` from there."""
    try:
        while True:
            ready = yield waiting
            waiting = execution.send(ready)
    except StopIteration as stop:
        return stop.value


class SqlTaskRepository(TaskRepository, TaskMaintenance):
    def __init__(self, storage: SqlStorage) -> None:
        self.storage = storage
        self._compiled: dict[tuple[Any, ...], _Compiled] = {}
        self._reader: _Reader | None = None
        self._unnest_sql: str | None = None
        self._unnest_bind_list: list[tuple[str, Callable[[Any], Any] | None, bool]] | None = None
        # Whether writes asked with ``durable=False`` commit without waiting for the disk.
        self.no_wait = storage.type_name == "postgresql" and storage.settings.synchronous_commit == "outcomes"

    def prepare(self) -> None:
        """The INSERT a plain Celery message's receipt runs (``Lifecycle.received``), rendered."""
        if self.storage.type_name != "mysql":
            self._insert_compiled(self.no_wait)

    def create(self, task: Task, *, durable: bool = True) -> tuple[Task, bool]:
        try:
            self._insert(task, no_wait=not durable and self.no_wait)
            return task, True
        except IntegrityError:
            existing = self._taken(task)
            if existing is None:
                raise
            return existing, False

    def _taken(self, task: Task) -> Task | None:
        """The record that holds the key the insert of ``task`` found taken, if still there."""
        existing = self.get_by_idempotency_key(task.idempotency_key) if task.idempotency_key else None
        return existing if existing is not None else self.get(task.task_id)

    def sends_after_publish(self) -> bool:
        return self.storage.type_name == "postgresql" and _can_send_alone() and self.storage.live_connection()

    def create_sent(self, task: Task) -> Callable[[], tuple[Task, bool]]:
        """PostgreSQL: ``_insert``'s INSERT (autocommit, committed on its own) is sent (``_send``)
        and the function returned reads its result.  A single ``submit`` publishes the task's
        message in between, so the insert's round trip and the server's work overlap the publish
        (see docs/benchmarks.md).  Other stores: ``create``."""
        compiled = self._insert_compiled(self.no_wait)
        finish = None
        if self.storage.type_name == "postgresql":
            finish = self._send(compiled.sql, compiled.args({f"v_{k}": v for k, v in to_record(task).items()}))
        if finish is None:
            return super().create_sent(task)

        def outcome() -> tuple[Task, bool]:
            try:
                finish()
            except StorageError as exc:
                if not isinstance(exc.__cause__, self.storage.engine.dialect.loaded_dbapi.IntegrityError):
                    # The kept connection failed (a restarted server, an idle timeout): once
                    # more on a fresh one (a write that did commit is then found taken).
                    return self.create(task, durable=False)
                existing = self._taken(task)
                if existing is None:
                    raise IntegrityError(compiled.sql, None, exc.__cause__) from exc.__cause__
                return existing, False
            return task, True

        return outcome

    def create_many_sent(self, new: Sequence[Task]) -> Callable[[], list[tuple[Task, bool]]]:
        """PostgreSQL, up to ``INSERT_ROWS`` records: ``_insert_rows``'s statement is sent
        (``_send``; atomic on its own, and waiting for the disk as ``create_many``'s transaction
        does) and the function returned reads which records it inserted.  ``submit_many``
        publishes the batch in between.  Other stores, or more records: ``create_many``."""
        finish = None
        if self.storage.type_name == "postgresql" and 0 < len(new) <= INSERT_ROWS:
            finish = self._send(self._unnest(), self._unnest_params(new))
        if finish is None:
            return super().create_many_sent(new)

        def outcome() -> list[tuple[Task, bool]]:
            try:
                inserted = {row[0] for row in finish()}
            except StorageError:
                # The kept connection failed: once more on a fresh one (ON CONFLICT DO NOTHING:
                # records that did commit are answered with themselves, as taken).
                return self.create_many(new)
            return [(t, True) if t.task_id in inserted else self._holder(t) for t in new]

        return outcome

    def _send(self, sql: str, args: Any) -> Callable[[], list[Any]] | None:
        """Send one statement on this thread's kept (autocommit) connection without waiting for
        its answer: psycopg's own execution of it, run up to its wait for the server and resumed
        there by the function returned, which returns the rows it read (its errors as ``single``'s).
        That function must be called before any other statement of this thread.  ``None`` when
        the kept connection failed while sending (dropped: the caller writes on a fresh one), or
        this psycopg lacks the execution generator."""
        if not _can_send_alone():
            return None
        try:
            with contextlib.ExitStack() as stack:  # unwound here only by an error while sending
                cursor = stack.enter_context(self.storage.single_cursor())
                dbapi_conn = cursor.connection
                # Not taking the connection's lock as ``Cursor.execute`` does: the kept connection
                # is this thread's alone, and a statement run on it in between (say, by a publish
                # signal's receiver) fails at once ("another command is already in progress"),
                # where holding the lock would hang it.
                execution = cursor._execute_gen(sql, args)
                try:
                    waiting: Any = next(execution)  # sent; waiting for the answer
                except StopIteration:
                    waiting = None
                pending = stack.pop_all()
        except StorageError:
            return None

        def finish() -> list[Any]:
            with pending:
                if waiting is not None:
                    dbapi_conn.wait(_resumed(execution, waiting))
                return cursor.fetchall() if cursor.description is not None else []

        return finish

    def create_many(self, new: Sequence[Task]) -> list[tuple[Task, bool]]:
        if not new:
            return []
        if self.storage.type_name == "postgresql":
            return self._insert_rows(new)
        return self.executemany(new)

    def executemany(self, new: Sequence[Task]) -> list[tuple[Task, bool]]:
        """SQLite and MySQL's ``create_many`` (PostgreSQL's before ``_insert_rows``): SQLAlchemy's
        executemany in one transaction, one insert each when a key is taken."""
        try:
            with self.storage.begin() as conn:
                conn.execute(insert(tasks), [to_record(t) for t in new])
            return [(t, True) for t in new]
        except IntegrityError:
            # Some idempotency key is taken: fall back to one insert each.
            return [self.create(t) for t in new]

    def _insert_rows(self, new: Sequence[Task]) -> list[tuple[Task, bool]]:
        """PostgreSQL: one ``INSERT ... SELECT FROM unnest(<one array a column>) ON CONFLICT DO
        NOTHING`` per ``INSERT_ROWS`` records, in one transaction; a record it did not insert (its
        idempotency key or id is taken, also by an earlier one of the batch) is answered with the
        record that holds it, as ``create`` does.  Values are bound as ``_insert``'s (the column
        types' bind processing), 26 binary array parameters.  Profiled: SQLAlchemy's executemany
        spent its time in its per-row machinery, a multi-row VALUES list in psycopg parsing the
        long query, text arrays in psycopg's Python array quoting."""
        sql = self._unnest()
        inserted: set[str] = set()
        with self.storage.begin() as conn:
            for i in range(0, len(new), INSERT_ROWS):
                inserted.update(r[0] for r in conn.exec_driver_sql(sql, self._unnest_params(new[i : i + INSERT_ROWS])))
        return [(t, True) if t.task_id in inserted else self._holder(t) for t in new]

    def _unnest(self) -> str:
        """``_insert_rows``'s statement, rendered once."""
        sql = self._unnest_sql
        if sql is None:
            dialect = self.storage.engine.dialect
            cols = [c.name for c in tasks.columns]
            # %b: psycopg's binary array dumpers (4x less client time than text arrays, measured).
            arrays = ", ".join(f"CAST(%b AS {c.type.compile(dialect=dialect)}[])" for c in tasks.columns)
            table = dialect.identifier_preparer.format_table(tasks)
            # Only the schema's names and types are formatted in; the values are bound.
            sql = self._unnest_sql = (
                f"INSERT INTO {table} ({', '.join(cols)}) SELECT * FROM unnest({arrays}) ON CONFLICT DO NOTHING RETURNING task_id"  # noqa: S608, E501
            )
        return sql

    def _unnest_params(self, new: Sequence[Task]) -> tuple[list[Any], ...]:
        """``_unnest``'s parameters for ``new``: one array a column, bound as ``_insert``'s (its
        column types' bind processing), built a column at a time (a third of the time of a row
        at a time: no dict of bound values per row)."""
        records = [to_record(t) for t in new]
        out = []
        for name, process, keeps_none in self._unnest_binds():
            values = [r[name] for r in records]
            if process is not None:
                values = (
                    [None if v is None else process(v) for v in values] if keeps_none else list(map(process, values))
                )
            out.append(values)
        return tuple(out)

    def _unnest_binds(self) -> list[tuple[str, Callable[[Any], Any] | None, bool]]:
        """Each column of ``tasks``: its name, its bind processing in ``_insert`` (or ``None``),
        and whether that processing leaves ``None`` as it is (then it is skipped for ``None``)."""
        binds = self._unnest_bind_list
        if binds is None:
            processors = dict(self._insert_compiled().processors)
            binds = []
            for c in tasks.columns:
                process = processors.get(f"v_{c.name}")
                binds.append((c.name, process, process is not None and process(None) is None))
            self._unnest_bind_list = binds
        return binds

    def _holder(self, task: Task) -> tuple[Task, bool]:
        existing = self._taken(task)
        return (existing, False) if existing is not None else self.create(task)  # gone meanwhile: try again

    def _insert_compiled(self, no_wait: bool = False) -> _Compiled:
        compiled = self._compiled.get(("insert", no_wait))
        if compiled is None:
            binds = [bindparam(f"v_{c.name}", type_=c.type) for c in tasks.columns]
            if no_wait:  # INSERT ... SELECT <the values> FROM (set_config(...)): see _no_flush_wait
                values = select(*[cast(b, c.type) for b, c in zip(binds, tasks.columns, strict=True)])
                stmt = insert(tasks).from_select(list(tasks.columns), values.select_from(_no_flush_wait()))
            else:
                stmt = insert(tasks).values({c.name: b for c, b in zip(tasks.columns, binds, strict=True)})
            compiled = self._compiled[("insert", no_wait)] = _Compiled.of(stmt, self.storage.engine.dialect)
        return compiled

    def _insert(self, task: Task, *, no_wait: bool = False) -> None:
        """One INSERT, atomic on its own, on the kept autocommit connection (see single()); the
        statement is rendered once and run on the DBAPI cursor, as ``update`` does (every
        submit and every plain message's receipt runs it).  A taken key raises IntegrityError."""
        if self.storage.type_name == "mysql":
            with self.storage.single() as conn:
                conn.execute(insert(tasks).values(**to_record(task)))
            return
        compiled = self._insert_compiled(no_wait)
        params = {f"v_{k}": v for k, v in to_record(task).items()}
        dbapi = self.storage.engine.dialect.loaded_dbapi
        try:
            with self.storage.single_cursor() as cursor:
                cursor.execute(compiled.sql, compiled.args(params))
        except StorageError as exc:
            if isinstance(exc.__cause__, dbapi.IntegrityError):
                raise IntegrityError(compiled.sql, None, exc.__cause__) from exc.__cause__
            raise

    def get(self, task_id: str) -> Task | None:
        if self.storage.type_name == "mysql":
            with self.storage.single() as conn:
                row = conn.execute(select(tasks).where(tasks.c.task_id == task_id)).first()
            return _from_row(row) if row else None
        # Every waiter and every recovery reads records by id: the same fast path as ``update``.
        reader = self._reader
        if reader is None:
            reader = self._reader = _Reader(self.storage.engine.dialect)
        with self.storage.single_cursor() as cursor:
            record = reader.fetch(cursor, task_id)
        return None if record is None else from_record(record)

    def get_by_idempotency_key(self, key: str) -> Task | None:
        with self.storage.begin() as conn:
            row = conn.execute(select(tasks).where(tasks.c.idempotency_key == key)).first()
        return _from_row(row) if row else None

    def update(
        self,
        task_id: str,
        expected: Iterable[TaskStatus],
        *,
        token: str | None = None,
        fence: Fence | None = None,
        durable: bool = True,
        **fields: Any,
    ) -> bool:
        values = record_changes(fields)
        statuses = status_values(expected)
        params = {
            "p_id": task_id,
            **{f"p_status{i}": s for i, s in enumerate(statuses)},
            **{f"v_{k}": v for k, v in values.items()},
            **fence_params(fence),
        }
        if token is not None:
            params["p_token"] = token
        shape = (tuple(values), token is not None, len(statuses), fence is not None, not durable and self.no_wait)
        if self.storage.type_name == "mysql":  # no kept connection there (see SqlStorage.single)
            with self.storage.single() as conn:
                return conn.execute(_update_statement(*shape), params).rowcount == 1
        # Every task runs this twice (claim, outcome): straight on the DBAPI cursor with the
        # statement rendered once, which halves the client CPU of SQLAlchemy's execute().
        compiled = self._compiled.get(shape)
        if compiled is None:
            compiled = self._compiled[shape] = _Compiled.of(_update_statement(*shape), self.storage.engine.dialect)
        with self.storage.single_cursor() as cursor:
            cursor.execute(compiled.sql, compiled.args(params))
            return bool(cursor.rowcount == 1)

    def update_many(
        self,
        task_ids: Sequence[str],
        expected: Iterable[TaskStatus],
        *,
        tokens: Sequence[str] | None = None,
        fence: Fence | None = None,
        durable: bool = True,
        **fields: Any,
    ) -> int:
        if not task_ids or (tokens is not None and not tokens):
            return 0
        params = fence_params(fence)
        cond = [self._among(tasks.c.task_id, "p_ids", task_ids, params), tasks.c.status.in_(status_values(expected))]
        if tokens is not None:
            cond.append(self._among(tasks.c.dispatch_token, "p_tokens", tokens, params))
        if fence is not None:
            cond.append(fence_holds())
        stmt = update(tasks).where(*cond).values(**record_changes(fields))
        with self.storage.begin() as conn:
            if not durable and self.no_wait:
                conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
            return int(conn.execute(stmt, params).rowcount)

    def _among(self, column: Any, name: str, values: Sequence[str], params: dict[str, Any]) -> Any:
        """``column`` is one of ``values``: on PostgreSQL one array parameter, not an IN list of a
        bind per value (rendered, sent and parsed for each of a batch's thousand ids)."""
        if self.storage.type_name != "postgresql":
            return column.in_(list(values))
        params[name] = list(values)
        return column == any_(bindparam(name, type_=ARRAY(column.type)))

    def take_due(
        self,
        statuses: Iterable[TaskStatus],
        before: datetime,
        limit: int,
        *,
        fence: Fence | None = None,
        **fields: Any,
    ) -> builtins.list[tuple[Task, TaskStatus]]:
        if self.storage.type_name != "postgresql":  # no UPDATE ... RETURNING with SKIP LOCKED
            return super().take_due(statuses, before, limit, fence=fence, **fields)
        values = record_changes(fields)
        expected = status_values(statuses)
        shape = ("take_due", tuple(values), len(expected), fence is not None)
        compiled = self._compiled.get(shape)
        if compiled is None:
            stmt = take_due_statement(tuple(values), len(expected), fence is not None)
            compiled = self._compiled[shape] = _Compiled.of(stmt, self.storage.engine.dialect)
        params = {
            "p_before": before,
            "p_limit": limit,
            **{f"p_status{i}": s for i, s in enumerate(expected)},
            **{f"v_{k}": v for k, v in values.items()},
            **fence_params(fence),
        }
        # The DBAPI cursor, on a pooled connection: the scheduler takes on a thread of its own.
        with self.storage.begin_dbapi() as dbapi_conn:
            cursor = dbapi_conn.cursor()
            try:
                cursor.execute(compiled.sql, compiled.args(params))
                rows = cursor.fetchall()
                columns = _result_processors(self.storage.engine.dialect, cursor.description) if rows else []
            finally:
                cursor.close()
        taken = [(from_record(_decoded(columns, row)), TaskStatus(row[-1])) for row in rows]
        taken.sort(key=lambda pair: (pair[0].run_at or pair[0].created_at, pair[0].created_at))
        return taken

    def delete(self, task_id: str) -> bool:
        with self.storage.begin() as conn:
            conn.execute(delete(task_logs).where(task_logs.c.task_id == task_id))
            return conn.execute(delete(tasks).where(tasks.c.task_id == task_id)).rowcount == 1

    def list(self, flt: TaskFilter) -> TaskPage:
        stmt = select(tasks)
        if flt.status:
            stmt = stmt.where(tasks.c.status.in_(status_values(flt.status)))
        if flt.task_type:
            stmt = stmt.where(tasks.c.task_type.in_(list(flt.task_type)))
        if flt.worker_id:
            stmt = stmt.where(tasks.c.worker_id == flt.worker_id)
        for name in ("root_id", "parent_id", "group_id"):
            value = getattr(flt, name)
            if value is not None:
                stmt = stmt.where(tasks.c[name] == value)
        if flt.created_after:
            stmt = stmt.where(tasks.c.created_at >= flt.created_after)
        if flt.created_before:
            stmt = stmt.where(tasks.c.created_at < flt.created_before)
        if flt.cursor:
            created, last_id = decode_cursor(flt.cursor)
            stmt = stmt.where(
                or_(
                    tasks.c.created_at < created,
                    and_(tasks.c.created_at == created, tasks.c.task_id < last_id),
                )
            )
        elif flt.offset:
            stmt = stmt.offset(flt.offset)
        stmt = stmt.order_by(tasks.c.created_at.desc(), tasks.c.task_id.desc()).limit(flt.limit + 1)
        # From the pool, not on a connection per thread (``single``): the API's 40 request threads
        # would hold 40 connections per process (under 50 clients: PostgreSQL's "too many clients").
        with self.storage.begin() as conn:
            rows = [_from_row(r) for r in conn.execute(stmt).all()]
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
        stmt = select(tasks).where(tasks.c.status.in_(status_values(statuses)))
        if due_before is not None:
            stmt = stmt.where(tasks.c.run_at <= due_before)
        if lease_expired_before is not None:
            stmt = stmt.where(tasks.c.lease_until < lease_expired_before)
        if updated_before is not None:
            stmt = stmt.where(tasks.c.updated_at < updated_before)
        # Due records the earliest due first (the (status, run_at) index), the others oldest first.
        order = (tasks.c.run_at, tasks.c.created_at) if due_before is not None else (tasks.c.created_at,)
        stmt = stmt.order_by(*order).limit(limit)
        with self.storage.begin() as conn:
            return [_from_row(r) for r in conn.execute(stmt)]

    def purge(self, status: TaskStatus, finished_before: datetime, limit: int = 1000) -> int:
        if TaskStatus(status) not in TERMINAL:
            raise ValueError(f"purge only removes terminal tasks, not {status}")
        cond = [tasks.c.status == TaskStatus(status).value, tasks.c.finished_at < finished_before]
        with self.storage.begin() as conn:
            ids = list(conn.execute(select(tasks.c.task_id).where(*cond).limit(limit)).scalars())
            if not ids:
                return 0
            # The status is checked again: a task re-opened in between is kept, with its logs.
            deleted = int(conn.execute(delete(tasks).where(tasks.c.task_id.in_(ids), *cond)).rowcount)
            kept = select(tasks.c.task_id).where(tasks.c.task_id.in_(ids))
            conn.execute(delete(task_logs).where(task_logs.c.task_id.in_(ids), task_logs.c.task_id.not_in(kept)))
        return deleted

    def count_by_status(self) -> dict[str, int]:
        with self.storage.begin() as conn:
            rows = conn.execute(select(tasks.c.status, func.count()).group_by(tasks.c.status))
            return {status: int(n) for status, n in rows}


class SqlFenceRepository(FenceRepository):
    def __init__(self, storage: SqlStorage) -> None:
        self.storage = storage

    def advance(self, fence: Fence) -> int:
        now = utcnow()
        if not self.current(fence.name):
            try:
                with self.storage.begin() as conn:
                    conn.execute(insert(fences).values(name=fence.name, fence=fence.token, updated_at=now))
            except IntegrityError:
                pass  # another leader inserted it first: compared below
        with self.storage.begin() as conn:
            conn.execute(
                update(fences)
                .where(fences.c.name == fence.name, fences.c.fence < fence.token)
                .values(fence=fence.token, updated_at=now)
            )
            return int(conn.execute(select(fences.c.fence).where(fences.c.name == fence.name)).scalar() or 0)

    def current(self, name: str) -> int:
        with self.storage.begin() as conn:
            return int(conn.execute(select(fences.c.fence).where(fences.c.name == name)).scalar() or 0)


class SqlTaskLogRepository(TaskLogRepository, LogMaintenance):
    def __init__(self, storage: SqlStorage) -> None:
        self.storage = storage

    def append(self, logs: Sequence[TaskLog]) -> None:
        if not logs:
            return
        rows = [
            {
                "task_id": l.task_id,
                "attempt": l.attempt,
                "run": l.run,
                "time": l.time,
                "level": l.level,
                "message": l.message,
            }
            for l in logs
        ]
        with self.storage.begin() as conn:
            conn.execute(insert(task_logs), rows)

    def list(
        self, task_id: str, *, attempt: int | None = None, run: int | None = None, limit: int = 1000, offset: int = 0
    ) -> list[TaskLog]:
        stmt = select(task_logs).where(task_logs.c.task_id == task_id)
        if attempt is not None:
            stmt = stmt.where(task_logs.c.attempt == attempt)
        if run is not None:
            stmt = stmt.where(task_logs.c.run == run)
        stmt = stmt.order_by(task_logs.c.id).limit(limit).offset(offset)
        with self.storage.begin() as conn:
            return [TaskLog(r.task_id, r.attempt, r.time, r.level, r.message, run=r.run) for r in conn.execute(stmt)]

    def purge(self, before: datetime, limit: int = 1000) -> int:
        with self.storage.begin() as conn:
            ids = list(conn.execute(select(task_logs.c.id).where(task_logs.c.time < before).limit(limit)).scalars())
            if not ids:
                return 0
            return int(conn.execute(delete(task_logs).where(task_logs.c.id.in_(ids))).rowcount)
