"""Storage outages: a worker refuses to start on an unreachable store (naming it, password hidden);
a store that goes away while tasks run loses no outcome and no log line (real PostgreSQL, slow)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from celery_ext.model import TaskStatus
from tests.support.services import unique
from tests.support.workers import WorkerProcess, write_config

DRIP = [{"type": "python", "config": {"modules": ["tests.support.storage_tasks"]}}]


@pytest.mark.parametrize(
    "storage",
    [
        {"type": "postgresql", "config": {"url": "postgresql://app:s3cret@127.0.0.1:1/tasks", "connect_timeout": 2}},
        {"type": "mysql", "config": {"url": "mysql://app:s3cret@127.0.0.1:1/tasks", "connect_timeout": 2}},
        {"type": "mongodb", "config": {"uri": "mongodb://app:s3cret@127.0.0.1:1/tasks", "server_selection_timeout": 1}},
    ],
    ids=lambda s: s["type"],
)
def test_worker_refuses_to_start_on_unreachable_storage(
    tmp_path: Path, redis_url: str, storage: dict[str, Any]
) -> None:
    config = write_config(
        tmp_path, {"app": {"name": unique("ce")}, "broker": {"url": redis_url}, "storage": storage, "executors": DRIP}
    )
    worker = WorkerProcess(config)
    with pytest.raises(RuntimeError) as info:
        worker.start(timeout=60)
    text = str(info.value)
    assert "cannot start worker" in text and "127.0.0.1:1/tasks" in text, text[-2000:]
    assert "s3cret" not in text
    assert not worker.alive()


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_postgresql_outage_while_tasks_run_loses_nothing(make_cluster: Any, private_postgres: Any) -> None:
    c = make_cluster(
        {"type": "postgresql", "config": {"url": private_postgres.url(), "connect_timeout": 2}}, executors=DRIP
    )
    c.runtime.storage.migrate()
    worker = c.worker(concurrency=2)
    m = c.manager
    tasks = [m.submit("drip", {"lines": 12, "interval": 0.5}) for _ in range(6)]
    _wait(lambda: sum(m.get(t.task_id).status is TaskStatus.RUNNING for t in tasks) >= 2, 60, "tasks running")
    c.runtime.storage.close()  # the test's own connections must not be what keeps working
    try:
        private_postgres.stop()  # this test's own server, never the shared one
        # The outage: long enough to span claims, log flushes and outcome writes.
        time.sleep(10)
    finally:
        private_postgres.start()

    def all_done() -> bool:
        return all(m.get(t.task_id).status.terminal for t in tasks)

    _wait(all_done, 150, "all tasks finished")
    want = [f"tests.storage_tasks: drip {i}" for i in range(12)]

    def drip_lines(task_id: str) -> list[str]:
        return [ln.message for ln in m.logs(task_id) if "drip" in ln.message]

    for t in tasks:
        done = m.get(t.task_id)
        assert done.status is TaskStatus.SUCCEEDED, done
        assert done.result == 12
        # The outcome is written after the spooled lines (one spool, in order); wait all the same.
        _wait(lambda t=t: len(drip_lines(t.task_id)) >= 12, 30, f"log lines of {t.task_id}")
        # Every line written, once, in order (a task re-run after a lost claim would repeat them).
        assert drip_lines(t.task_id) == want
    log = worker.log()
    assert "storage unavailable" in log or "postponed" in log, "the outage was never felt by the worker"
    assert worker.alive()
    after = m.submit("drip", {"lines": 1, "interval": 0})
    assert m.wait(after.task_id, 30).status is TaskStatus.SUCCEEDED
