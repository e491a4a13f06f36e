"""Flower on celery_ext: a real worker, a real ``celery -A celery_ext flower`` and real HTTP.

Item 8: the broker URL keeps its standard scheme (``redis://``, ``redis+socket://`` for the
embedded broker) while kombu runs celery_ext's transport, so Flower's Broker page and
``/api/queues/length`` work and the banners name the real broker.  Then what Flower shows of
celery_ext tasks (the Celery states tell the truth, see the design of issue 10), and Flower's
tasks page rendered by headless Chromium.
"""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_ext.config import parse_config
from celery_ext.model import TaskStatus
from tests.conftest import TEST_TASKS, Cluster, busy_worker, cluster_data, storage_section
from tests.support.flower import FlowerProcess, chromium, require_chromium, running_flower
from tests.support.scrape import poll
from tests.support.services import REDIS_HOST, REDIS_PORT, require, unique
from tests.support.workers import WorkerProcess, write_config

pytestmark = pytest.mark.timeout(240)
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
# How kombu's Connection.as_uri() shows it (Flower's Broker page and banner): a masked password.
REDIS_SHOWN = f"redis://:**@{REDIS_HOST}:{REDIS_PORT}/0"


@pytest.fixture(scope="module")
def flower_cluster(
    tmp_path_factory: pytest.TempPathFactory, database_urls: dict[str, str]
) -> Iterator[tuple[Cluster, FlowerProcess]]:
    """One cluster (SQLite, Redis broker) with a running worker, and Flower watching it."""
    require("Redis", REDIS_HOST, REDIS_PORT)
    data = cluster_data(unique("ce"), REDIS_URL, storage_section("sqlite", database_urls), {"executors": TEST_TASKS})
    cluster = Cluster(tmp_path_factory.mktemp("flower"), data)
    try:
        cluster.worker()
        with running_flower(cluster.config_path) as flower:
            wait_until_flower_sees_events(cluster, flower)
            yield cluster, flower
    finally:
        cluster.close()


def wait_until_flower_sees_events(cluster: Cluster, flower: FlowerProcess, timeout: float = 60.0) -> None:
    """Flower learns of tasks from Celery events, and misses those sent before it listens: probe
    with ``echo`` tasks until one shows up."""
    seen: list[str] = []

    def probe() -> bool:
        seen.append(cluster.manager.submit("echo", {"probe": len(seen)}).task_id)
        for _ in range(10):
            known = flower.tasks()
            if any(task_id in known for task_id in seen):
                return True
            time.sleep(0.2)
        return False

    poll(probe, timeout, f"Flower on {flower.url} to receive task events")


def flower_task(flower: FlowerProcess, task_id: str, states: tuple[str, ...], timeout: float = 45.0) -> dict[str, Any]:
    """The task as ``/api/tasks`` shows it, once its state is one of ``states``."""
    last: dict[str, Any] = {}

    def reached() -> bool:
        nonlocal last
        last = flower.tasks().get(task_id) or {}
        return last.get("state") in states

    try:
        poll(reached, timeout, f"task {task_id} in state {states}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; Flower shows {last}") from None
    return last


def page_count(html: str, queue: str) -> int:
    """The Messages column of ``queue``'s row on the Broker page."""
    found = re.search(rf'<tr id="{re.escape(queue)}">\s*<td>[^<]*</td>\s*<td[^>]*>(\d+)</td>', html)
    assert found, f"no row for {queue} on the Broker page"
    return int(found.group(1))


def queue_lengths(flower: FlowerProcess) -> dict[str, int]:
    response = flower.get("/api/queues/length")
    assert response.status_code == 200, response.text
    return {q["name"]: q["messages"] for q in response.json()["active_queues"]}


# --- item 8: the broker as Flower and the banners see it ----------------------------------------


def test_broker_page_and_queue_lengths(flower_cluster: tuple[Cluster, FlowerProcess]) -> None:
    cluster, flower = flower_cluster
    prefix = cluster.data["app"]["name"]
    page = flower.get("/broker")
    assert page.status_code == 200, page.text
    assert f'<p class="page-description broker-url mt-3">{REDIS_SHOWN}</p>' in page.text
    assert "celery_ext.transport" not in page.text
    assert page_count(page.text, f"{prefix}.echo") >= 0

    lengths = queue_lengths(flower)
    default = cluster.runtime.celery.conf.task_default_queue
    assert {f"{prefix}.echo", f"{prefix}.flaky", default} <= set(lengths), lengths
    assert all(isinstance(n, int) and n >= 0 for n in lengths.values())
    assert f"Broker: {REDIS_SHOWN}" in flower.log()  # Flower's own banner: the app's connection URI


def test_worker_banner_names_the_redis_broker(flower_cluster: tuple[Cluster, FlowerProcess]) -> None:
    cluster, _ = flower_cluster
    log = cluster.workers[0].log()
    assert f"| broker {REDIS_URL} |" in log
    assert "celery_ext.transport:Transport" not in log


@pytest.mark.parametrize("broker", ["redis", "embedded"])
def test_queue_lengths_count_waiting_tasks(tmp_path: Path, database_urls: dict[str, str], broker: str) -> None:
    """No worker: what the producer queues is what ``/api/queues/length`` counts, priority
    sub-queues included; with the embedded default, over its unix socket."""
    require("Redis", REDIS_HOST, REDIS_PORT)
    data = cluster_data(unique("ce"), REDIS_URL, storage_section("sqlite", database_urls), {"executors": TEST_TASKS})
    if broker == "embedded":
        del data["broker"]
    cluster = Cluster(tmp_path, data)
    prefix = data["app"]["name"]
    try:
        expected_url, shown = REDIS_URL, REDIS_SHOWN
        if broker == "embedded":
            expected_url = shown = f"redis+socket://{embedded_socket(cluster)}"
        assert cluster.runtime.broker_url == expected_url
        with running_flower(cluster.config_path) as flower:
            for priority in (0, 4, 9):
                cluster.manager.submit("echo", {"priority": priority}, priority=priority)
            cluster.manager.submit("chatty", {"lines": 1})
            lengths = queue_lengths(flower)
            assert lengths[f"{prefix}.echo"] == 3 and lengths[f"{prefix}.chatty"] == 1, lengths
            assert lengths[f"{prefix}.flaky"] == 0
            page = flower.get("/broker")
            assert page.status_code == 200, page.text
            assert f'<p class="page-description broker-url mt-3">{shown}</p>' in page.text
            assert page_count(page.text, f"{prefix}.echo") == 3 and page_count(page.text, f"{prefix}.chatty") == 1
            assert f"Broker: {shown}" in flower.log()
    finally:
        cluster.close()
        if broker == "embedded":
            from celery_ext.embedded import stop_embedded_redis

            stop_embedded_redis(cluster.config_path.parent / ".celery_ext")


def embedded_socket(cluster: Cluster) -> str:
    from celery_ext.embedded import socket_path

    return str(socket_path(cluster.config_path.parent / ".celery_ext"))  # app.data_dir's default


def test_embedded_worker_banners_name_the_socket(tmp_path: Path) -> None:
    """The embedded default: celery_ext's banner line and Celery's own name the unix socket."""
    config = write_config(tmp_path, {"app": {"name": unique("emb")}, "executors": TEST_TASKS})
    from celery_ext.embedded import socket_path, stop_embedded_redis

    worker = WorkerProcess(config, concurrency=1)
    sock = str(socket_path(tmp_path / ".celery_ext"))
    try:
        worker.start()
        assert f"| broker redis+socket://{sock} |" in worker.log()
        worker.stop()
        out = worker.output()
        assert f"transport:   redis+socket://{sock}" in out, out
        assert "celery_ext.transport" not in out + worker.log()
    finally:
        worker.stop()
        stop_embedded_redis(tmp_path / ".celery_ext")


def test_the_broker_url_keeps_its_scheme_and_the_banner_hides_the_password(tmp_path: Path) -> None:
    from kombu.transport import resolve_transport

    from celery_ext.factory import create_app
    from celery_ext.runtime import runtime_of
    from celery_ext.transport import Transport
    from celery_ext.worker import _redact

    config = parse_config(
        {
            "app": {"name": unique("ce"), "data_dir": str(tmp_path)},
            "broker": {"url": "redis://:s3cret@127.0.0.1:6379/3"},
            "storage": {"type": "sqlite"},
        }
    )
    app = create_app(config)
    assert "broker_transport" not in app.conf.changes  # the scheme decides the transport ...
    assert resolve_transport("redis") is Transport and resolve_transport("rediss") is Transport  # ... celery_ext's
    with app.connection() as conn:
        assert type(conn.transport) is Transport
        assert conn.as_uri() == "redis://:**@127.0.0.1:6379/3"
    assert _redact(runtime_of(app).broker_url) == "redis://:**@127.0.0.1:6379/3"
    runtime_of(app).close()


# --- what Flower shows of celery_ext tasks --------------------------------------------------------


def test_tasks_appear_under_their_type_name(flower_cluster: tuple[Cluster, FlowerProcess]) -> None:
    cluster, flower = flower_cluster
    m = cluster.manager
    echo = m.submit("echo", {"n": 1}).task_id
    chatty = m.submit("chatty", {"lines": 2}).task_id
    assert flower_task(flower, echo, ("SUCCESS", "FAILURE"))["name"] == "echo"
    assert flower_task(flower, chatty, ("SUCCESS", "FAILURE"))["name"] == "chatty"
    assert echo in flower.tasks(taskname="echo") and chatty not in flower.tasks(taskname="echo")
    types = flower.get("/api/task/types").json()["task-types"]
    assert {"echo", "chatty"} <= set(types)


def test_success_shows_the_result(flower_cluster: tuple[Cluster, FlowerProcess]) -> None:
    cluster, flower = flower_cluster
    task_id = cluster.manager.submit("echo", {"hello": "flower", "n": [1, 2]}).task_id
    task = flower_task(flower, task_id, ("SUCCESS", "FAILURE", "REVOKED"))
    assert task["state"] == "SUCCESS", task
    assert task["result"] == repr({"hello": "flower", "n": [1, 2]}), task
    assert task["retries"] == 0, task
    assert task["worker"].split("@")[0] == cluster.workers[0].hostname.split("@")[0], task


def test_failure_shows_the_reason(flower_cluster: tuple[Cluster, FlowerProcess]) -> None:
    cluster, flower = flower_cluster
    task_id = cluster.manager.submit("reject", {"reason": "bad input"}, max_retries=3).task_id
    task = flower_task(flower, task_id, ("SUCCESS", "FAILURE", "REVOKED"))
    assert task["state"] == "FAILURE", task
    assert "TaskFailed" in task["exception"] and "rejected: bad input" in task["exception"], task
    assert task["retries"] == 0  # a permanent error is not retried


def test_retries_are_counted(flower_cluster: tuple[Cluster, FlowerProcess]) -> None:
    cluster, flower = flower_cluster
    m = cluster.manager
    ok = m.submit("flaky", {"key": unique("flaky:"), "fail_times": 2}, max_retries=3).task_id
    task = flower_task(flower, ok, ("SUCCESS", "FAILURE", "REVOKED"))
    assert task["state"] == "SUCCESS" and task["retries"] == 2, task  # the same task id throughout
    assert task["result"] == repr({"runs": 3})

    exhausted = m.submit("flaky", {"key": unique("flaky:"), "fail_times": 10}, max_retries=1).task_id
    task = flower_task(flower, exhausted, ("SUCCESS", "FAILURE", "REVOKED"))
    assert task["state"] == "FAILURE" and task["retries"] == 1, task
    assert "TaskFailed('exception: " in task["exception"] and "planned failure 2" in task["exception"], task
    # The traceback Flower shows is the task's own, with celery_ext's TaskFailed raised from it.
    assert 'tests/support/tasks.py", line 31, in flaky' in task["traceback"], task
    assert "RuntimeError: planned failure 2" in task["traceback"], task


def test_cancelled_task_is_revoked(flower_cluster: tuple[Cluster, FlowerProcess]) -> None:
    cluster, flower = flower_cluster
    m = cluster.manager
    # A countdown message (a longer delay waits in storage, and Flower hears of it only when due).
    task_id = m.submit("echo", {"never": "runs"}, delay=1).task_id
    m.cancel(task_id)
    task = flower_task(flower, task_id, ("SUCCESS", "FAILURE", "REVOKED"))
    assert task["state"] == "REVOKED", task
    assert task["name"] == "echo"


def test_revoke_from_flower_cancels_the_record(flower_cluster: tuple[Cluster, FlowerProcess]) -> None:
    """Flower's Revoke (its API, as its button posts it) of a task waiting in the broker: Flower
    shows REVOKED, and so do the record and ``AsyncResult``."""
    cluster, flower = flower_cluster
    m = cluster.manager
    busy_worker(cluster)
    task_id = m.submit("echo", {"never": "runs"}).task_id
    response = flower.post(f"/api/task/revoke/{task_id}")
    assert response.status_code == 200, response.text
    assert flower_task(flower, task_id, ("SUCCESS", "FAILURE", "REVOKED"))["state"] == "REVOKED"
    assert m.wait(task_id, 30).status is TaskStatus.CANCELLED
    assert cluster.runtime.celery.AsyncResult(task_id).state == "REVOKED"


# --- Flower's tasks page in a real browser ------------------------------------------------------


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", data[:16]
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_tasks_page_in_headless_chromium(flower_cluster: tuple[Cluster, FlowerProcess], tmp_path: Path) -> None:
    require_chromium()
    cluster, flower = flower_cluster
    m = cluster.manager
    ids = {m.submit("echo", {"page": 1}).task_id: "echo", m.submit("chatty", {"lines": 1}).task_id: "chatty"}
    for task_id in ids:
        flower_task(flower, task_id, ("SUCCESS", "FAILURE"))

    dom = chromium(f"{flower.url}/tasks", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-3000:]
    for task_id, name in ids.items():
        assert task_id in dom.stdout, f"{task_id} not on the rendered /tasks page:\n{dom.stdout[-3000:]}"
        assert f">{name}<" in dom.stdout

    failed = m.submit("flaky", {"key": unique("flaky:"), "fail_times": 10}, max_retries=0).task_id
    flower_task(flower, failed, ("FAILURE",))
    page = chromium(f"{flower.url}/task/{failed}", "--dump-dom")
    assert page.returncode == 0, page.stderr[-3000:]
    assert "line 31, in flaky" in page.stdout and "planned failure 1" in page.stdout, page.stdout[-3000:]

    shot = tmp_path / "tasks.png"
    run = chromium(f"{flower.url}/tasks", f"--screenshot={shot}")
    assert run.returncode == 0 and shot.exists(), run.stderr[-3000:]
    data = shot.read_bytes()
    assert png_size(data) == (1280, 900)
    assert len(data) > 20_000, len(data)  # a rendered table, not a blank page
