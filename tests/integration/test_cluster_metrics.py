"""Producers' counts reach Prometheus: summed in Redis, exported by the scheduler leader only.

Real processes: ``celery-ext submit`` processes, a ``celery-ext api`` process, this process's
TaskManager, a worker and two ``celery -A celery_ext scheduler`` processes, each scraped over HTTP.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import redis
import yaml

from celery_ext.metrics.cluster import ClusterCounters
from tests.conftest import TEST_TASKS
from tests.integration.test_api import ApiProcess
from tests.support.private import PrivateRedis
from tests.support.schedulers import SchedulerProcess
from tests.support.scrape import free_port, poll, scrape
from tests.support.services import unique
from tests.support.workers import subprocess_env, write_config

pytestmark = pytest.mark.timeout(300)
CREATED = "celery_ext_task_created_total"


def created(port: int) -> dict[str, float] | None:
    """``{task_type: count}`` of one scrape; None while nothing listens on ``port``."""
    try:
        samples = scrape(port)
    except OSError:
        return None
    return {dict(labels)["task_type"]: value for (name, labels), value in samples.items() if name == CREATED}


def cli_submits(config: Any, n: int, task_type: str = "echo") -> None:
    """``n`` separate ``celery-ext submit`` processes, at the same time."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "celery_ext.cli", "--config", str(config), "submit", task_type, "{}", "--json"],
            cwd=config.parent,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(n)
    ]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()


def two_schedulers(make_cluster: Any) -> tuple[Any, list[int], SchedulerProcess, SchedulerProcess]:
    """A cluster with a worker and two schedulers, the first leading; the metrics ports of the
    worker, the first and the second scheduler."""
    ports = [free_port(), free_port(), free_port()]
    c = make_cluster(
        executors=TEST_TASKS,
        plugins=[
            {
                "name": "metrics",
                "config": {"prometheus_port": ports[0], "scheduler_port": ports[1], "sample_interval": 0.5},
            }
        ],
    )
    # The second scheduler of the same cluster, its endpoint on another port.
    other = c.tmp_path / "b"
    other.mkdir()
    data_b = copy.deepcopy(c.data)
    data_b["plugins"][0]["config"]["scheduler_port"] = ports[2]
    b_config = SimpleNamespace(tmp_path=other, config_path=write_config(other, data_b))
    a = SchedulerProcess(c).start()
    a.wait_for_log("is the leader")
    b = SchedulerProcess(b_config).start()  # type: ignore[arg-type]
    c.worker()
    poll(lambda: created(ports[2]) is not None and created(ports[0]) is not None, 60, "the endpoints")
    return c, ports, a, b


@pytest.mark.slow
def test_task_created_total_counts_every_producer_once_across_scheduler_restarts(make_cluster) -> None:
    c, (worker_port, port_a, port_b), a, b = two_schedulers(make_cluster)
    api = ApiProcess(c)
    try:
        cli_submits(c.config_path, 4)
        with httpx.Client(base_url=api.url, timeout=30) as client:
            for _ in range(5):
                r = client.post("/tasks", json={"task_type": "chatty", "payload": {"lines": 1}})
                assert r.status_code == 201, r.text
        for _ in range(6):
            c.manager.submit("echo", {})
        expected = {"echo": 10.0, "chatty": 5.0}  # 4 CLI + 6 here; 5 by the API

        poll(lambda: created(port_a) == expected, 30, f"{expected} on the leader: {created(port_a)}")
        # Exported once: not by the standby scheduler, not by the worker (which counts nothing
        # itself now), so that sum() over every scraped target is the cluster's count.
        assert created(port_b) == {}
        assert created(worker_port) == {}

        # The exporting process dies: the standby takes over and goes on from the cluster's
        # count (neither 0 nor doubled); a restarted scheduler stands by and exports nothing.
        a.stop(signal.SIGKILL)
        poll(lambda: created(port_b) == expected, 60, f"{expected} on the new leader: {created(port_b)}")
        a = SchedulerProcess(c).start()
        poll(lambda: created(port_a) is not None, 60, "the restarted scheduler's endpoint")
        assert created(port_a) == {}
        cli_submits(c.config_path, 3)
        expected["echo"] += 3
        poll(lambda: created(port_b) == expected, 30, f"{expected} after the restart: {created(port_b)}")
        assert created(port_a) == {}

        # The restarted one leads in turn: the same count, from its endpoint.
        b.stop()
        poll(lambda: created(port_a) == expected, 60, f"{expected} on the restarted leader: {created(port_a)}")
        assert created(port_b) is None  # gone
    finally:
        api.stop()
        a.stop()
        b.stop()


PROMETHEUS = Path("/opt/prometheus-deb/usr/bin/prometheus")  # .ci/run unpacks Debian's package there


@pytest.mark.slow
def test_a_real_prometheus_sums_every_target_to_the_clusters_count(make_cluster, tmp_path: Path) -> None:
    """Prometheus scrapes the worker and both schedulers: sum() over them is the number of tasks
    submitted, before and after the exporting scheduler is killed."""
    if not PROMETHEUS.exists():
        pytest.skip("no prometheus binary (apt-get download prometheus; dpkg-deb -x ... /opt/prometheus-deb)")
    c, ports, a, b = two_schedulers(make_cluster)
    web = free_port()
    config = {
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [
            {"job_name": "celery_ext", "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in ports]}]}
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    with (tmp_path / "prometheus.log").open("wb") as log:
        prometheus = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{web}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def query(expr: str) -> list[dict[str, Any]]:
        try:
            r = httpx.get(f"http://127.0.0.1:{web}/api/v1/query", params={"query": expr}, timeout=5)
        except httpx.TransportError:
            return []
        return r.json()["data"]["result"] if r.status_code == 200 else []  # type: ignore[no-any-return]

    def total() -> float | None:
        result = query("sum(celery_ext_task_created_total)")
        return float(result[0]["value"][1]) if result else None

    try:
        poll(lambda: len(query("up == 1")) == 3, 90, "prometheus scraping the three targets")
        cli_submits(c.config_path, 2)
        for _ in range(3):
            c.manager.submit("echo", {})
        poll(lambda: total() == 5, 60, f"sum() of 5 in prometheus: {total()}")
        [series] = query("celery_ext_task_created_total")  # one series, from the leader
        assert series["metric"]["instance"] == f"127.0.0.1:{ports[1]}"

        a.stop(signal.SIGKILL)  # its series goes stale; the new leader's carries the same count
        poll(
            lambda: (
                [s["metric"]["instance"] for s in query("celery_ext_task_created_total")] == [f"127.0.0.1:{ports[2]}"]
            ),
            90,
            "the series from the new leader only",
        )
        assert total() == 5
        c.manager.submit("echo", {})
        poll(lambda: total() == 6, 60, f"sum() of 6 in prometheus: {total()}")
    finally:
        prometheus.terminate()
        prometheus.wait(30)
        a.stop()
        b.stop()


def test_a_worker_whose_scheduler_thread_leads_exports_the_clusters_count(make_cluster) -> None:
    port = free_port()
    c = make_cluster(
        executors=TEST_TASKS,
        scheduler={"in_worker": True},
        plugins=[{"name": "metrics", "config": {"prometheus_port": port}}],
    )
    w = c.worker()
    w.wait_for_log("is the leader", 60)
    cli_submits(c.config_path, 1)
    for _ in range(2):
        c.manager.submit("echo", {})
    poll(lambda: created(port) == {"echo": 3.0}, 30, f"3 created on the worker's endpoint: {created(port)}")


def test_counts_are_batched_kept_through_a_redis_outage_and_never_applied_twice(private_redis) -> None:
    server: PrivateRedis = private_redis
    counters = ClusterCounters.from_url(server.url, unique("m"))
    counters.FLUSH_DELAY = 3600.0  # this test flushes by hand
    for _ in range(5):
        counters.inc("task_created", ("echo",))
    counters.inc("task_created", ("other type",), 2)
    assert counters.totals("task_created") == {}  # not on the submit path
    assert counters.flush()
    assert counters.totals("task_created") == {("echo",): 5, ("other type",): 2}

    # A batch applied whose reply was lost is retried under its number: applied once.
    counters.inc("task_created", ("echo",))
    with counters._lock:
        counters._seq += 1
        counters._batch, counters._pending = (counters._seq, counters._pending), {}
    batch = counters._batch
    assert counters._write()
    counters._batch = batch  # as if the reply had not arrived
    assert counters._write()
    assert counters.totals("task_created") == {("echo",): 6, ("other type",): 2}

    # Redis away: the counts stay in the process and are written when it is back.
    counters.inc("task_created", ("echo",), 3)
    server.kill()
    assert counters.flush() is False
    counters.inc("task_created", ("echo",))
    server.start()  # an empty Redis (no persistence)
    assert counters.flush()
    assert counters.totals("task_created") == {("echo",): 4}


def test_a_forked_child_does_not_write_its_parents_counts_again(redis_url) -> None:
    app = unique("m")
    counters = ClusterCounters.from_url(redis_url, app)
    counters.FLUSH_DELAY = 3600.0
    counters.inc("task_created", ("echo",), 2)
    pid = os.fork()
    if pid == 0:  # the child: counts once, writes, and leaves without the parent's exit handlers
        code = 1
        try:
            counters.inc("task_created", ("echo",))
            code = 0 if counters.flush() else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert counters.flush()
    assert counters.totals("task_created") == {("echo",): 3}
    redis.Redis.from_url(redis_url).delete(counters.key("task_created"))
