"""What the ``database`` executor makes of driver errors and values: retried or not, and JSON.

Reason codes: ``statement_timeout`` and ``database_unavailable`` (retried: connection failures,
deadlocks, lock waits, too many connections); ``constraint_violation``, ``invalid_data`` and
``sql_error`` (permanent: retrying the same statement cannot help).
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import math
import uuid
from typing import Any

from celery_ext.errors import ExecutorError, PermanentError, TransientError

# PostgreSQL SQLSTATE classes/codes worth a retry: connection exceptions, transaction rollback
# (serialization failure, deadlock), insufficient resources, operator intervention (shutdown).
_PG_TRANSIENT = ("08", "40", "53", "57P")
_PG_TIMEOUT = "57014"
# MySQL/MariaDB: too many connections, server gone/lost, lock wait timeout, deadlock, killed.
_MYSQL_TRANSIENT = {1040, 1053, 1205, 1213, 1927, 2002, 2003, 2006, 2013, 2055}
_MYSQL_TIMEOUT = {1969, 3024}  # MariaDB max_statement_time, MySQL max_execution_time
_SQLITE_BUSY = {5, 6}  # SQLITE_BUSY, SQLITE_LOCKED
_SQLITE_INTERRUPT = 9


def _short(orig: BaseException | None, exc: BaseException) -> str:
    # The driver's own message: SQLAlchemy's wrapper would add the SQL and its bound values.
    text = str(orig if orig is not None else exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:500]


def _codes(orig: Any) -> tuple[str | None, int | None]:
    """(SQLSTATE for PostgreSQL, numeric code for MySQL/SQLite)."""
    sqlstate = getattr(orig, "sqlstate", None)
    number = getattr(orig, "sqlite_errorcode", None)
    args = getattr(orig, "args", ())
    if number is None and args and isinstance(args[0], int):
        number = args[0]
    return sqlstate, number


def classify(exc: Exception, timeout: float) -> ExecutorError:
    """Map a SQLAlchemy error to a retried or a permanent executor error."""
    from sqlalchemy import exc as sa

    orig = getattr(exc, "orig", None)
    message = _short(orig, exc)
    sqlstate, number = _codes(orig)
    is_sqlite = type(orig).__module__.startswith("sqlite3")
    if (
        sqlstate == _PG_TIMEOUT
        or (not is_sqlite and number in _MYSQL_TIMEOUT)
        or (is_sqlite and (number == _SQLITE_INTERRUPT or message == "interrupted"))
    ):
        return TransientError("statement_timeout", f"statement exceeded statement_timeout of {timeout:g}s: {message}")
    if isinstance(exc, sa.IntegrityError):
        return PermanentError("constraint_violation", message)
    if not isinstance(exc, sa.DBAPIError) or exc.connection_invalidated or isinstance(exc, sa.InterfaceError):
        return TransientError("database_unavailable", message)
    transient = (
        (sqlstate is not None and sqlstate.startswith(_PG_TRANSIENT))
        or (is_sqlite and number in _SQLITE_BUSY)
        or (not is_sqlite and sqlstate is None and number in _MYSQL_TRANSIENT)
        # An OperationalError without any code is a failed connect (refused, DNS, auth timeout).
        or (isinstance(exc, sa.OperationalError) and sqlstate is None and number is None)
    )
    if transient:
        return TransientError("database_unavailable", message)
    if isinstance(exc, sa.DataError):
        return PermanentError("invalid_data", message)
    return PermanentError("sql_error", message)


def jsonable(value: Any) -> Any:
    """A column value as JSON: exact decimals and binary as strings, times in ISO 8601."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return str(value)
