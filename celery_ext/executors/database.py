"""The ``database`` executor: task types ``execute_sql`` and ``batch_insert``.

PostgreSQL (psycopg 3), MySQL/MariaDB (PyMySQL) and SQLite through SQLAlchemy 2 Core, one pooled
engine per database per worker process (created in ``initialize``, after the pool forks).

Config keys (besides ``timeout`` and ``max_retries``):
  databases          {name: url}; ``postgresql://``, ``mysql://``/``mariadb://`` and ``sqlite:///``
                     URLs get the right driver; passwords via ``${ENV}`` (required)
  statements         {name: {database, sql, max_rows?, statement_timeout?}}: the catalog of named
                     statements, ``:name`` bound parameters
  allow_tables       tables ``batch_insert`` may write: a list (any database) or {database: [tables]}
  allow_raw_sql      accept ``{"database", "sql", "params"}`` payloads (default false)
  statement_timeout  duration, default 30s: PostgreSQL ``SET LOCAL statement_timeout``, MariaDB
                     ``max_statement_time``, MySQL ``max_execution_time``, SQLite progress handler
  max_rows           rows returned at most (default 1000); more are cut and ``truncated`` is true
  max_batch_rows     rows one ``batch_insert`` may carry (default 100000)
  pool_size, max_overflow, connect_timeout   engine pool settings

Payloads: ``execute_sql`` ``{"statement": NAME, "params": {...}}`` (or raw SQL, see above);
``batch_insert`` ``{"database", "table", "rows": [{column: value}, ...]}``: one executemany in one
transaction, columns checked against the reflected table.  See docs/executors/database.md.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from celery_ext.config import Model, PositiveDuration, format_errors
from celery_ext.errors import ConfigError, PermanentError
from celery_ext.executors.base import Executor, ExecutorSettings
from celery_ext.executors.sqlerrors import classify, jsonable
from celery_ext.model import Task, TaskResult

logger = logging.getLogger(__name__)

T = TypeVar("T")
_DRIVERS = {
    "postgresql": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
    "mariadb": "mariadb+pymysql",
    "sqlite": "sqlite",
}
_EXTRAS = {"postgresql": "postgres", "mysql": "mysql", "mariadb": "mysql"}
Scalar = StrictStr | StrictInt | StrictFloat | StrictBool | None


def engine_url(raw: str) -> Any:
    from sqlalchemy.engine import make_url

    url = make_url(raw)
    backend = url.get_backend_name()
    if backend not in _DRIVERS:
        raise ValueError(f"unsupported database {backend!r} (use postgresql, mysql, mariadb or sqlite)")
    return url if "+" in url.drivername else url.set(drivername=_DRIVERS[backend])


class StatementSpec(Model):
    database: str
    sql: str = Field(min_length=1)
    max_rows: int | None = Field(None, ge=0)
    statement_timeout: PositiveDuration | None = None


class DatabaseSettings(ExecutorSettings):
    databases: dict[str, str] = Field(min_length=1)
    statements: dict[str, StatementSpec] = Field(default_factory=dict)
    allow_tables: list[str] | dict[str, list[str]] = Field(default_factory=list)
    allow_raw_sql: bool = False
    statement_timeout: PositiveDuration = 30.0
    max_rows: int = Field(1000, ge=0)
    max_batch_rows: int = Field(100_000, ge=1)
    pool_size: int = Field(5, ge=1)
    max_overflow: int = Field(5, ge=0)
    connect_timeout: PositiveDuration = 10.0

    @field_validator("databases")
    @classmethod
    def _urls(cls, databases: dict[str, str]) -> dict[str, str]:
        for name, raw in databases.items():
            try:
                engine_url(raw)
            except Exception as exc:  # noqa: BLE001 - any parse failure is a config error
                raise ValueError(f"{name}: {exc}") from None
        return databases

    @field_validator("statements")
    @classmethod
    def _known_databases(cls, statements: dict[str, StatementSpec], info: Any) -> dict[str, StatementSpec]:
        known = info.data.get("databases") or {}
        for name, spec in statements.items():
            if spec.database not in known:
                raise ValueError(f"{name}.database: unknown database {spec.database!r} (known: {', '.join(known)})")
        return statements


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StatementPayload(_Payload):
    statement: StrictStr
    params: dict[str, Scalar] = Field(default_factory=dict)


class RawSqlPayload(_Payload):
    database: StrictStr
    sql: StrictStr = Field(min_length=1)
    params: dict[str, Scalar] = Field(default_factory=dict)


class BatchPayload(_Payload):
    database: StrictStr
    table: StrictStr
    rows: list[dict[str, Scalar]] = Field(min_length=1)


P = TypeVar("P", bound=BaseModel)


def parse_payload(model: type[P], payload: dict[str, Any]) -> P:
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise PermanentError("invalid_payload", "; ".join(format_errors(exc, "payload"))) from None


class DatabaseExecutor(Executor):
    type = "database"
    settings_model = DatabaseSettings

    def __init__(self, settings: ExecutorSettings | None = None) -> None:
        if settings is None:
            raise ConfigError("executors[database].config.databases: required")
        super().__init__(settings)
        assert isinstance(self.settings, DatabaseSettings)
        self.config: DatabaseSettings = self.settings
        self._engines: dict[str, Any] = {}
        self._tables: dict[tuple[str, str], Any] = {}
        # Bound parameter names of each catalog statement (text() parses; no I/O).
        self._params = {name: _param_names(spec.sql) for name, spec in self.config.statements.items()}

    @property
    def supported_task_types(self) -> list[str]:
        return ["execute_sql", "batch_insert"]

    # --- lifecycle ------------------------------------------------------------------------

    def initialize(self, config: ExecutorSettings) -> None:
        from sqlalchemy import create_engine

        engines = {}
        for name, raw in self.config.databases.items():
            url = engine_url(raw)
            backend = url.get_backend_name()
            kwargs: dict[str, Any] = {"pool_pre_ping": True}
            if backend != "sqlite":
                kwargs.update(
                    pool_size=self.config.pool_size,
                    max_overflow=self.config.max_overflow,
                    pool_recycle=1800,
                    connect_args={"connect_timeout": int(self.config.connect_timeout)},
                )
            try:
                engines[name] = create_engine(url, **kwargs)
            except ModuleNotFoundError as exc:
                extra = _EXTRAS[backend]
                raise ConfigError(f"database {name!r} needs {exc.name}: pip install celery-ext[{extra}]") from exc
        self._engines = engines

    def close(self) -> None:
        engines, self._engines = self._engines, {}
        self._tables.clear()
        for engine in engines.values():
            engine.dispose()

    # --- execution ------------------------------------------------------------------------

    def execute(self, task: Task) -> TaskResult:
        if task.task_type == "batch_insert":
            return TaskResult.ok(self._batch_insert(parse_payload(BatchPayload, task.payload), task.timeout))
        if "sql" in task.payload:
            if not self.config.allow_raw_sql:
                raise PermanentError(
                    "raw_sql_not_allowed",
                    'raw SQL payloads are refused (allow_raw_sql is false); send {"statement": NAME, "params": {...}}',
                )
            raw = parse_payload(RawSqlPayload, task.payload)
            spec = StatementSpec(database=raw.database, sql=raw.sql, max_rows=None, statement_timeout=None)
            return TaskResult.ok(self._run_sql(spec, _param_names(raw.sql), raw.params, "raw SQL", task.timeout))
        p = parse_payload(StatementPayload, task.payload)
        spec_or_none = self.config.statements.get(p.statement)
        if spec_or_none is None:
            raise PermanentError(
                "unknown_statement", f"payload.statement: no statement named {p.statement!r} in the catalog"
            )
        return TaskResult.ok(
            self._run_sql(spec_or_none, self._params[p.statement], p.params, f"statement {p.statement!r}", task.timeout)
        )

    def _run_sql(
        self, spec: StatementSpec, names: set[str], params: dict[str, Any], what: str, task_timeout: float | None
    ) -> dict[str, Any]:
        from sqlalchemy import text

        problems = [f"payload.params.{n}: required by {what}" for n in sorted(names - params.keys())]
        problems += [f"payload.params.{n}: not a parameter of {what}" for n in sorted(params.keys() - names)]
        if problems:
            raise PermanentError("invalid_payload", "; ".join(problems))
        cap = self.config.max_rows if spec.max_rows is None else spec.max_rows
        timeout = self._timeout(spec.statement_timeout, task_timeout)

        stmt = text(spec.sql)
        if spec.sql.lstrip()[:6].upper() == "SELECT":
            # A server-side cursor, so a huge result is cut at max_rows, not loaded whole.
            stmt = stmt.execution_options(stream_results=True, max_row_buffer=min(cap + 1, 1000))

        def run(conn: Any) -> dict[str, Any]:
            result = conn.execute(stmt, params)
            if not result.returns_rows:
                return {"rows_affected": max(result.rowcount, 0)}
            columns = list(result.keys())
            fetched = result.fetchmany(cap + 1)
            result.close()
            rows = [{c: jsonable(v) for c, v in zip(columns, row, strict=True)} for row in fetched[:cap]]
            return {"rows_affected": len(rows), "columns": columns, "rows": rows, "truncated": len(fetched) > cap}

        data = self._transaction(spec.database, timeout, run)
        logger.info("%s on %s: %d rows", what, spec.database, data["rows_affected"])
        return data

    def _batch_insert(self, p: BatchPayload, task_timeout: float | None) -> dict[str, Any]:
        from sqlalchemy import insert

        if p.database not in self.config.databases:
            raise PermanentError("unknown_database", f"payload.database: no database named {p.database!r}")
        if p.table not in self._allowed_tables(p.database):
            raise PermanentError("table_not_allowed", f"payload.table: {p.table!r} is not in allow_tables")
        if len(p.rows) > self.config.max_batch_rows:
            raise PermanentError(
                "invalid_payload", f"payload.rows: {len(p.rows)} rows; max_batch_rows is {self.config.max_batch_rows}"
            )
        columns = set(p.rows[0])
        for i, row in enumerate(p.rows):
            if set(row) != columns:
                raise PermanentError("invalid_payload", f"payload.rows[{i}]: columns differ from rows[0]")

        def run(conn: Any) -> dict[str, Any]:
            table = self._reflect(conn, p.database, p.table)
            unknown = sorted(columns - set(table.c.keys()))
            if unknown:
                raise PermanentError(
                    "unknown_column", f"payload.rows: table {p.table!r} has no column {', '.join(map(repr, unknown))}"
                )
            result = conn.execute(insert(table), p.rows)
            return {"rows_affected": result.rowcount if result.rowcount >= 0 else len(p.rows)}

        data = self._transaction(p.database, self._timeout(None, task_timeout), run)
        logger.info("inserted %d rows into %s.%s", data["rows_affected"], p.database, p.table)
        return data

    # --- helpers --------------------------------------------------------------------------

    def _allowed_tables(self, database: str) -> list[str]:
        allow = self.config.allow_tables
        return allow.get(database, []) if isinstance(allow, dict) else allow

    def _reflect(self, conn: Any, database: str, table: str) -> Any:
        from sqlalchemy import MetaData, Table
        from sqlalchemy.exc import NoSuchTableError

        key = (database, table)
        if key not in self._tables:
            try:
                self._tables[key] = Table(table, MetaData(), autoload_with=conn)
            except NoSuchTableError:
                raise PermanentError("unknown_table", f"payload.table: no table {table!r} in {database!r}") from None
        return self._tables[key]

    def _timeout(self, statement: float | None, task: float | None) -> float:
        timeout = statement or self.config.statement_timeout
        return min(timeout, task) if task else timeout

    def _transaction(self, database: str, timeout: float, fn: Callable[[Any], T]) -> T:
        from sqlalchemy.exc import SQLAlchemyError

        engine = self._engines.get(database)
        if engine is None:
            if not self._engines:
                raise PermanentError("executor_unavailable", "the database executor is not initialized")
            raise PermanentError("unknown_database", f"payload.database: no database named {database!r}")
        try:
            with engine.begin() as conn, _statement_timeout(conn, timeout):
                return fn(conn)
        except SQLAlchemyError as exc:
            raise classify(exc, timeout) from exc


def _param_names(sql: str) -> set[str]:
    from sqlalchemy import text

    return set(text(sql).compile().params)


@contextlib.contextmanager
def _statement_timeout(conn: Any, seconds: float) -> Iterator[None]:
    """Bound every statement of this transaction; the server (or SQLite itself) interrupts it."""
    name = conn.dialect.name
    # Values are numbers computed from config, never payload text.
    if name == "postgresql":
        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {max(1, int(seconds * 1000))}")
    elif name in ("mysql", "mariadb"):
        if conn.dialect.is_mariadb:
            conn.exec_driver_sql(f"SET SESSION max_statement_time = {seconds:.3f}")
        else:
            conn.exec_driver_sql(f"SET SESSION max_execution_time = {max(1, int(seconds * 1000))}")
    elif name == "sqlite":
        dbapi = conn.connection.dbapi_connection
        deadline = time.monotonic() + seconds
        dbapi.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
        try:
            yield
        finally:
            dbapi.set_progress_handler(None, 0)
        return
    yield
