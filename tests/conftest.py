"""Fixtures: real Redis, PostgreSQL and MariaDB, and real worker processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_ext.config import parse_config
from celery_ext.factory import Runtime, create_app
from celery_ext.model import Task, TaskStatus
from celery_ext.runtime import runtime_of
from tests.support.httpserver import server  # noqa: F401 - fixture (a test HTTP server per module)
from tests.support.private import (
    private_postgres,  # noqa: F401 - fixture (a PostgreSQL a test may stop)
    private_redis,  # noqa: F401 - fixture (a Redis a test may kill)
)
from tests.support.scrape import poll
from tests.support.services import REDIS_HOST, REDIS_PORT, create_database, drop_database, require, unique
from tests.support.workers import WorkerProcess, write_config

STORAGE_KINDS = ["sqlite", "postgresql", "mysql"]

# The harness and pytest plugins that run Celery's own suite (run by integration/test_celery_canvas_suite.py).
collect_ignore = ["celery_suite"]


@pytest.fixture(scope="session")
def database_urls() -> Iterator[dict[str, str]]:
    """One fresh PostgreSQL and one fresh MariaDB database for the whole session, made lazily."""
    made: dict[str, str] = {}

    class Lazy(dict[str, str]):
        def __missing__(self, kind: str) -> str:
            made[kind] = create_database(kind)
            self[kind] = made[kind]
            return made[kind]

    yield Lazy()
    for kind, url in made.items():
        drop_database(kind, url)


@pytest.fixture
def redis_url() -> str:
    require("Redis", REDIS_HOST, REDIS_PORT)
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/0"


def storage_section(kind: str | dict[str, Any], database_urls: dict[str, str]) -> dict[str, Any]:
    if isinstance(kind, dict):  # a whole storage section (a private server's)
        return kind
    if kind == "sqlite":
        return {"type": "sqlite", "config": {}}
    return {"type": kind, "config": {"url": database_urls[kind]}}


@pytest.fixture(params=STORAGE_KINDS)
def storage_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Cluster:
    """A config file in a temp dir, an in-process producer runtime, and worker processes on it."""

    def __init__(self, tmp_path: Path, data: dict[str, Any]) -> None:
        self.tmp_path = tmp_path
        self.data = data
        self.config_path = write_config(tmp_path, data)
        self.workers: list[WorkerProcess] = []
        self._runtime: Runtime | None = None

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            config = parse_config(self.data, source=str(self.config_path))
            self._runtime = runtime_of(create_app(config))
        return self._runtime

    @property
    def manager(self) -> Any:
        return self.runtime.manager

    def worker(self, **kwargs: Any) -> WorkerProcess:
        w = WorkerProcess(self.config_path, **kwargs)
        self.workers.append(w)
        return w.start()

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        if self._runtime is not None:
            self._runtime.storage.close()


def busy_worker(c: Cluster) -> list[Task]:
    """Both pool processes of the cluster's one worker (``-c 2``, ``TEST_TASKS``) running a 3 s
    task: what is sent now waits in the broker (prefetch 1), where a revoke or an expiry finds it
    before a worker starts it."""
    m = c.manager
    busy = [m.submit("talk_then_wait", {"seconds": 3}) for _ in range(2)]
    poll(lambda: all(m.get(t.task_id).status is TaskStatus.RUNNING for t in busy), 20, "both pool processes busy")
    return busy


def cluster_data(name: str, redis_url: str, storage: dict[str, Any], sections: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {
        "app": {"name": name, "log_level": "INFO"},
        "broker": {"url": redis_url},
        "worker": {"capacity": 2, "retry_backoff": 0.1, "retry_backoff_max": 1, "retry_jitter": False},
        "storage": storage,
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[CALL_FAILED] = report.failed
    return report


CALL_FAILED = pytest.StashKey[bool]()


def print_worker_state(request: pytest.FixtureRequest, clusters: list[Cluster]) -> None:
    """After a failed test: each worker's log tail, and what every live worker process was doing
    (see tests/support/sitehook)."""
    if not request.node.stash.get(CALL_FAILED, False):
        return
    for cluster in clusters:
        for w in cluster.workers:
            print(f"--- log of worker {w.hostname} (last lines) ---\n{w.log()[-6000:]}")
            pids = w.process_ids()
            stacks = w.stacks()
            if stacks:
                print(f"--- stacks of worker {w.hostname} (pids {pids}) ---\n{stacks[-20000:]}")


@pytest.fixture
def make_cluster(
    request: pytest.FixtureRequest, tmp_path: Path, redis_url: str, database_urls: dict[str, str]
) -> Iterator[Callable[..., Cluster]]:
    """``make_cluster(storage="sqlite", **sections)``: a fresh config (unique queue names) in tmp_path."""
    clusters: list[Cluster] = []

    def make(storage: str | dict[str, Any] = "sqlite", **sections: Any) -> Cluster:
        directory = tmp_path / f"c{len(clusters)}"
        directory.mkdir()
        data = cluster_data(unique("ce"), redis_url, storage_section(storage, database_urls), sections)
        cluster = Cluster(directory, data)
        clusters.append(cluster)
        return cluster

    yield make
    print_worker_state(request, clusters)
    for cluster in clusters:
        cluster.close()


TEST_TASKS = [{"type": "python", "config": {"modules": ["tests.support.tasks"]}}]


def module_cluster(
    tmp_path_factory: pytest.TempPathFactory, database_urls: dict[str, str], name: str, executors: list[dict[str, Any]]
) -> Iterator[Cluster]:
    """For a module-scoped fixture: one SQLite-backed cluster with one running worker."""
    require("Redis", REDIS_HOST, REDIS_PORT)
    data = cluster_data(
        unique("ce"),
        f"redis://{REDIS_HOST}:{REDIS_PORT}/0",
        storage_section("sqlite", database_urls),
        {"executors": executors},
    )
    cluster = Cluster(tmp_path_factory.mktemp(name), data)
    cluster.worker()
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory, database_urls: dict[str, str]) -> Iterator[Cluster]:
    """One SQLite-backed cluster with a running worker, shared by the tests of a module."""
    yield from module_cluster(tmp_path_factory, database_urls, "shared", TEST_TASKS)
