"""A third-party balancer: pip-installed (into a private target dir), found by its entry point,
selected from config, and used for tasks that a real worker runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_ext.errors import ConfigError
from celery_ext.model import TaskStatus
from celery_ext.registry import BALANCERS
from celery_ext.routing.workers import WorkerInfo, direct_queue_name

EXAMPLE = Path(__file__).parents[2] / "examples" / "lowest_id_balancer"
ROUTING_TASKS = [{"type": "python", "config": {"modules": ["tests.support.routing_tasks"]}}]


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    src, site = tmp_path / "src", tmp_path / "site"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(src),
        ],
        check=True,
        cwd=tmp_path,
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p))
    yield site
    for name in [m for m in sys.modules if m.startswith("celery_ext_lowest_id")]:
        del sys.modules[name]


def test_entry_point_balancer_is_selected_from_config_and_routes_real_work(make_cluster, installed) -> None:
    assert "lowest_id" in BALANCERS.known()
    c = make_cluster(executors=ROUTING_TASKS, scheduler={"load_balance_strategy": "lowest_id"})
    router = c.runtime.router
    assert type(router.balancer).__name__ == "LowestIdBalancer"
    # The worker builds the same router: it must find the entry point too.  Room for 8 keeps the
    # real worker the lowest-id candidate even when slot releases lag on a loaded machine.
    w = c.worker(pool="threads", concurrency=8)
    # A registered worker that never consumes: any task routed there would never finish.
    decoy = WorkerInfo(
        id="~decoy", queue=direct_queue_name(router.prefix, "~decoy"), capacity=100, supported_types=("rt_slow",)
    )
    router.registry.heartbeat(decoy, 60, 0)
    router.invalidate()
    m = c.manager
    done = [m.wait(m.submit("rt_slow", {"key": "ep", "seconds": 0}).task_id, 30) for _ in range(5)]
    assert {t.status for t in done} == {TaskStatus.SUCCEEDED}
    assert {t.worker_id for t in done} == {w.hostname.replace("%h", __import__("socket").gethostname())}


def test_balancer_by_module_path_with_settings(make_cluster, installed) -> None:
    c = make_cluster(
        executors=ROUTING_TASKS,
        scheduler={
            "load_balance_strategy": "celery_ext_lowest_id:LowestIdBalancer",
            "load_balance_config": {"prefer": "b"},
        },
    )
    router = c.runtime.router
    for wid in ("a1", "b2", "b1"):
        router.registry.heartbeat(
            WorkerInfo(id=wid, queue=direct_queue_name(router.prefix, wid), capacity=9, supported_types=("rt_slow",)),
            60,
            0,
        )
    assert router("rt_slow", (), {"payload": {}}, {})["queue"] == direct_queue_name(router.prefix, "b1")
    with pytest.raises(ConfigError, match=r"scheduler.load_balance_config.colour: unknown key"):
        make_cluster(
            executors=ROUTING_TASKS,
            scheduler={"load_balance_strategy": "lowest_id", "load_balance_config": {"colour": "red"}},
        ).runtime
