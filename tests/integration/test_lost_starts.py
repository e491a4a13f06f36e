"""A task's start is committed without waiting for the disk on PostgreSQL (``storage/sql.py``):
a submit's record, a worker's claim, a plain message's receipt.  A crash of the database a moment
later can undo such a write while its message, or its run, goes on.  Each test puts a record in
the state such a crash leaves (a real worker, a real PostgreSQL) and checks that nothing is lost:
the message makes the record again, the run's outcome repairs its claim or its receipt.  And that
a message that cannot be such a case is still dropped."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from celery_ext.dispatch import Dispatch
from celery_ext.model import Task, TaskStatus, utcnow
from tests.conftest import TEST_TASKS
from tests.support.services import unique


def sql(cluster: Any, statement: str, *params: Any) -> None:
    with psycopg.connect(
        cluster.runtime.storage.url.render_as_string(hide_password=False).replace("+psycopg", "")
    ) as c:
        c.execute(statement, params)


def record(cluster: Any, task_id: str, status: TaskStatus, timeout: float = 30) -> Task:
    deadline = time.monotonic() + timeout
    while True:
        task = cluster.runtime.storage.tasks.get(task_id)
        if task is not None and task.status is status:
            return task
        assert time.monotonic() < deadline, f"task {task_id} is {task.status if task else 'missing'}, not {status}"
        time.sleep(0.05)


@pytest.fixture
def cluster(make_cluster: Any) -> Any:
    return make_cluster("postgresql", executors=TEST_TASKS)


def test_a_submit_whose_record_was_lost_runs_from_its_message(cluster: Any) -> None:
    m = cluster.manager
    task = m.submit("echo", {"n": 7})
    m.lifecycle.marks.flush()
    sql(cluster, "DELETE FROM tasks WHERE task_id = %s", task.task_id)  # what the crash undid
    cluster.worker()
    done = record(cluster, task.task_id, TaskStatus.SUCCEEDED)
    assert (done.task_type, done.payload, done.result, done.attempt, done.run) == ("echo", {"n": 7}, {"n": 7}, 1, 1)
    assert done.dispatch_token == task.dispatch_token and done.queued_at is not None and done.worker_id


def test_a_later_message_without_a_record_is_still_dropped(cluster: Any) -> None:
    """Only a task's first message can be a submit whose record was lost: a retry's (attempt 2)
    record was written durably before it was sent, so a missing one was not lost that way."""
    m = cluster.manager
    lost = Task(task_id=unique("t"), task_type="echo", payload={}, dispatch_token="tok", created_at=utcnow())
    m.dispatcher.publish(Dispatch(lost, "tok", 2, queued_at=utcnow()))
    after = m.submit("echo", {})  # one worker process, one queue: runs after the first message
    cluster.worker(concurrency=1)
    record(cluster, after.task_id, TaskStatus.SUCCEEDED)
    assert cluster.runtime.storage.tasks.get(lost.task_id) is None


def test_the_outcome_of_a_run_repairs_its_lost_claim(cluster: Any) -> None:
    m = cluster.manager
    cluster.worker()
    task = m.submit("span", {"key": unique("span:"), "seconds": 1.5})
    running = record(cluster, task.task_id, TaskStatus.RUNNING)
    # The record as the claim found it: queued, the attempt before, no worker.
    sql(
        cluster,
        "UPDATE tasks SET status = 'queued', attempt = attempt - 1, worker_id = NULL, started_at = NULL "
        "WHERE task_id = %s",
        task.task_id,
    )
    done = m.wait(task.task_id, 30)
    assert done.status is TaskStatus.SUCCEEDED and done.attempt == 1
    assert done.worker_id == running.worker_id and done.started_at == running.started_at


def test_the_lease_keeper_claims_again_a_run_whose_claim_was_lost(make_cluster: Any) -> None:
    """Before the run ends, its worker's lease renewal finds the record startable under the run's
    token and claims it again: the record is RUNNING while the task runs, as it should be, and
    nothing takes it for waiting work meanwhile (test_broker_loss)."""
    cluster = make_cluster("postgresql", executors=TEST_TASKS, worker={"task_lease": 1.5})
    m = cluster.manager
    cluster.worker()
    task = m.submit("span", {"key": unique("span:"), "seconds": 5})
    running = record(cluster, task.task_id, TaskStatus.RUNNING)
    # A renewal first finds it RUNNING: before that, a startable record may be one its pool
    # process has not claimed yet, which the keeper leaves alone.
    deadline = time.monotonic() + 3
    while m.get(task.task_id).lease_until == running.lease_until:
        assert time.monotonic() < deadline, "the lease was never renewed"
        time.sleep(0.05)
    sql(
        cluster,
        "UPDATE tasks SET status = 'queued', attempt = attempt - 1, worker_id = NULL, started_at = NULL, "
        "lease_until = NULL WHERE task_id = %s",
        task.task_id,
    )
    again = record(cluster, task.task_id, TaskStatus.RUNNING, timeout=3)
    assert (again.attempt, again.run, again.dispatch_token) == (1, 1, running.dispatch_token)
    assert again.worker_id == running.worker_id and again.started_at is not None and again.lease_until is not None
    assert abs((again.started_at - running.started_at).total_seconds()) < 1
    done = m.wait(task.task_id, 30)
    assert done.status is TaskStatus.SUCCEEDED and done.attempt == 1
    assert "claimed again" in cluster.workers[0].log()


def test_the_outcome_of_a_plain_message_recreates_its_lost_receipt(cluster: Any) -> None:
    cluster.worker()
    result = cluster.runtime.celery.send_task("span", kwargs={"key": unique("span:"), "seconds": 1.5})
    record(cluster, result.id, TaskStatus.RUNNING)
    sql(cluster, "DELETE FROM tasks WHERE task_id = %s", result.id)
    done = record(cluster, result.id, TaskStatus.SUCCEEDED)
    assert done.task_type == "span" and done.attempt == 1 and done.worker_id
    assert result.get(timeout=10) is None and result.state == "SUCCESS"


def test_a_cancelled_run_is_not_taken_for_a_lost_claim(cluster: Any) -> None:
    """The repair only applies to a record as its message found it: a task cancelled while it
    ran, then reopened for a manual retry, keeps the new run (``run`` 2) waiting for the old one."""
    m = cluster.manager
    cluster.worker(concurrency=2)
    task = m.submit("span", {"key": unique("span:"), "seconds": 1.0})
    record(cluster, task.task_id, TaskStatus.RUNNING)
    m.cancel(task.task_id)
    assert m.retry(task.task_id).run == 2
    done = m.wait(task.task_id, 30)
    assert done.status is TaskStatus.SUCCEEDED and done.run == 2 and done.attempt == 1


@pytest.mark.parametrize("setting", ["outcomes", "always"])
def test_only_starts_skip_the_flush_wait_and_only_for_their_statement(
    make_cluster: Any, database_urls: dict[str, str], setting: str
) -> None:
    """``synchronous_commit: outcomes`` (the default) runs a start's statement with
    ``set_config('synchronous_commit', 'off', true)`` joined in: that statement's transaction only,
    the session keeps ``on``; an outcome's statement never has it; ``always`` never has it."""
    from celery_ext.storage.sql import SqlStorage

    storage = SqlStorage.from_config(
        "postgresql", {"url": database_urls["postgresql"], "synchronous_commit": setting}, Path("/nonexistent")
    )
    storage.migrate()
    tasks = storage.tasks
    task = Task(task_id=unique("t"), task_type="echo", payload={"a": [1]}, dispatch_token="k", created_at=utcnow())
    assert tasks.create(task, durable=False) == (task, True)
    assert tasks.create(task, durable=False)[1] is False  # a taken id is still refused
    assert tasks.update(task.task_id, (TaskStatus.PENDING,), token="k", durable=False, status=TaskStatus.RUNNING)
    assert tasks.update(task.task_id, (TaskStatus.RUNNING,), token="k", status=TaskStatus.SUCCEEDED, result=3)
    done = tasks.get(task.task_id)
    assert done is not None and (done.status, done.result, done.payload) == (TaskStatus.SUCCEEDED, 3, {"a": [1]})
    statements = {key: c.sql for key, c in tasks._compiled.items()}
    skipping = [key for key, text in statements.items() if "set_config" in text]
    if setting == "always":
        assert skipping == []
    else:  # the insert and the claim-shaped UPDATE, not the outcome's
        assert len(skipping) == 2 and ("insert", True) in skipping, statements
    with storage.single_dbapi() as conn:
        cursor = conn.cursor()
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == "on"
    storage.close()


# --- a single submit publishes while its record's insert is on the way (``create_sent``) -----


def backends_waiting_on_a_lock(cluster: Any, query_prefix: str) -> int:
    with psycopg.connect(
        cluster.runtime.storage.url.render_as_string(hide_password=False).replace("+psycopg", "")
    ) as c:
        row = c.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
            (query_prefix + "%",),
        ).fetchone()
    return int(row[0]) if row else 0


def test_a_message_ahead_of_its_record_waits_for_it_and_runs_once(cluster: Any) -> None:
    """The message of a single submit can reach a worker before the submit's insert commits: the
    worker's claim finds no record, its own insert of the record waits for the submit's (same
    id), finds it taken, and claims it.  The run is the submit's: its token, attempt 1, once."""
    from sqlalchemy import insert

    from celery_ext.storage.base import to_record
    from celery_ext.storage.sql_schema import tasks

    m = cluster.manager
    w = cluster.worker(concurrency=1)
    task, _ = m._build("echo", {"ahead": True}, 0, None, None, 0, None, None)
    with cluster.runtime.storage.begin() as conn:  # the submit's insert, not committed yet
        conn.execute(insert(tasks).values(**to_record(task)))
        m.dispatcher.publish(Dispatch(task, task.dispatch_token or "", 1, queued_at=task.queued_at))
        deadline = time.monotonic() + 30
        while backends_waiting_on_a_lock(cluster, "INSERT INTO tasks") == 0:
            assert time.monotonic() < deadline, "the worker never tried to make the record"
            time.sleep(0.05)
    done = m.wait(task.task_id, 30)
    assert (done.status, done.result, done.attempt, done.run) == (TaskStatus.SUCCEEDED, {"ahead": True}, 1, 1)
    assert done.dispatch_token == task.dispatch_token and done.queued_at == task.queued_at
    assert "made again" not in w.log()  # the submit's record was the one kept


@pytest.mark.parametrize("how", ["submit", "submit_many"])
def test_a_submit_whose_kept_connection_was_killed_writes_its_record(cluster: Any, how: str) -> None:
    """The server closed this thread's connection (a restart, an administrator): the insert is
    written on a fresh one, whether the dead one failed while sending or only when read."""
    m = cluster.manager
    m.submit("echo", {"first": True})  # opens this thread's kept connection
    pid = cluster.runtime.storage._held.conn.connection.dbapi_connection.info.backend_pid
    sql(cluster, "SELECT pg_terminate_backend(%s)", pid)
    if how == "submit":
        submitted = [m.submit("echo", {"second": True})]
    else:
        submitted = m.submit_many([{"task_type": "echo", "payload": {"second": i}} for i in range(3)])
    for task in submitted:  # written by the submit itself, before any worker runs
        stored = m.get(task.task_id)
        assert stored.status is TaskStatus.QUEUED and stored.payload == task.payload
    assert cluster.runtime.storage._held.conn.connection.dbapi_connection.info.backend_pid != pid
    cluster.worker()
    assert all(m.wait(t.task_id, 30).status is TaskStatus.SUCCEEDED for t in submitted)


@pytest.mark.parametrize("how", ["submit", "submit_many"])
def test_a_submit_whose_insert_fails_after_its_publish_still_runs(
    cluster: Any, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """The insert's error comes back after the messages are out (here a trigger refuses the
    insert and its retry on a fresh connection): the submit does not raise, since the tasks will
    run; it logs why, and the worker makes the records from the messages."""
    fence = unique("fail_")
    sql(cluster, f"CREATE SEQUENCE {fence}")
    sql(
        cluster,
        f"CREATE FUNCTION {fence}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF NEW.payload ? '{fence}' AND nextval('{fence}') <= 2 THEN "
        "RAISE EXCEPTION 'refused by the test'; END IF; RETURN NEW; END $$",
    )
    sql(cluster, f"CREATE TRIGGER {fence} BEFORE INSERT ON tasks FOR EACH ROW EXECUTE FUNCTION {fence}()")
    try:
        m = cluster.manager
        with caplog.at_level("WARNING", logger="celery_ext.manager"):
            if how == "submit":
                submitted = [m.submit("echo", {fence: 1})]
            else:
                submitted = m.submit_many([{"task_type": "echo", "payload": {fence: i}} for i in range(3)])
        said = "published, but its record" if how == "submit" else "3 tasks (the first"
        assert said in caplog.text and "could not be written" in caplog.text
        assert "refused by the test" in caplog.text
        assert all(cluster.runtime.storage.tasks.get(t.task_id) is None for t in submitted)
        w = cluster.worker()
        for task in submitted:
            done = record(cluster, task.task_id, TaskStatus.SUCCEEDED)
            assert (done.payload, done.result, done.attempt, done.dispatch_token) == (
                task.payload,
                task.payload,
                1,
                task.dispatch_token,
            )
        assert w.log().count("made again from the message") == len(submitted)
    finally:
        sql(cluster, f"DROP TRIGGER {fence} ON tasks")
        sql(cluster, f"DROP FUNCTION {fence}()")
        sql(cluster, f"DROP SEQUENCE {fence}")


def test_concurrent_submits_while_workers_consume_all_run_once(cluster: Any) -> None:
    """Producers in several threads (single submits and batches, each insert overlapping its
    publish) while two workers consume: every task ends succeeded, once, and nothing is left
    queued by a message that overtook its record."""
    import threading

    m = cluster.manager
    w = cluster.worker(concurrency=2)
    cluster.worker(concurrency=2)
    ids: list[str] = []
    lock = threading.Lock()

    def singles(k: int) -> None:
        got = [m.submit("echo", {"k": k, "i": i}).task_id for i in range(150)]
        with lock:
            ids.extend(got)

    def batches() -> None:
        for b in range(15):
            specs = [{"task_type": "echo", "payload": {"b": b, "j": j}} for j in range(10)]
            got = [t.task_id for t in m.submit_many(specs)]
            with lock:
                ids.extend(got)

    threads = [threading.Thread(target=singles, args=(k,)) for k in range(3)] + [threading.Thread(target=batches)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 600
    finished = [m.wait(i, 120) for i in ids]  # the database is the module's: other tests' records too
    assert all(t.status is TaskStatus.SUCCEEDED and t.attempt == 1 for t in finished)
    logs = w.log() + cluster.workers[1].log()
    assert "duplicate or stale message dropped" not in logs
