"""celery_ext is still Celery: plain Celery producers, ``celery call``, ``AsyncResult`` and canvas
against a real worker, with nothing mocked (issue 10, docs/celery.md).

Every cluster of this module has a Redis database of its own as its broker: a plain Celery
producer sends to Celery's default queue ``celery``, which every celery_ext worker on that broker
consumes, whatever its ``app.name``.  On the shared database 0, a worker of another test (with
another task store) could take the message.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery, chain, chord, group
from celery.app.task import Context
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import GroupResult

from celery_ext.errors import TaskFailed
from celery_ext.message import ExtHeader
from celery_ext.model import Task, TaskStatus
from celery_ext.routing.stranded import move_stranded, queue_keys
from tests.conftest import CALL_FAILED, TEST_TASKS, Cluster, busy_worker, cluster_data, storage_section
from tests.support.celery_events import EventLog
from tests.support.httpserver import HttpTestServer
from tests.support.scrape import poll
from tests.support.services import REDIS_HOST, REDIS_PORT, require, unique
from tests.support.workers import subprocess_env

pytestmark = pytest.mark.timeout(180)

PRODUCER = Path(__file__).resolve().parents[1] / "support" / "plain_producer.py"
# The key tests/celery_suite/run_canvas.py claims a Redis database with: one claim protocol.
CLAIM_KEY = "celery-canvas-suite:claim"
PYTHON_TASKS = [
    {"type": "python", "config": {"modules": [*TEST_TASKS[0]["config"]["modules"], "tests.support.native_tasks"]}}
]


# --- fixtures ------------------------------------------------------------------------------


def claim_db() -> int:
    """An empty Redis database, claimed by ``CLAIM_KEY`` (Celery's canvas suite harness claims
    its own from the top down with that key; this takes the lowest free one above 0)."""
    require("Redis", REDIS_HOST, REDIS_PORT)
    databases = int(redis.Redis(host=REDIS_HOST, port=REDIS_PORT).config_get("databases")["databases"])
    for db in range(1, databases):
        if redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db).set(CLAIM_KEY, os.getpid(), nx=True):
            if redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db).dbsize() == 1:
                return db
            redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db).delete(CLAIM_KEY)  # used without a claim
    pytest.fail(f"Redis on {REDIS_HOST}:{REDIS_PORT} has no empty database for this module")


def release_db(db: int) -> None:
    redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db).flushdb()  # the claim key with the rest


def redis_url(db: int) -> str:
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"


@pytest.fixture(scope="module")
def broker_db() -> Iterator[int]:
    db = claim_db()
    yield db
    release_db(db)


@pytest.fixture(scope="module")
def native(
    broker_db: int, server: HttpTestServer, tmp_path_factory: pytest.TempPathFactory, database_urls: dict[str, str]
) -> Iterator[Cluster]:
    """One SQLite-backed cluster with one worker running python task types and the http executor
    (the test HTTP server is on loopback, hence allow_networks)."""
    http = {"type": "http", "config": {"allow_networks": ["127.0.0.1/32"], "allow_hosts": ["127.0.0.1"]}}
    data = cluster_data(
        unique("ce"),
        redis_url(broker_db),
        storage_section("sqlite", database_urls),
        {"executors": [*PYTHON_TASKS, http]},
    )
    cluster = Cluster(tmp_path_factory.mktemp("native"), data)
    try:
        cluster.worker()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(autouse=True)
def worker_log_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if request.node.stash.get(CALL_FAILED, False) and "native" in request.fixturenames:
        for w in request.getfixturevalue("native").workers:
            print(f"--- log of worker {w.hostname}, {w.log_path} (last lines) ---\n{w.log()[-8000:]}")


@pytest.fixture(scope="module")
def events(native: Cluster) -> Iterator[EventLog]:
    """Celery's task events of the cluster (what Flower reads), from a real receiver."""
    log = EventLog(native.runtime.celery).start(lambda: native.manager.submit("echo", {"probe": 1}).task_id)
    yield log
    log.stop()


# --- helpers -------------------------------------------------------------------------------


def broker_url(c: Cluster) -> str:
    return str(c.data["broker"]["url"])


def cli(c: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    """``celery-ext`` in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "celery_ext.cli", "--config", str(c.config_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=c.config_path.parent,
        env=subprocess_env(),
    )


def listed(c: Cluster, task_id: str) -> dict[str, Any]:
    """The record of ``task_id`` as ``celery-ext list --json`` prints it."""
    out = cli(c, "list", "--limit", "500", "--json")
    assert out.returncode == 0, out.stderr
    items = {t["task_id"]: t for t in json.loads(out.stdout)["items"]}
    assert task_id in items, f"{task_id} not listed by celery-ext list"
    return items[task_id]


def record_when(c: Cluster, task_id: str, ready: Callable[[Task], bool], what: str, timeout: float = 30.0) -> Task:
    """The record of ``task_id`` once it exists and is ``ready`` (a plain message has a record
    once a worker receives it)."""
    found: list[Task] = []

    def check() -> bool:
        task = c.runtime.storage.tasks.get(task_id)
        found[:] = [task] if task is not None else []
        return task is not None and ready(task)

    poll(check, timeout, f"the record of {task_id} {what}")
    return found[0]


def ended(c: Cluster, task_id: str, timeout: float = 30.0) -> Task:
    return record_when(c, task_id, lambda t: t.status.terminal, "to end", timeout)


def only_celery_imports(path: Path) -> set[str]:
    """The top-level modules a script imports (the test asserts they are stdlib and celery)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    return names


def run_plain_producer(c: Cluster, script: Path, *args: str) -> Any:
    """``script`` run as a process of its own, from its directory, without PYTHONPATH (so it can
    import nothing of this repository), with ``CELERY_EXT_CONFIG`` and the broker URL as its
    first argument; what it printed, as JSON."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["CELERY_EXT_CONFIG"] = str(c.config_path)
    done = subprocess.run(
        [sys.executable, str(script), broker_url(c), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=script.parent,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# --- 1. a producer process that imports only celery ----------------------------------------


@pytest.fixture(scope="module")
def plain_run(native: Cluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``tests/support/plain_producer.py`` run once as its own process, from a directory outside
    the repository and without PYTHONPATH: ``send_task`` by name, a chain and a chord, with no
    queue and no routing options; each result read with ``AsyncResult.get()``."""
    assert only_celery_imports(PRODUCER) == {"json", "sys", "celery"}
    where = tmp_path_factory.mktemp("producer")
    script = Path(shutil.copy(PRODUCER, where / "producer.py"))
    sends = [
        {"name": "echo", "kwargs": {"hello": "plain celery", "n": [1, 2]}},
        {"name": "reject", "kwargs": {"reason": "bad"}},
        {"name": "flaky", "kwargs": {"key": unique("flaky:"), "fail_times": 1}},
        {"chain": [{"name": "add", "args": [2, 2]}, {"name": "add", "args": [4]}]},
        {"chord": [{"name": "add", "args": [1, 1]}, {"name": "add", "args": [2, 2]}], "body": {"name": "tsum"}},
    ]
    return run_plain_producer(native, script, json.dumps(sends))


def test_plain_producer_send_task_and_async_result(native: Cluster, plain_run: dict[str, Any]) -> None:
    """``Celery(broker=..., backend="celery_ext://").send_task("echo", kwargs=...)`` from a process
    whose code imports only ``celery``: the default queue reaches the worker, the record is made
    on receipt, and ``AsyncResult.get()`` reads it.  The script never imports celery_ext itself
    (it is not loaded when the app is made); Celery loads ``celery_ext.backend`` by its entry
    point (group ``celery.result_backends``) once the backend is first used, which is fine."""
    assert plain_run["celery_ext_before_send"] is False
    assert plain_run["backend"] == "celery_ext.backend:RecordBackend"
    ok = plain_run["sends"][0]
    assert ok.get("error") is None, ok
    assert ok["result"] == {"hello": "plain celery", "n": [1, 2]} and ok["state"] == "SUCCESS"
    assert ok["retries"] == 0

    record = listed(native, ok["task_id"])
    assert record["status"] == "succeeded" and record["task_type"] == "echo"
    assert record["payload"] == {"hello": "plain celery", "n": [1, 2]} and record["result"] == record["payload"]
    assert record["attempt"] == 1 and record["worker_id"]
    task = native.manager.get(ok["task_id"])
    assert task.created_at <= task.queued_at <= task.started_at <= task.finished_at  # type: ignore[operator]


def test_plain_producer_failure_is_celery_failure(native: Cluster, plain_run: dict[str, Any]) -> None:
    failed = plain_run["sends"][1]
    assert failed["state"] == "FAILURE"
    assert failed["error"] == "rejected: bad"
    assert (failed["error_module"], failed["error_type"]) == ("celery_ext.errors", "TaskFailed")
    record = listed(native, failed["task_id"])
    assert record["status"] == "failed" and record["error"] == {"reason": "rejected", "message": "bad"}
    assert record["attempt"] == 1


def test_plain_producer_retry_is_counted(native: Cluster, plain_run: dict[str, Any]) -> None:
    """A plain message gets the executor's (else ``worker.default_max_retries``) retry budget;
    its retry is Celery's own, and ``AsyncResult.retries`` counts it."""
    retried = plain_run["sends"][2]
    assert retried.get("error") is None, retried
    assert retried["result"] == {"runs": 2} and retried["state"] == "SUCCESS" and retried["retries"] == 1
    record = native.manager.get(retried["task_id"])
    assert record.status is TaskStatus.SUCCEEDED and record.attempt == 2 and record.max_retries == 3
    assert [ln.attempt for ln in native.manager.logs(record.task_id) if "flaky run" in ln.message] == [1, 2]


def test_plain_producer_canvas(native: Cluster, plain_run: dict[str, Any]) -> None:
    """Canvas from the producer that imports only celery: every step reaches the default queue."""
    chained, chorded = plain_run["sends"][3], plain_run["sends"][4]
    assert (chained.get("result"), chained["state"]) == (8, "SUCCESS"), chained
    first, second = (native.manager.get(i) for i in chained["ids"])
    assert (first.args, first.result, second.args, second.result) == ([2, 2], 4, [4, 4], 8)
    assert second.parent_id == first.task_id and second.root_id == first.root_id == first.task_id
    assert (chorded.get("result"), chorded["state"]) == (6, "SUCCESS"), chorded
    body = native.manager.get(chorded["task_id"])
    assert body.task_type == "tsum" and body.args == [[2, 4]] and body.status is TaskStatus.SUCCEEDED
    members = [native.manager.get(i) for i in chorded["ids"]]
    assert {t.group_id for t in members} == {body.group_id} and body.group_id is not None


def test_plain_message_of_unknown_name(native: Cluster) -> None:
    """No record; the worker logs why, and keeps working."""
    plain = Celery(broker=broker_url(native), backend=f"celery_ext://{native.config_path}")
    try:
        res = plain.send_task("no_such_type", kwargs={"a": 1})
        native.workers[0].wait_for_log(f"message {res.id} for unknown task 'no_such_type' rejected", 30)
        assert res.state == "PENDING" and native.runtime.storage.tasks.get(res.id) is None
        with pytest.raises(CeleryTimeoutError):
            res.get(timeout=1)
        assert plain.send_task("echo", kwargs={"after": 1}).get(timeout=30) == {"after": 1}
    finally:
        plain.close()


@pytest.fixture(scope="module")
def forwarded(tmp_path_factory: pytest.TempPathFactory, database_urls: dict[str, str]) -> Iterator[dict[str, Any]]:
    """A cluster of its own (own Redis database) with a worker that runs only ``echo``; a plain
    ``send_task("add", args=[20, 22])``; then a second worker that runs only ``add``."""
    db = claim_db()
    data = cluster_data(
        unique("ce"), redis_url(db), storage_section("sqlite", database_urls), {"executors": TEST_TASKS}
    )
    c = Cluster(tmp_path_factory.mktemp("forward"), data)
    plain = Celery(broker=redis_url(db), backend=f"celery_ext://{c.config_path}")
    try:
        only_echo = c.worker(extra_args=["--supported-types", "echo"])
        res = plain.send_task("add", args=[20, 22])
        queue = f"{data['app']['name']}.add"
        only_echo.wait_for_log(f"task add[{res.id}] is not run here; handed to queue {queue}", 30)
        before = (c.runtime.storage.tasks.get(res.id), res.state)
        only_add = c.worker(extra_args=["--supported-types", "add"])
        result = res.get(timeout=30)
        yield {
            "id": res.id,
            "before": before,
            "result": result,
            "record": c.manager.get(res.id),
            "runner": only_add.hostname.split("@")[0],
        }
    finally:
        plain.close()
        c.close()
        release_db(db)


def test_default_queue_forwards_types_a_worker_does_not_run(forwarded: dict[str, Any]) -> None:
    """Every worker consumes ``celery``; one that does not run the type (``--supported-types``)
    hands the message, unchanged, to the type's shared queue, where a worker that runs it takes
    it.  The record is made once, by the worker that runs it."""
    assert forwarded["before"] == (None, "PENDING")  # not recorded by the worker that forwarded it
    assert forwarded["result"] == 42
    record = forwarded["record"]
    assert record.status is TaskStatus.SUCCEEDED and record.args == [20, 22] and record.attempt == 1
    assert record.worker_id.startswith(forwarded["runner"] + "@")
    assert record.root_id == forwarded["id"]


def test_forwarded_message_keeps_its_parent(forwarded: dict[str, Any]) -> None:
    """The producer sent the task with no parent: its record must not name itself as parent."""
    assert forwarded["record"].parent_id is None


def test_plain_task_cancelled_while_running_then_retried(native: Cluster, events: EventLog) -> None:
    """A record made on receipt is a record like any other: cancel (REVOKED), then a manual
    retry, which waits for the cancelled run to end and then runs as run 2."""
    plain = Celery(broker=broker_url(native), backend=f"celery_ext://{native.config_path}")
    try:
        res = plain.send_task("sleep", kwargs={"seconds": 2})
        poll(lambda: res.state == "STARTED", 20, "the task to start")
        m = native.manager
        assert m.cancel(res.id).status is TaskStatus.CANCELLED
        assert res.state == "REVOKED"
        again = m.retry(res.id)
        assert again.run == 2 and again.status is TaskStatus.PENDING  # published when run 1 ends
        done = m.wait(res.id, 30)
        assert done.status is TaskStatus.SUCCEEDED and done.run == 2 and done.attempt == 1
        # An AsyncResult that has seen a ready state (REVOKED) caches it (Celery's rule): ask a
        # fresh one after a manual retry.
        with pytest.raises(TaskFailed, match="^cancelled: "):
            res.get(timeout=10)
        assert plain.AsyncResult(res.id).get(timeout=10) == {"slept": 2.0}
        runs = [ln for ln in m.logs(res.id) if "sleeping" in ln.message]
        assert [(ln.run, ln.attempt) for ln in runs] == [(1, 1), (2, 1)]
        starts = [ln.time for ln in runs]
        assert starts[1] - starts[0] >= timedelta(seconds=1.9)  # run 2 began after run 1 ended
        assert events.of(res.id, "task-revoked")
    finally:
        plain.close()


def test_stranded_message_of_a_type_the_sweeper_does_not_know_still_runs(native: Cluster) -> None:
    """A dead worker's direct queue is handed back by a process that may not know every type
    (the scheduler needs no user task modules): such a message goes to the app's default queue,
    which every worker of the app consumes and hands on (not to a queue nobody consumes).  Here
    ``add`` waits in a direct queue nobody consumes, and the sweep knows only ``echo``."""
    app, prefix = native.runtime.celery, native.data["app"]["name"]
    ghost = f"{prefix}.worker.ghost@nowhere"
    res = app.send_task("add", args=[1, 2], queue=ghost)
    opts = app.conf.broker_transport_options
    client = redis.Redis.from_url(broker_url(native))
    poll(lambda: sum(client.llen(k) for k in queue_keys(ghost, opts)) == 1, 10, "the message in the direct queue")
    assert move_stranded(client, ghost, prefix, opts, ["echo"]) == 1
    assert res.get(timeout=8) == 3


# --- 2. celery call -------------------------------------------------------------------------


def test_celery_call(native: Cluster) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "celery_ext", "call", "echo", "--kwargs", '{"x": 1}'],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=native.config_path.parent,
        env=subprocess_env(CELERY_EXT_CONFIG=str(native.config_path)),
    )
    assert done.returncode == 0, done.stderr
    task_id = done.stdout.strip()
    assert len(task_id) == 36 and task_id.count("-") == 4, done.stdout  # a Celery (uuid4) task id
    record = ended(native, task_id)
    assert record.status is TaskStatus.SUCCEEDED and record.result == {"x": 1}
    assert record.payload == {"x": 1} and record.task_type == "echo" and record.attempt == 1
    assert native.runtime.celery.AsyncResult(task_id).get(timeout=10) == {"x": 1}

    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "celery_ext", "call", "add", "--args", "[2, 3]"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=native.config_path.parent,
        env=subprocess_env(CELERY_EXT_CONFIG=str(native.config_path)),
    )
    assert done.returncode == 0, done.stderr
    record = ended(native, done.stdout.strip())
    assert record.status is TaskStatus.SUCCEEDED and record.args == [2, 3] and record.result == 5


# --- 3. Celery states through AsyncResult -------------------------------------------------


def test_async_result_success_and_permanent_failure(native: Cluster) -> None:
    app, m = native.runtime.celery, native.manager
    ok = app.AsyncResult(m.submit("echo", {"a": 1}).task_id)
    assert ok.get(timeout=30) == {"a": 1}
    assert ok.state == "SUCCESS" and ok.result == {"a": 1} and ok.successful()

    bad = app.AsyncResult(m.submit("reject", {"reason": "bad input"}, max_retries=3).task_id)
    with pytest.raises(TaskFailed) as raised:
        bad.get(timeout=30)
    assert str(raised.value) == "rejected: bad input"
    assert (raised.value.reason, raised.value.message) == ("rejected", "bad input")
    assert bad.state == "FAILURE" and bad.failed()
    assert isinstance(bad.result, TaskFailed) and str(bad.result) == "rejected: bad input"
    assert bad.retries == 0


def test_async_result_started_while_running(native: Cluster) -> None:
    app, m = native.runtime.celery, native.manager
    res = app.AsyncResult(m.submit("sleep", {"seconds": 2}).task_id)
    poll(lambda: res.state == "STARTED", 20, "the task to start")
    assert res.result == {"hostname": m.get(res.id).worker_id}  # Celery's STARTED meta
    assert res.get(timeout=30) == {"slept": 2.0} and res.state == "SUCCESS"


def test_async_result_retries_exhausted(native: Cluster, events: EventLog) -> None:
    app, m = native.runtime.celery, native.manager
    task = m.submit("flaky", {"key": unique("flaky:"), "fail_times": 10}, max_retries=1)
    res = app.AsyncResult(task.task_id)
    with pytest.raises(TaskFailed) as raised:
        res.get(timeout=30)
    assert str(raised.value) == "exception: RuntimeError: planned failure 2"
    assert res.state == "FAILURE" and str(res.result) == "exception: RuntimeError: planned failure 2"
    record = m.get(task.task_id)
    assert record.status is TaskStatus.FAILED and record.attempt == 2
    assert res.retries == record.attempt - 1 == 1

    # What Flower reads: each message's `retries` is its attempt - 1; one RETRY, then FAILURE.
    poll(lambda: bool(events.of(task.task_id, "task-failed")), 20, "the task-failed event")
    assert [e["retries"] for e in events.of(task.task_id, "task-received")] == [0, 1]
    assert len(events.of(task.task_id, "task-retried")) == 1
    assert "planned failure 1" in events.of(task.task_id, "task-retried")[0]["exception"]
    assert "planned failure 2" in events.of(task.task_id, "task-failed")[0]["exception"]
    assert not events.of(task.task_id, "task-succeeded")


def test_the_executors_traceback_in_flower_and_async_result(native: Cluster, events: EventLog) -> None:
    """Flower's task page shows the traceback of Celery's task-failed and task-retried events, and
    ``AsyncResult.traceback`` gives one: both show the task's own code, not only celery_ext's."""
    app, m = native.runtime.celery, native.manager
    task = m.submit("flaky", {"key": unique("flaky:"), "fail_times": 10}, max_retries=1)
    res = app.AsyncResult(task.task_id)
    with pytest.raises(TaskFailed):
        res.get(timeout=30)
    poll(lambda: bool(events.of(task.task_id, "task-failed")), 20, "the task-failed event")
    own_frame = 'tests/support/tasks.py", line 31, in flaky'
    retried = events.of(task.task_id, "task-retried")[0]["traceback"]
    assert own_frame in retried and "RuntimeError: planned failure 1" in retried
    failed = events.of(task.task_id, "task-failed")[0]["traceback"]
    assert own_frame in failed and "RuntimeError: planned failure 2" in failed
    assert failed.index("planned failure 2") < failed.index("direct cause") < failed.index("TaskFailed: exception")
    # AsyncResult.traceback: the last attempt's, as the worker logged it in the task's log.
    assert res.traceback.startswith("Traceback (most recent call last):")
    assert own_frame in res.traceback and res.traceback.rstrip().endswith("RuntimeError: planned failure 2")

    # An executor's expected failure (PermanentError) logs no traceback: the event still shows
    # where it was raised.
    bad = app.AsyncResult(m.submit("reject", {"reason": "no traceback"}).task_id)
    with pytest.raises(TaskFailed):
        bad.get(timeout=30)
    assert bad.traceback is None
    poll(lambda: bool(events.of(bad.id, "task-failed")), 20, "the task-failed event")
    assert "in reject" in events.of(bad.id, "task-failed")[0]["traceback"]


def test_update_state_progress_while_running(native: Cluster, tmp_path: Path) -> None:
    """Celery's ``update_state(state="PROGRESS", meta=...)`` from a running task: ``AsyncResult``
    says PROGRESS with the meta (here and in a producer that imports only celery), the record
    and the CLI show it, and the task's end replaces it.  Before, it was dropped: STARTED."""
    app, m = native.runtime.celery, native.manager
    key = unique("progress:")
    res = app.signature("report_progress", kwargs={"key": key, "steps": 3}).apply_async()
    poll(lambda: app.AsyncResult(res.id).state == "PROGRESS", 30, "the PROGRESS state")
    assert app.AsyncResult(res.id).info == {"done": 3, "total": 3}
    record = m.get(res.id)
    assert record.status is TaskStatus.RUNNING and record.reported is not None
    assert (record.progress["state"], record.progress["meta"]) == ("PROGRESS", {"done": 3, "total": 3})
    assert (record.progress["attempt"], record.progress["run"]) == (record.attempt, record.run)

    script = tmp_path / "state.py"
    script.write_text(
        "import json, sys\n"
        "from celery import Celery\n"
        "app = Celery(broker=sys.argv[1], backend='celery_ext://')\n"
        "r = app.AsyncResult(sys.argv[2])\n"
        "print(json.dumps({'state': r.state, 'info': r.info}))\n"
    )
    assert run_plain_producer(native, script, res.id) == {"state": "PROGRESS", "info": {"done": 3, "total": 3}}
    shown = cli(native, "get", res.id, "--json")
    assert json.loads(shown.stdout)["progress"]["meta"] == {"done": 3, "total": 3}, shown.stderr

    redis.Redis(host=REDIS_HOST, port=REDIS_PORT).set(key, 1, ex=60)
    result = res.get(timeout=30)
    assert res.state == "SUCCESS" and result["steps"] == 3
    # Meta that is not JSON is refused where update_state is called, naming what is wrong.
    assert "meta: not JSON-serializable: Object of type module is not JSON serializable" in result["refused"]


def test_async_result_revoked_when_cancelled_while_queued(native: Cluster, events: EventLog) -> None:
    app, m = native.runtime.celery, native.manager
    task = m.submit("echo", {"late": True}, delay=30)
    assert task.status is TaskStatus.SCHEDULED
    res = app.AsyncResult(task.task_id)
    assert res.state == "PENDING"
    assert m.cancel(task.task_id).status is TaskStatus.CANCELLED
    assert res.state == "REVOKED"
    with pytest.raises(TaskFailed) as raised:
        res.get(timeout=5)
    assert str(raised.value) == "cancelled: the task was cancelled"
    assert isinstance(res.result, TaskFailed)


def test_celery_revoke_of_a_queued_task_cancels_its_record(native: Cluster, events: EventLog) -> None:
    """``celery control revoke`` (Flower's Revoke, ``AsyncResult.revoke()``): the worker discards
    the message and Celery reports REVOKED.  The record says cancelled too, and its waiters wake."""
    app, m = native.runtime.celery, native.manager
    busy = busy_worker(native)
    task = m.submit("echo", {"revoked": True})
    app.AsyncResult(task.task_id).revoke()
    done = m.wait(task.task_id, 30)
    assert done.status is TaskStatus.CANCELLED and done.started_at is None and done.worker_id is None
    res = app.AsyncResult(task.task_id)
    assert res.state == "REVOKED"
    with pytest.raises(TaskFailed, match="^cancelled: "):
        res.get(timeout=5)
    poll(lambda: events.of(task.task_id, "task-revoked"), 10, "Celery's task-revoked event")
    assert not events.of(task.task_id, "task-started")
    assert all(m.wait(t.task_id, 30).status is TaskStatus.SUCCEEDED for t in busy)  # the rest ran
    logged = f"task echo[{task.task_id}] discarded by Celery (revoked): its record is cancelled"
    assert logged in native.workers[0].log()


def test_celery_revoke_of_a_chain_step_fails_the_steps_after_it(native: Cluster) -> None:
    """The steps after a revoked step never run (Celery sends them with it): their records end
    ``parent_failed``, as when the step is cancelled, instead of waiting for ever."""
    m = native.manager
    busy_worker(native)
    first, second = m.submit_chain([{"task_type": "add", "payload": {"x": 1, "y": 1}}, {"task_type": "echo"}])
    native.runtime.celery.control.revoke(first.task_id)
    assert m.wait(first.task_id, 30).status is TaskStatus.CANCELLED
    after = m.wait(second.task_id, 10)
    assert after.status is TaskStatus.FAILED and after.error is not None
    assert after.error.reason == "parent_failed" and "was cancelled" in after.error.message


def test_a_discard_cancels_only_the_dispatch_it_was_for(native: Cluster) -> None:
    """What a worker's Celery tells the backend when it discards a message (``mark_as_revoked``),
    called here directly: a stopped run ("terminated": the lease stops a superseded run so, after
    the task was dispatched again) and a message of an older dispatch leave the record alone."""
    app, m = native.runtime.celery, native.manager
    task = m.submit("echo", {"held": True}, delay=30)  # waits in storage: no message yet
    assert task.status is TaskStatus.SCHEDULED and task.dispatch_token

    def discard(reason: str, token: str) -> None:
        headers = ExtHeader(token, 1).to_header()
        app.backend.mark_as_revoked(task.task_id, reason, request=Context(id=task.task_id, task="echo", **headers))

    discard("terminated", task.dispatch_token)
    assert m.get(task.task_id).status is TaskStatus.SCHEDULED
    discard("revoked", "an-older-dispatch")
    assert m.get(task.task_id).status is TaskStatus.SCHEDULED
    discard("expired", task.dispatch_token)
    assert m.get(task.task_id).status is TaskStatus.CANCELLED


def test_plain_message_revoked_or_expired_unrun_is_recorded_cancelled(native: Cluster, events: EventLog) -> None:
    """A plain message of a celery_ext type is recorded on receipt; one the worker discards,
    revoked or expired, has a record too, cancelled, as bare Celery's backend would say REVOKED."""
    plain = Celery(broker=broker_url(native), backend=f"celery_ext://{native.config_path}")
    try:
        busy_worker(native)
        revoked = plain.send_task("echo", kwargs={"kept": 1})
        expired = plain.send_task("echo", kwargs={"kept": 2}, expires=0.5)
        plain.control.revoke(revoked.id)
        m = native.manager
        for res, kept in ((revoked, 1), (expired, 2)):
            poll(lambda res=res: res.state == "REVOKED", 30, f"{res.id} revoked")
            record = m.get(res.id)
            assert record.status is TaskStatus.CANCELLED and record.task_type == "echo"
            assert record.payload == {"kept": kept} and record.started_at is None
            poll(lambda res=res: events.of(res.id, "task-revoked"), 10, "Celery's task-revoked event")
            assert not events.of(res.id, "task-started")
        assert events.of(expired.id, "task-revoked")[0]["expired"] is True
    finally:
        plain.close()


# --- 4. canvas of task types --------------------------------------------------------------


def records_of(c: Cluster, **flt: str) -> dict[str, Task]:
    return {t.task_id: t for t in c.manager.list(limit=500, **flt).items}


def test_chain_with_mutable_signatures(native: Cluster) -> None:
    app = native.runtime.celery
    res = chain(
        app.signature("add", args=(2, 2)), app.signature("add", args=(4,)), app.signature("add", args=(8,))
    ).apply_async()
    assert res.get(timeout=30) == 16
    third, second, first = res, res.parent, res.parent.parent
    ids = [first.id, second.id, third.id]
    assert [r.state for r in (first, second, third)] == ["SUCCESS"] * 3

    records = records_of(native, root_id=first.id)
    assert set(records) == set(ids)  # one record per step, found by the chain's root id
    steps = [records[i] for i in ids]
    assert [t.status for t in steps] == [TaskStatus.SUCCEEDED] * 3
    assert [t.args for t in steps] == [[2, 2], [4, 4], [8, 8]]  # the previous result comes first
    assert [t.result for t in steps] == [4, 8, 16]
    assert [t.parent_id for t in steps] == [None, first.id, second.id]
    assert {t.root_id for t in steps} == {first.id}
    assert set(records_of(native, parent_id=first.id)) == {second.id}
    # The same through the CLI, as an operator finds a workflow's records.
    for flag, value, expected in (("--root", first.id, set(ids)), ("--parent", second.id, {third.id})):
        out = cli(native, "list", flag, value, "--json")
        assert out.returncode == 0, out.stderr
        assert {t["task_id"] for t in json.loads(out.stdout)["items"]} == expected, flag


def test_chain_stops_at_a_failed_step(native: Cluster) -> None:
    """Celery's rule: the next step is not sent; ``get()`` on the chain raises the failure."""
    app = native.runtime.celery
    res = chain(app.signature("reject", kwargs={"reason": "stop here"}), app.signature("add", args=(1,))).apply_async()
    with pytest.raises(TaskFailed, match="^rejected: stop here$"):
        res.get(timeout=30)
    assert res.parent.state == "FAILURE"
    # Never sent; Celery's backend protocol marks the rest of a failed chain FAILURE as well
    # (``Backend.mark_as_failure`` walks ``request.chain``), just after the failed step itself.
    poll(lambda: res.state == "FAILURE", 10, "the unsent step marked failed")
    with pytest.raises(TaskFailed, match="^rejected: stop here$"):
        res.get(timeout=5)
    unsent = native.runtime.storage.tasks.get(res.id)
    assert unsent is not None and unsent.status is TaskStatus.FAILED and unsent.started_at is None
    assert set(records_of(native, root_id=res.parent.id)) == {res.parent.id}  # it never ran in the chain


def test_group(native: Cluster) -> None:
    app = native.runtime.celery
    res = group(app.signature("add", args=(i, i)) for i in range(3)).apply_async()
    assert res.get(timeout=30) == [0, 2, 4]
    members = records_of(native, group_id=res.id)
    assert set(members) == {r.id for r in res.results}
    assert all(t.status is TaskStatus.SUCCEEDED and t.group_id == res.id for t in members.values())
    assert sorted(t.result for t in members.values()) == [0, 2, 4]
    out = cli(native, "list", "--group", res.id)
    assert out.returncode == 0 and all(r.id in out.stdout for r in res.results), out.stdout + out.stderr


def test_group_result_save_restore_delete(native: Cluster, tmp_path: Path) -> None:
    """``GroupResult.save()`` keeps the group's ordered member ids in the task store, so
    ``GroupResult.restore`` finds it, here and in a producer that imports only celery, even
    before any member has started.  Before, restore always gave ``None``."""
    app, m = native.runtime.celery, native.manager
    busy = busy_worker(native)  # the members wait in the broker: none has a record yet
    res = group(app.signature("add", args=(i, i)) for i in range(4)).apply_async()
    res.save()
    assert all(native.runtime.storage.tasks.get(r.id) is None for r in res.results)
    restored = GroupResult.restore(res.id, app=app)
    assert restored is not None and restored.id == res.id
    assert [r.id for r in restored.results] == [r.id for r in res.results]

    script = tmp_path / "restore.py"
    script.write_text(
        "import json, sys\n"
        "from celery import Celery\n"
        "from celery.result import GroupResult\n"
        "app = Celery(broker=sys.argv[1], backend='celery_ext://')\n"
        "group = GroupResult.restore(sys.argv[2], app=app)\n"
        "print(json.dumps({'ids': [r.id for r in group.results], 'values': group.get(timeout=60)}))\n"
    )
    restored_there = run_plain_producer(native, script, res.id)
    assert restored_there == {"ids": [r.id for r in res.results], "values": [0, 2, 4, 6]}
    assert all(t.status is TaskStatus.SUCCEEDED for t in (m.get(b.task_id) for b in busy))

    restored.delete()
    assert GroupResult.restore(res.id, app=app) is None
    assert res.get(timeout=30) == [0, 2, 4, 6]  # the members' records are untouched


def test_chord(native: Cluster) -> None:
    app = native.runtime.celery
    res = chord(
        [app.signature("add", args=(1, 1)), app.signature("add", args=(2, 2))], app.signature("tsum")
    ).apply_async()
    assert res.get(timeout=60) == 6
    header = res.parent
    # Celery gives the body the chord's group id too (canvas.chord.run freezes it so).
    members = records_of(native, group_id=header.id)
    assert set(members) == {*(r.id for r in header.results), res.id}
    assert sorted(t.result for t in members.values() if t.task_type == "add") == [2, 4]
    body = members[res.id]
    assert body.status is TaskStatus.SUCCEEDED and body.task_type == "tsum"
    assert body.args == [[2, 4]] and body.result == 6
    # The records keep Celery's ids as the messages carry them: a header task sent by the
    # producer is its own root; the body is sent by Celery's celery.chord_unlock task (not a
    # record of its own), its parent and root.
    for r in header.results:
        assert (members[r.id].root_id, members[r.id].parent_id) == (r.id, None)
    assert body.parent_id and body.root_id == body.parent_id and body.parent_id not in members
    assert native.runtime.storage.tasks.get(body.parent_id) is None
    assert set(records_of(native, parent_id=body.parent_id)) == {body.task_id}


def test_chord_with_a_failed_member(native: Cluster) -> None:
    """The body never runs; ``get()`` raises the member's failure, as with bare Celery."""
    app = native.runtime.celery
    res = chord(
        [app.signature("add", args=(1, 1)), app.signature("reject", kwargs={"reason": "member"})], app.signature("tsum")
    ).apply_async()
    with pytest.raises(TaskFailed, match="^rejected: member$"):
        res.get(timeout=60)
    assert [r.state for r in res.parent.results] == ["SUCCESS", "FAILURE"]
    poll(lambda: native.runtime.storage.tasks.get(res.id) is not None, 10, "the body's record")
    body = native.runtime.storage.tasks.get(res.id)
    assert body.status is TaskStatus.FAILED and body.error.reason == "parent_failed"
    assert body.started_at is None  # the body never ran


def test_chord_body_of_a_failed_chord_is_failure(native: Cluster) -> None:
    """Bare Celery: ``chord_unlock`` stores FAILURE (``ChordError``) for the body of a chord whose
    member failed, so ``AsyncResult(body).state`` is FAILURE."""
    app = native.runtime.celery
    res = chord([app.signature("reject", kwargs={"reason": "member"})], app.signature("tsum")).apply_async()
    with pytest.raises(TaskFailed):
        res.get(timeout=60)
    poll(lambda: app.AsyncResult(res.id).state != "PENDING", 10, "the body's state to leave PENDING")
    body = app.AsyncResult(res.id)
    assert body.state == "FAILURE" and "member" in str(body.result)


def test_chunks_starmap_and_map(native: Cluster) -> None:
    """Celery runs each item of ``chunks``, ``starmap`` and ``map`` inside one task
    (``celery.starmap``, ``celery.map``) by calling the task type directly.  Before, that direct
    call tried to record a run without an id and failed every such canvas."""
    app = native.runtime.celery
    add, tsum = app.tasks["add"], app.tasks["tsum"]
    before = set(records_of(native, task_type="add"))

    chunks = add.chunks(zip(range(6), range(6)), 2).apply_async()
    assert chunks.get(timeout=30) == [[0, 2], [4, 6], [8, 10]]
    starmap = add.starmap([(1, 2), (3, 4)]).apply_async()
    assert starmap.get(timeout=30) == [3, 7]
    assert tsum.map([[1, 2], [3, 4, 5]]).apply_async().get(timeout=30) == [3, 12]
    # The enclosing task is a plain Celery task of the app: it has a record of its own.
    record = native.manager.get(starmap.id)
    assert record.task_type == "celery.starmap" and record.status is TaskStatus.SUCCEEDED
    assert record.result == [3, 7]

    # An item that fails fails the enclosing task with the executor's reason, as Celery does.
    bad = add.starmap([(1, 2), ("x", 1)]).apply_async()
    with pytest.raises(TaskFailed) as raised:
        bad.get(timeout=30)
    assert str(raised.value).startswith("exception: TypeError: can only concatenate str")
    assert bad.state == "FAILURE" and native.manager.get(bad.id).status is TaskStatus.FAILED
    # The items ran inside their tasks: none of them is a run of its own.
    assert set(records_of(native, task_type="add")) == before


def test_a_direct_call_runs_the_executor_in_the_caller(native: Cluster) -> None:
    """``add(2, 3)`` runs the function where it is called, as with any Celery task: no message,
    no record.  A failure raises ``TaskFailed`` with the executor's reason."""
    app = native.runtime.celery
    before = set(records_of(native))
    assert app.tasks["add"](2, 3) == 5
    assert app.tasks["echo"](a=1, b=[2]) == {"a": 1, "b": [2]}
    with pytest.raises(TaskFailed) as raised:
        app.tasks["reject"](reason="called directly")
    assert (raised.value.reason, raised.value.message) == ("rejected", "called directly")
    assert set(records_of(native)) == before
    # ``apply()`` also runs in the caller, but as Celery's traced run, with an id: it is recorded.
    applied = app.tasks["add"].apply((4, 4))
    assert applied.get() == 8
    record = native.manager.get(applied.id)
    assert record.status is TaskStatus.SUCCEEDED and record.result == 8 and record.args == [4, 4]


# --- 5. a previous result into an executor that takes a JSON object ------------------------


def test_chain_result_becomes_the_http_payload(native: Cluster, server: HttpTestServer) -> None:
    """``payload_of``: the previous step's JSON object fills the payload of an ``http_request``
    step (executors other than python take only a JSON object)."""
    app = native.runtime.celery
    url = server.url("/json?from=chain")
    res = chain(
        app.signature("echo", kwargs={"url": url, "method": "GET"}), app.signature("http_request")
    ).apply_async()
    out = res.get(timeout=60)
    assert out["status"] == 200 and out["json"]["method"] == "GET" and out["json"]["query"] == {"from": "chain"}
    step = native.manager.get(res.id)
    assert step.status is TaskStatus.SUCCEEDED and step.task_type == "http_request"
    assert step.payload == {} and step.args == [{"url": url, "method": "GET"}]
    assert step.parent_id == res.parent.id

    # The step's own payload keys win over the previous result's.
    res = chain(
        app.signature("echo", kwargs={"url": url, "method": "GET"}),
        app.signature("http_request", kwargs={"method": "POST", "body": "mine"}),
    ).apply_async()
    out = res.get(timeout=60)
    assert out["json"]["method"] == "POST" and out["json"]["body"] == "mine"

    # An immutable signature ignores the previous result.
    res = chain(
        app.signature("as_list", kwargs={"a": 1}), app.signature("http_request", kwargs={"url": url}, immutable=True)
    ).apply_async()
    assert res.get(timeout=60)["json"]["method"] == "GET"
    assert native.manager.get(res.id).args is None


def test_chain_feeding_a_list_to_http_is_invalid_payload(native: Cluster) -> None:
    app = native.runtime.celery
    res = chain(app.signature("as_list", kwargs={"a": 1, "b": 2}), app.signature("http_request")).apply_async()
    with pytest.raises(TaskFailed) as raised:
        res.get(timeout=60)
    assert raised.value.reason == "invalid_payload"
    assert "http_request takes a JSON object payload" in raised.value.message
    assert "got 1: list" in raised.value.message
    assert res.parent.get(timeout=10) == [1, 2]
    step = native.manager.get(res.id)
    assert step.status is TaskStatus.FAILED and step.error and step.error.reason == "invalid_payload"
    assert step.attempt == 1 and step.args == [[1, 2]]  # permanent: not retried


# --- 6. a plain message sent twice with one id --------------------------------------------


def test_plain_message_sent_twice_runs_once(native: Cluster) -> None:
    """Two messages with one Celery task id (a redelivery, or a producer that sends again): one
    run, one record; the second message is dropped.  The producer is a plain Celery app whose
    backend names the config file: ``celery_ext:///path/config.yaml``."""
    plain = Celery(broker=broker_url(native), backend=f"celery_ext://{native.config_path}")
    try:
        key = unique("twice:")
        ids = {"echo": unique("echo-"), "record": unique("record-")}
        for _ in range(2):
            first = plain.send_task("echo", kwargs={"twice": True}, task_id=ids["echo"])
            assert first.get(timeout=30) == {"twice": True}
            plain.send_task("record", kwargs={"key": key, "value": "ran"}, task_id=ids["record"]).get(timeout=30)
        w = native.workers[0]
        for task_id in ids.values():
            w.wait_for_log(f"task {task_id} is succeeded; duplicate or stale message dropped", 30)
        assert redis.Redis(host=REDIS_HOST, port=REDIS_PORT).lrange(key, 0, -1) == [b"ran"]
        for task_id in ids.values():
            record = native.manager.get(task_id)
            assert record.status is TaskStatus.SUCCEEDED and record.attempt == 1 and record.run == 1
            assert plain.AsyncResult(task_id).state == "SUCCESS"
        assert native.manager.get(ids["echo"]).result == {"twice": True}
    finally:
        plain.close()


# --- 7. a running chain step stopped from outside --------------------------------------------


@pytest.mark.parametrize("how", ["celery control terminate", "celery-ext cancel --terminate"])
def test_a_terminated_chain_step_is_cancelled_and_the_steps_after_it_fail(
    native: Cluster, events: EventLog, how: str
) -> None:
    """Terminating a running step (Celery's ``terminate`` control command, or celery_ext's cancel
    with ``terminate``): Celery reports it REVOKED at once, and its record says cancelled then
    too.  The steps after it, which it would have published, fail (``parent_failed``)."""
    m = native.manager
    first, second, third = m.submit_chain(
        [{"task_type": "talk_then_wait", "payload": {"seconds": 60}}, {"task_type": "echo"}, {"task_type": "echo"}]
    )
    poll(lambda: m.get(first.task_id).status is TaskStatus.RUNNING, 20, "the first step to run")
    if how == "celery control terminate":
        native.runtime.celery.control.terminate(first.task_id, signal="SIGTERM")
    else:
        m.cancel(first.task_id, terminate=True)
    poll(lambda: events.of(first.task_id, "task-revoked"), 20, "Celery's task-revoked event")
    record = m.wait(first.task_id, 20)
    assert record.status is TaskStatus.CANCELLED
    assert native.runtime.celery.AsyncResult(first.task_id).state == "REVOKED"
    for step in (second, third):
        after = m.wait(step.task_id, 20)
        assert after.status is TaskStatus.FAILED and after.error is not None
        assert after.error.reason == "parent_failed" and after.started_at is None
        assert after.error.message == f"previous step talk_then_wait[{first.task_id}] was cancelled"
    if how == "celery control terminate":
        logged = f"task talk_then_wait[{first.task_id}] terminated by Celery: its record is cancelled"
        native.workers[0].wait_for_log(logged, 10)


def test_a_chain_step_whose_pool_process_died_for_the_last_time_fails_the_steps_after_it(native: Cluster) -> None:
    """A step whose pool process dies (OOM kill, segfault) with no attempts left ends ``dead``;
    the steps after it, which wait in storage for it, fail instead of waiting for ever."""
    m = native.manager
    first, second, third = m.submit_chain(
        [{"task_type": "crash", "max_retries": 0}, {"task_type": "echo"}, {"task_type": "echo"}]
    )
    assert m.wait(first.task_id, 30).status is TaskStatus.DEAD
    for step in (second, third):
        after = m.wait(step.task_id, 20)
        assert after.status is TaskStatus.FAILED and after.error is not None
        assert after.error.reason == "parent_failed"
        assert after.error.message == f"previous step crash[{first.task_id}] failed (worker_lost)"
    res = native.runtime.celery.AsyncResult(third.task_id)
    with pytest.raises(TaskFailed, match="^parent_failed: "):
        res.get(timeout=10)


# --- 8. a plain message held for its countdown ----------------------------------------------


def held_record(c: Cluster, task_id: str) -> Task:
    """The record a worker made on receipt of a plain message it holds for its eta."""
    return record_when(c, task_id, lambda _: True, "made on receipt", 20)


def worker_id(c: Cluster) -> str:
    return c.workers[0].hostname.replace("%h", socket.gethostname())


def test_plain_message_held_for_its_countdown_is_recorded_queued(native: Cluster, events: EventLog) -> None:
    """A plain message with a countdown waits in the worker's main process (``celery inspect
    scheduled``) until due.  It is recorded ``queued`` on receipt, with its eta as ``run_at``
    and the worker holding it, and that record is the run's when it is due (the same attempt)."""
    plain = Celery(broker=broker_url(native), backend=f"celery_ext://{native.config_path}")
    try:
        sent = datetime.now(UTC)
        res = plain.send_task("echo", kwargs={"held": 1}, countdown=4)
        record = held_record(native, res.id)
        assert record.status is TaskStatus.QUEUED and record.task_type == "echo"
        assert record.payload == {"held": 1} and record.attempt == 1 and record.started_at is None
        assert record.worker_id == worker_id(native)
        assert record.run_at is not None
        assert abs((record.run_at - (sent + timedelta(seconds=4))).total_seconds()) < 1.0
        assert res.state == "PENDING"  # as Celery says of a task that has not started
        assert listed(native, res.id)["status"] == "queued"
        out = cli(native, "get", res.id, "--json")
        assert out.returncode == 0 and json.loads(out.stdout)["run_at"] is not None, out.stderr

        assert res.get(timeout=30) == {"held": 1}
        done = native.manager.get(res.id)
        assert done.status is TaskStatus.SUCCEEDED and done.attempt == 1 and done.run == 1
        assert done.started_at is not None and done.started_at >= record.run_at - timedelta(seconds=0.5)
        assert done.queued_at == record.queued_at and done.created_at == record.created_at
        assert len(events.of(res.id, "task-started")) == 1
    finally:
        plain.close()


def test_plain_message_held_then_cancelled_is_dropped_when_due(native: Cluster, events: EventLog) -> None:
    """``celery-ext cancel`` reaches a held plain message through its record: when it is due, the
    worker drops it before the task runs, and Celery reports it REVOKED."""
    plain = Celery(broker=broker_url(native), backend=f"celery_ext://{native.config_path}")
    try:
        key = unique("held-cancel:")
        res = plain.send_task("record", kwargs={"key": key, "value": "ran"}, countdown=3)
        assert held_record(native, res.id).status is TaskStatus.QUEUED
        out = cli(native, "cancel", res.id, "--json")
        assert out.returncode == 0 and json.loads(out.stdout)["status"] == "cancelled", out.stderr
        poll(lambda: events.of(res.id, "task-revoked"), 30, "Celery's task-revoked event when it was due")
        assert res.state == "REVOKED"
        record = native.manager.get(res.id)
        assert record.status is TaskStatus.CANCELLED and record.started_at is None
        # Celery's pool took the message (task-started), and the run dropped it before the task.
        assert not events.of(res.id, "task-succeeded") and not events.of(res.id, "task-failed")
        assert redis.Redis(host=REDIS_HOST, port=REDIS_PORT).lrange(key, 0, -1) == []
        native.workers[0].wait_for_log(f"task {res.id} was cancelled; its message is dropped", 10)
    finally:
        plain.close()


def test_plain_message_held_by_a_worker_restarted_runs_once(native: Cluster) -> None:
    """The worker holding a plain message for its countdown stops (warm shutdown: Celery puts the
    message back) and starts again under the same name: the message is held again, and when due it
    runs once, as the attempt its record was made for.  (Last in this module: it restarts the
    module's worker.)"""
    plain = Celery(broker=broker_url(native), backend=f"celery_ext://{native.config_path}")
    try:
        key = unique("held-restart:")
        res = plain.send_task("record", kwargs={"key": key, "value": "ran"}, countdown=8)
        first = held_record(native, res.id)
        w = native.workers[0]
        w.stop()
        w.start()
        w.wait_for_log(f"Task record[{res.id}] received", 30)
        res.get(timeout=40)
        done = native.manager.get(res.id)
        assert done.status is TaskStatus.SUCCEEDED and done.attempt == 1 and done.run == 1
        assert done.created_at == first.created_at and done.queued_at == first.queued_at
        assert redis.Redis(host=REDIS_HOST, port=REDIS_PORT).lrange(key, 0, -1) == [b"ran"]
    finally:
        plain.close()
