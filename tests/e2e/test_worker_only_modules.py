"""No client has to import the users' task modules (issue 10, item 7).

The config's python executor names ``hidden_tasks``, a module in a directory that only the
worker has on its PYTHONPATH.  The CLI, the REST API and Flower run as their own processes
without it: they start, and submit both the type the config declares (``task_types``) and the
one only the live worker advertises.  The worker validates payloads against the function; a
worker that cannot import the module refuses to start.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from celery_ext.routing.workers import direct_queue_name
from tests.conftest import Cluster, cluster_data, storage_section
from tests.integration.test_api import ApiProcess
from tests.support.flower import FlowerProcess
from tests.support.scrape import poll
from tests.support.services import REDIS_HOST, REDIS_PORT, require, unique
from tests.support.workers import WorkerProcess, subprocess_env, write_config

pytestmark = pytest.mark.timeout(300)
EARLY: list[str] = []  # the task submitted before any worker ran (the tests of this module run in order)

HIDDEN = """
from celery_ext import task_type


@task_type("hidden_greet")
def hidden_greet(name: str, punctuation: str = "!") -> str:
    return f"hello {name}{punctuation}"


@task_type("hidden_add")
def hidden_add(x: int, y: int) -> int:
    return x + y
"""


def python_executor(**config: Any) -> list[dict[str, Any]]:
    return [{"type": "python", "config": {"modules": ["hidden_tasks"], **config}}]


@pytest.fixture(scope="module")
def modules_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("worker_only")
    (where / "hidden_tasks.py").write_text(HIDDEN)
    return where


def worker_env(modules_dir: Path) -> dict[str, str]:
    """The worker's PYTHONPATH: the usual one plus the directory of ``hidden_tasks``."""
    return {"PYTHONPATH": os.pathsep.join([subprocess_env()["PYTHONPATH"], str(modules_dir)])}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, database_urls: dict[str, str]) -> Iterator[Cluster]:
    """No worker yet: the first test submits while none runs."""
    require("Redis", REDIS_HOST, REDIS_PORT)
    data = cluster_data(
        unique("ce"),
        f"redis://{REDIS_HOST}:{REDIS_PORT}/0",
        storage_section("sqlite", database_urls),
        {"executors": python_executor(task_types=["hidden_greet"])},
    )
    c = Cluster(tmp_path_factory.mktemp("clients"), data)
    yield c
    c.close()


def cli(c: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    """``celery-ext`` in its own process, whose PYTHONPATH lacks ``hidden_tasks``."""
    return subprocess.run(
        [sys.executable, "-m", "celery_ext.cli", "--config", str(c.config_path), *args],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=c.config_path.parent,
        env=subprocess_env(),
    )


def record_of(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.stdout, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_client_processes_cannot_import_the_module(cluster: Cluster, modules_dir: Path) -> None:
    probe = [sys.executable, "-c", "import hidden_tasks"]
    assert subprocess.run(probe, capture_output=True, cwd=cluster.tmp_path, env=subprocess_env()).returncode == 1
    assert (
        subprocess.run(
            probe, capture_output=True, cwd=cluster.tmp_path, env={**subprocess_env(), **worker_env(modules_dir)}
        ).returncode
        == 0
    )


def test_without_a_worker_only_declared_types_are_accepted(cluster: Cluster) -> None:
    undeclared = cli(cluster, "submit", "hidden_add", '{"x": 1, "y": 2}')
    assert undeclared.returncode == 2, undeclared.stderr
    assert "unknown task type 'hidden_add'; known types: " in undeclared.stderr
    assert "hidden_greet" in undeclared.stderr.split("known types: ")[1]

    accepted = cli(cluster, "submit", "hidden_greet", '{"name": "early"}')
    assert accepted.returncode == 0, accepted.stderr
    EARLY.append(accepted.stdout.strip())


def test_the_cli_submits_declared_and_advertised_types(cluster: Cluster, modules_dir: Path) -> None:
    cluster.worker(env=worker_env(modules_dir))
    early = cli(cluster, "wait", EARLY[0], "--timeout", "30", "--json")
    assert early.returncode == 0 and record_of(early)["result"] == "hello early!"

    declared = cli(
        cluster,
        "submit",
        "hidden_greet",
        '{"name": "ada", "punctuation": "?"}',
        "--wait",
        "--wait-timeout",
        "30",
        "--json",
    )
    assert declared.returncode == 0, declared.stderr
    assert record_of(declared)["status"] == "succeeded" and record_of(declared)["result"] == "hello ada?"

    # Only the live worker knows hidden_add: the executor defaults of the worker section apply.
    advertised = cli(cluster, "submit", "hidden_add", '{"x": 2, "y": 3}', "--wait", "--wait-timeout", "30", "--json")
    assert advertised.returncode == 0, advertised.stderr
    record = record_of(advertised)
    assert (record["status"], record["result"], record["max_retries"], record["timeout"]) == ("succeeded", 5, 3, None)


def test_advertised_types_are_routed_to_their_queues(cluster: Cluster) -> None:
    """This pytest process cannot import hidden_tasks either: its router still sends hidden_add
    to its shared queue or to the worker's direct queue, never to Celery's default queue."""
    router = cluster.runtime.router
    assert "hidden_add" not in router.task_types and "hidden_add" in router.advertised()
    prefix = cluster.data["app"]["name"]
    worker_queue = direct_queue_name(prefix, cluster.workers[0].hostname.replace("%h", socket.gethostname()))
    route = router("hidden_add", (), {"x": 1, "y": 1}, {})
    assert route is not None and route["queue"] in (f"{prefix}.hidden_add", worker_queue)
    assert router("hidden_nope", (), {}, {}) is None and router("celery.chord_unlock", (), {}, {}) is None


def test_a_payload_that_does_not_fit_fails_in_the_worker_as_invalid_payload(cluster: Cluster) -> None:
    for task_type, payload, problem in [
        ("hidden_greet", '{"nom": "x"}', "missing a required argument: 'name'"),
        ("hidden_add", '{"x": 1, "z": 2}', "missing a required argument: 'y'"),
    ]:
        done = cli(cluster, "submit", task_type, payload, "--wait", "--wait-timeout", "30", "--json")
        assert done.returncode == 1, done.stderr
        record = record_of(done)
        assert record["status"] == "failed" and record["attempt"] == 1
        assert record["error"] == {"reason": "invalid_payload", "message": f"{task_type}: {problem}"}


def test_an_unknown_type_is_refused_listing_declared_and_advertised_types(cluster: Cluster) -> None:
    done = cli(cluster, "submit", "hidden_nope", "{}")
    assert done.returncode == 2 and done.stdout == ""
    known = done.stderr.split("known types: ")[1].strip().split(", ")
    assert {"echo", "sleep", "hidden_greet", "hidden_add"} <= set(known) and known == sorted(known)


def test_the_rest_api_submits_without_the_module(cluster: Cluster) -> None:
    api = ApiProcess(cluster)
    try:
        with httpx.Client(base_url=api.url, timeout=30) as client:
            created = client.post("/tasks", json={"task_type": "hidden_add", "payload": {"x": 20, "y": 22}})
            assert created.status_code == 201, created.text
            task_id = created.json()["task_id"]
            poll(lambda: client.get(f"/tasks/{task_id}").json()["status"] == "succeeded", 30, f"task {task_id}")
            assert client.get(f"/tasks/{task_id}").json()["result"] == 42
            bad = client.post("/tasks", json={"task_type": "hidden_nope"})
            assert bad.status_code == 400 and bad.json()["error"]["code"] == "unknown_task_type"
            assert {"hidden_add", "hidden_greet"} <= set(bad.json()["error"]["known_types"])
    finally:
        api.stop()


def test_flower_starts_and_sends_without_the_module(cluster: Cluster) -> None:
    flower = FlowerProcess(cluster.config_path).start()
    try:
        sent = httpx.post(f"{flower.url}/api/task/send-task/hidden_add", json={"kwargs": {"x": 4, "y": 5}}, timeout=30)
        assert sent.status_code == 200, sent.text
        result = cluster.runtime.celery.AsyncResult(sent.json()["task-id"])
        assert result.get(timeout=30) == 9
        record = cluster.manager.get(result.id)
        assert record.task_type == "hidden_add" and record.payload == {"x": 4, "y": 5}
    finally:
        flower.stop()


def test_a_worker_that_cannot_import_the_module_refuses_to_start(
    cluster: Cluster, modules_dir: Path, tmp_path: Path
) -> None:
    def refused(worker: WorkerProcess) -> str:
        try:
            with pytest.raises(RuntimeError) as info:
                worker.start()
        finally:
            worker.stop()
        return str(info.value)

    assert (
        "celery_ext: cannot start worker: executors[0].config.modules: cannot import 'hidden_tasks': "
        "No module named 'hidden_tasks'"
    ) in refused(WorkerProcess(cluster.config_path))  # a client's PYTHONPATH

    # Declared but registered by no module: it could not run what it would advertise.
    config = write_config(
        tmp_path, {**cluster.data, "executors": python_executor(task_types=["hidden_greet", "hidden_gone"])}
    )
    assert (
        "celery_ext: cannot start worker: executors[0].config.task_types: 'hidden_gone' declared, but no "
        "@task_type function of that name was registered by the modules (hidden_tasks)"
    ) in refused(WorkerProcess(config, env=worker_env(modules_dir)))
