"""The database executor on real PostgreSQL, MariaDB and SQLite, directly and through real workers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from celery_ext.errors import ConfigError, ExecutorError, PermanentError, TransientError
from celery_ext.executors.database import DatabaseExecutor, engine_url
from celery_ext.model import Task, TaskStatus
from tests.support.services import create_database, drop_database

pytestmark = pytest.mark.timeout(180)

SLEEP = {
    "postgresql": "SELECT pg_sleep(:seconds)",
    "mysql": "SELECT SLEEP(:seconds)",
    # No sleep function in SQLite: a long recursive count keeps the VM busy instead.
    "sqlite": "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :seconds * 100000000) "
    "SELECT count(*) FROM n",
}
CANARY = [(1, "alpha"), (2, "beta"), (3, "gamma")]


def schema(url: str) -> None:
    engine = create_engine(engine_url(url))
    with engine.begin() as conn:
        conn.execute(
            text("CREATE TABLE people (id INTEGER PRIMARY KEY, name VARCHAR(100) NOT NULL, email VARCHAR(200) UNIQUE)")
        )
        conn.execute(text("CREATE TABLE items (id INTEGER PRIMARY KEY, label VARCHAR(50), qty INTEGER)"))
        conn.execute(text("CREATE TABLE canary (id INTEGER PRIMARY KEY, note VARCHAR(50))"))
        conn.execute(
            text("INSERT INTO canary (id, note) VALUES (:id, :note)"), [{"id": i, "note": n} for i, n in CANARY]
        )
    engine.dispose()


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    engine = create_engine(engine_url(url))
    with engine.connect() as conn:
        rows = [tuple(r) for r in conn.execute(text(sql))]
    engine.dispose()
    return rows


@pytest.fixture(params=["postgresql", "mysql", "sqlite"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(kind, url) of a fresh database holding the people, items and canary tables."""
    kind = str(request.param)
    url = f"sqlite:///{tmp_path / 'exec.db'}" if kind == "sqlite" else create_database(kind)
    schema(url)
    yield kind, url
    if kind != "sqlite":
        drop_database(kind, url)


def settings(kind: str, url: str, **extra: Any) -> dict[str, Any]:
    return {
        "databases": {"main": url},
        "statements": {
            "add_person": {
                "database": "main",
                "sql": "INSERT INTO people (id, name, email) VALUES (:id, :name, :email)",
            },
            "people": {"database": "main", "sql": "SELECT id, name, email FROM people ORDER BY id"},
            "person": {"database": "main", "sql": "SELECT id, name FROM people WHERE name = :name"},
            "first_two": {"database": "main", "sql": "SELECT id FROM people ORDER BY id", "max_rows": 2},
            "sleep": {"database": "main", "sql": SLEEP[kind], "statement_timeout": "500ms"},
        },
        "allow_tables": ["items", "people"],
        **extra,
    }


@pytest.fixture
def executor(db: tuple[str, str]) -> Iterator[DatabaseExecutor]:
    kind, url = db
    ex = DatabaseExecutor(DatabaseExecutor.parse_settings(settings(kind, url)))
    ex.initialize(ex.settings)
    yield ex
    ex.close()


def run(ex: DatabaseExecutor, payload: dict[str, Any], task_type: str = "execute_sql") -> Any:
    result = ex.execute(Task("t", task_type, payload))
    assert result.success
    return result.data


def refused(ex: DatabaseExecutor, payload: dict[str, Any], task_type: str = "execute_sql") -> ExecutorError:
    with pytest.raises(ExecutorError) as err:
        ex.execute(Task("t", task_type, payload))
    return err.value


def test_named_insert_and_select_with_row_cap(executor: DatabaseExecutor) -> None:
    for i, name in enumerate(["ann", "bob", "cy"], 1):
        assert run(executor, {"statement": "add_person", "params": {"id": i, "name": name, "email": None}}) == {
            "rows_affected": 1
        }
    data = run(executor, {"statement": "people"})
    assert data["columns"] == ["id", "name", "email"]
    assert [r["name"] for r in data["rows"]] == ["ann", "bob", "cy"] and data["truncated"] is False
    capped = run(executor, {"statement": "first_two"})
    assert capped["rows"] == [{"id": 1}, {"id": 2}] and capped["truncated"] is True


def test_batch_insert_of_10000_rows_in_one_transaction(executor: DatabaseExecutor, db: tuple[str, str]) -> None:
    rows = [{"id": i, "label": f"item {i}", "qty": i % 7} for i in range(10_000)]
    assert run(executor, {"database": "main", "table": "items", "rows": rows}, "batch_insert") == {
        "rows_affected": 10_000
    }
    assert query(db[1], "SELECT count(*), sum(qty) FROM items")[0] == (10_000, sum(i % 7 for i in range(10_000)))
    # A batch with one bad row writes nothing: it is one transaction.
    bad = [{"id": 20_000 + i, "label": "x", "qty": 1} for i in range(50)] + [{"id": 5, "label": "dup", "qty": 1}]
    err = refused(executor, {"database": "main", "table": "items", "rows": bad}, "batch_insert")
    assert isinstance(err, PermanentError) and err.reason == "constraint_violation"
    assert query(db[1], "SELECT count(*) FROM items")[0][0] == 10_000


def test_constraint_violation_is_permanent(executor: DatabaseExecutor) -> None:
    run(executor, {"statement": "add_person", "params": {"id": 1, "name": "ann", "email": "a@x"}})
    err = refused(executor, {"statement": "add_person", "params": {"id": 2, "name": "bob", "email": "a@x"}})
    assert isinstance(err, PermanentError) and err.reason == "constraint_violation"
    err = refused(executor, {"statement": "add_person", "params": {"id": 3, "name": None, "email": "c@x"}})
    assert isinstance(err, PermanentError) and err.reason == "constraint_violation"


def test_injection_attempts_leave_the_canary_unchanged(executor: DatabaseExecutor, db: tuple[str, str]) -> None:
    evil = "x'); DROP TABLE canary; DELETE FROM canary; --"
    run(executor, {"statement": "add_person", "params": {"id": 1, "name": evil, "email": None}})
    assert run(executor, {"statement": "person", "params": {"name": evil}})["rows"] == [{"id": 1, "name": evil}]
    assert run(executor, {"statement": "person", "params": {"name": "' OR '1'='1"}})["rows"] == []

    attempts = [
        ({"statement": "people; DROP TABLE canary"}, "execute_sql", "unknown_statement"),
        (
            {"statement": "add_person", "params": {"id": 2, "name": "a", "email": None, "x); DROP TABLE canary;--": 1}},
            "execute_sql",
            "invalid_payload",
        ),
        ({"sql": "DROP TABLE canary"}, "execute_sql", "raw_sql_not_allowed"),
        ({"database": "main", "sql": "DELETE FROM canary"}, "execute_sql", "raw_sql_not_allowed"),
        (
            {"database": "main", "table": "canary", "rows": [{"id": 9, "note": "x"}]},
            "batch_insert",
            "table_not_allowed",
        ),
        (
            {"database": "main", "table": "items; DROP TABLE canary", "rows": [{"id": 9}]},
            "batch_insert",
            "table_not_allowed",
        ),
        (
            {"database": "main", "table": "items", "rows": [{"id": 9, "qty) VALUES (1); DROP TABLE canary; --": 1}]},
            "batch_insert",
            "unknown_column",
        ),
    ]
    for payload, task_type, reason in attempts:
        err = refused(executor, payload, task_type)
        assert isinstance(err, PermanentError) and err.reason == reason, (payload, err.reason, str(err))
    assert query(db[1], "SELECT id, note FROM canary ORDER BY id") == CANARY
    assert query(db[1], "SELECT count(*) FROM items")[0][0] == 0


def test_statement_timeout_interrupts_the_statement(executor: DatabaseExecutor) -> None:
    err = refused(executor, {"statement": "sleep", "params": {"seconds": 30}})
    assert isinstance(err, TransientError) and err.reason == "statement_timeout"
    assert "0.5s" in str(err)
    # The pooled connection is still good afterwards.
    assert run(executor, {"statement": "people"})["rows"] == []


def test_payload_errors_name_the_field(executor: DatabaseExecutor) -> None:
    err = refused(executor, {"statement": "add_person", "params": {"id": 1, "name": "a"}})
    assert err.reason == "invalid_payload" and "payload.params.email: required" in str(err)
    err = refused(executor, {"statement": "people", "params": {"x": {"nested": 1}}})
    assert err.reason == "invalid_payload" and "payload.params.x" in str(err)
    err = refused(executor, {"database": "main", "table": "items", "rows": [{"id": 1}, {"label": "b"}]}, "batch_insert")
    assert err.reason == "invalid_payload" and "payload.rows[1]" in str(err)
    err = refused(executor, {"database": "other", "table": "items", "rows": [{"id": 1}]}, "batch_insert")
    assert err.reason == "unknown_database"


@pytest.mark.parametrize("url", ["postgresql://u:s3cret@127.0.0.1:1/none", "mysql://u:s3cret@127.0.0.1:1/none"])
def test_unreachable_database_is_a_retried_failure(url: str) -> None:
    ex = DatabaseExecutor(
        DatabaseExecutor.parse_settings(
            {"databases": {"main": url}, "statements": {"one": {"database": "main", "sql": "SELECT 1"}}}
        )
    )
    ex.initialize(ex.settings)  # engines connect lazily: a server that is down now may be up later
    try:
        err = refused(ex, {"statement": "one"})
        assert isinstance(err, TransientError) and err.reason == "database_unavailable"
        assert "refused" in str(err) and "s3cret" not in str(err)
    finally:
        ex.close()


def test_settings_are_validated_with_paths() -> None:
    with pytest.raises(ConfigError) as err:
        DatabaseExecutor.parse_settings(
            {
                "databases": {"main": "oracle://db/x"},
                "statements": {"q": {"database": "nope", "sql": "SELECT 1"}},
            },
            "executors[1].config",
        )
    text_ = str(err.value)
    assert "executors[1].config.databases: main: unsupported database 'oracle'" in text_
    assert "executors[1].config.statements" in text_


@pytest.mark.parametrize("kind", ["postgresql", "mysql"])
def test_through_a_worker(make_cluster, kind: str) -> None:
    url = create_database(kind)
    c = None
    try:
        schema(url)
        c = make_cluster(
            app={"max_payload_bytes": 2_000_000},
            executors=[{"type": "database", "config": settings(kind, url, max_retries=3)}],
        )
        c.worker()
        m = c.manager
        ok = m.submit("execute_sql", {"statement": "add_person", "params": {"id": 1, "name": "ann", "email": "a@x"}})
        assert m.wait(ok.task_id, 60).result == {"rows_affected": 1}
        rows = [{"id": i, "label": "b", "qty": 1} for i in range(10_000)]
        batch = m.submit("batch_insert", {"database": "main", "table": "items", "rows": rows})
        dup = m.submit("execute_sql", {"statement": "add_person", "params": {"id": 2, "name": "bob", "email": "a@x"}})
        slow = m.submit("execute_sql", {"statement": "sleep", "params": {"seconds": 30}}, max_retries=1)
        sel = m.submit("execute_sql", {"statement": "people"})
        assert m.wait(batch.task_id, 60).result == {"rows_affected": 10_000}
        done = m.wait(dup.task_id, 60)
        assert (done.status, done.error.reason, done.attempt) == (TaskStatus.FAILED, "constraint_violation", 1)
        done = m.wait(slow.task_id, 60)
        assert (done.status, done.error.reason, done.attempt) == (TaskStatus.FAILED, "statement_timeout", 2)
        assert m.wait(sel.task_id, 60).result["rows"] == [{"id": 1, "name": "ann", "email": "a@x"}]
    finally:
        if c is not None:
            c.close()  # stop the worker before its database goes
        drop_database(kind, url)
