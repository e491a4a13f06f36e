"""Shared balancer state with real processes (issue 11): three workers of weights 1, 2 and 3, and
120 tasks each submitted by its own ``celery-ext submit`` process.  Every producer lives for one
decision, so only state shared by the cluster can give the configured split."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from celery_ext.model import TaskStatus
from tests.conftest import Cluster, cluster_data, storage_section
from tests.support.services import REDIS_HOST, REDIS_PORT, require, unique
from tests.support.workers import subprocess_env, write_config

WEIGHTS = {"w1": 1, "w2": 2, "w3": 3}
TASKS = 120
PARALLEL = 8  # submit processes at a time


@pytest.fixture(scope="module")
def weighted(tmp_path_factory: pytest.TempPathFactory, database_urls: dict[str, str]) -> Iterator[Cluster]:
    require("Redis", REDIS_HOST, REDIS_PORT)
    directory = tmp_path_factory.mktemp("shared_routing")
    data = cluster_data(
        unique("ce"),
        f"redis://{REDIS_HOST}:{REDIS_PORT}/0",
        storage_section("sqlite", database_urls),
        {"worker": {"heartbeat_interval": 0.5}},
    )
    cluster = Cluster(directory, data)
    cluster.hosts = {}  # type: ignore[attr-defined]
    for name, weight in WEIGHTS.items():
        # Threads pool, 4 slots: capacity never binds for echo tasks, so the split is the strategy's.
        w = cluster.worker(
            hostname=f"{name}-{unique('')}@%h", concurrency=4, pool="threads", extra_args=["--weight", str(weight)]
        )
        cluster.hosts[w.hostname.split("@")[0]] = name  # type: ignore[attr-defined]
    yield cluster
    cluster.close()


def submit_all(cluster: Cluster, strategy: str) -> Counter[str]:
    config = write_config(
        cluster.tmp_path, {**cluster.data, "scheduler": {"load_balance_strategy": strategy}}, f"{strategy}.yaml"
    )
    cli = shutil.which("celery-ext", path=str(Path(__import__("sys").executable).parent)) or "celery-ext"
    env = subprocess_env()

    def submit(i: int) -> str:
        out = subprocess.run(
            [cli, "--config", str(config), "submit", "echo", f'{{"i": {i}}}'],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=cluster.tmp_path,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    with ThreadPoolExecutor(PARALLEL) as pool:
        ids = list(pool.map(submit, range(TASKS)))
    assert len(set(ids)) == TASKS
    done = [cluster.manager.wait(i, 60) for i in ids]
    assert {t.status for t in done} == {TaskStatus.SUCCEEDED}
    by_name = Counter(cluster.hosts[t.worker_id.split("@")[0]] for t in done)  # type: ignore[attr-defined]
    print(f"{strategy}: {TASKS} submit processes -> {dict(sorted(by_name.items()))}")
    return by_name


def test_weighted_round_robin_over_120_submit_processes(weighted: Cluster) -> None:
    counts = submit_all(weighted, "weighted_round_robin")
    for name, weight in WEIGHTS.items():
        assert abs(counts[name] - TASKS * weight / 6) <= 5, counts


@pytest.mark.slow
def test_round_robin_over_120_submit_processes(weighted: Cluster) -> None:
    counts = submit_all(weighted, "round_robin")
    for name in WEIGHTS:
        assert abs(counts[name] - TASKS / 3) <= 5, counts


def test_a_strategy_change_in_config_yaml_reaches_a_running_producer(weighted: Cluster) -> None:
    """Issue 11 item 2 (polling): the workers' config.yaml switches to weighted_round_robin while a
    long-running producer (this process, started on least_task) submits; the workers reload and
    publish it, and the producer follows at its next registry read."""
    from tests.integration.test_routing_failover import one_at_a_time

    rt = weighted.runtime
    router = rt.router
    one_at_a_time(rt, rt.manager.submit("echo", {}))  # routing: the producer has read the registry
    assert type(router.balancer).__name__ == "LeastTaskBalancer"
    original = weighted.config_path.read_text()
    changed = {**weighted.data, "scheduler": {"load_balance_strategy": "weighted_round_robin"}}
    t0 = time.monotonic()
    write_config(weighted.tmp_path, changed)
    try:
        while type(router.balancer).__name__ != "WeightedRoundRobinBalancer":
            # Bound: the workers' file poll (1 s) + their reload + the producer's routing_cache (200 ms).
            assert time.monotonic() - t0 < 5, "the producer never followed the new strategy"
            router.snapshot()
            time.sleep(0.05)
        followed = time.monotonic() - t0
        counts = Counter(
            weighted.hosts[
                one_at_a_time(rt, rt.manager.submit("echo", {"i": i})).worker_id.split("@")[0]  # type: ignore[attr-defined]
            ]
            for i in range(60)
        )
        print(f"strategy change followed after {followed:.2f}s; then {dict(sorted(counts.items()))}")
        for name, weight in WEIGHTS.items():
            assert abs(counts[name] - 60 * weight / 6) <= 3, counts
    finally:
        weighted.config_path.write_text(original)
