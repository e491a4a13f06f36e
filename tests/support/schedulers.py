"""``celery -A celery_ext scheduler`` as a process of a test cluster, with its log."""

from __future__ import annotations

import atexit
import signal
import subprocess
import sys
from datetime import timedelta
from typing import TYPE_CHECKING

from celery_ext.model import Task, TaskStatus, new_id, utcnow
from celery_ext.storage.base import Storage
from tests.support.scrape import poll
from tests.support.services import unique
from tests.support.workers import subprocess_env

if TYPE_CHECKING:
    from tests.conftest import Cluster


class SchedulerProcess:
    def __init__(self, cluster: Cluster, *extra: str) -> None:
        self.log_path = cluster.tmp_path / f"scheduler-{unique('s')}.log"
        self.args = [sys.executable, "-m", "celery", "-A", "celery_ext", "scheduler", "-l", "INFO", *extra]
        self.env = subprocess_env(CELERY_EXT_CONFIG=str(cluster.config_path))
        self.cwd = cluster.tmp_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SchedulerProcess:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.args, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT)
        atexit.register(self._reap)  # a test that failed before stopping it must not leave it running
        return self

    def _reap(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, needle: str, timeout: float = 30.0) -> None:
        def shown() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"scheduler exited:\n{self.log()}"
            return needle in self.log()

        poll(shown, timeout, f"{needle!r} in the scheduler log")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(20)


def leading(among: list[SchedulerProcess]) -> list[SchedulerProcess]:
    return [s for s in among if s.log().count("is the leader") > s.log().count("is no longer the leader")]


def leader_of(schedulers: list[SchedulerProcess], among: list[SchedulerProcess]) -> SchedulerProcess:
    """The one of ``among`` that leads now (waiting out a hand-over in progress)."""
    poll(lambda: len(leading(among)) == 1, 30, f"one leader: {[s.log()[-1500:] for s in schedulers]}")
    return leading(among)[0]


def due_records(storage: Storage, n: int, first: float = -1.0, last: float = -1.0) -> list[str]:
    """``n`` SCHEDULED ``echo`` records written straight to storage (as many producers would
    have), their ``run_at`` spread evenly from now+``first`` to now+``last`` seconds; their ids."""
    now, step = utcnow(), (last - first) / max(1, n - 1)
    tasks = [
        Task(
            task_id=new_id(),
            task_type="echo",
            payload={"i": i},
            status=TaskStatus.SCHEDULED,
            run_at=now + timedelta(seconds=first + i * step),
            created_at=now,
            dispatch_token=new_id(),
        )
        for i in range(n)
    ]
    storage.migrate()
    for i in range(0, n, 5000):
        storage.tasks.create_many(tasks[i : i + 5000])
    return [t.task_id for t in tasks]
