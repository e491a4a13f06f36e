"""Reaching the real servers the tests use, and fresh databases on them.

A missing service skips a test on a laptop, but fails it under ``CI=true``.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
MYSQL_ADMIN_URL = "mysql+pymysql://root@127.0.0.1:3306/test"
RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672//"


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require(name: str, host: str, port: int) -> None:
    if port_open(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI must start it)")
    pytest.skip(message)


def unique(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def create_database(kind: str) -> str:
    """A fresh empty database on the real server; returns its SQLAlchemy URL."""
    from sqlalchemy import create_engine, text

    name = unique("ce_")
    if kind == "postgresql":
        require("PostgreSQL", "127.0.0.1", 5432)
        engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return f"postgresql://postgres@127.0.0.1:5432/{name}"
    if kind == "mysql":
        require("MariaDB", "127.0.0.1", 3306)
        engine = create_engine(MYSQL_ADMIN_URL)
        with engine.connect() as conn:
            conn.execute(text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
        engine.dispose()
        return f"mysql://root@127.0.0.1:3306/{name}"
    raise ValueError(kind)


def drop_database(kind: str, url: str) -> None:
    from sqlalchemy import create_engine, text

    name = url.rsplit("/", 1)[1]
    if kind == "postgresql":
        engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    else:
        engine = create_engine(MYSQL_ADMIN_URL)
        with engine.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
    engine.dispose()
