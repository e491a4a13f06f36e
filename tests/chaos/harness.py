"""The chaos harness: a cluster on a private Redis and a private PostgreSQL database, ``ledger``
tasks (tests/chaos/ledger.py), a fault, and the counts that say what the fault did.

A scenario submits its tasks, waits until the process it is about to fail runs some of them,
injects the fault through ``fault()`` (which notes its time and the tasks in flight on the failed
processes), then ``settle()``s: waits until every accepted task is terminal or the deadline passes.
``figures()`` then counts, from the records and the ledger file:

- accepted, succeeded, failed (terminal but not succeeded, with their reasons);
- lost: accepted, and after the deadline without a record, or not terminal and never started
  (queued forever: the work will not happen);
- stuck: not terminal after the deadline (lost ones included);
- doubled: ids with more than one ``start`` line; completed_twice: more than one ``end`` line;
- in_flight: the tasks the failed processes were running at the fault (the bound on doubled);
  cut: those of them whose run there never reached its end;
- recovery: ``redispatch_s``, fault to the first record of a task in flight seen under a new
  dispatch token (sampled every 0.2 s from the fault on, by a thread); ``rerun_s``, fault to the first new ``start`` of
  such a task (behind the backlog of the queue it went to); ``recovered_s``, fault to the last of
  those tasks terminal again; ``settled_s``, fault to the last accepted task terminal.

``record()`` prints one line per scenario and appends it to ``$CELERY_EXT_CHAOS_RESULTS`` (default
tests/chaos/results/chaos.jsonl), whence docs/reliability.md's table comes.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from celery_ext.model import TaskStatus
from tests.chaos.ledger import LEDGER_ENV
from tests.conftest import Cluster, cluster_data
from tests.support.private import PrivatePostgres, PrivateRedis
from tests.support.schedulers import SchedulerProcess
from tests.support.services import unique
from tests.support.workers import WorkerProcess

LEDGER_TASKS = [{"type": "python", "config": {"modules": ["tests.chaos.ledger"]}}]
RESULTS_ENV = "CELERY_EXT_CHAOS_RESULTS"
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "chaos.jsonl"
#: Tuned settings where default figures are not the point: faster heartbeats, leases and rounds.
TUNED: dict[str, Any] = {
    "worker": {"heartbeat_interval": 0.5, "task_lease": 3},
    "scheduler": {"interval": 0.5, "leader_lease": 1.5},
}


@dataclass(frozen=True)
class Line:
    kind: str  # start or end
    task_id: str
    pid: int
    at: float


@dataclass
class Figures:
    scenario: str
    settings: str
    accepted: int = 0
    succeeded: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    stuck: int = 0
    doubled: int = 0
    completed_twice: int = 0
    in_flight: int = 0
    cut: int = 0
    redispatch_s: float | None = None
    rerun_s: float | None = None
    recovered_s: float | None = None
    settled_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        def s(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f}s"

        return (
            f"chaos {self.scenario} [{self.settings}]: accepted {self.accepted}, succeeded {self.succeeded}, "
            f"failed {sum(self.failed.values())}, lost {self.lost}, stuck {self.stuck}, doubled {self.doubled} "
            f"(completed twice {self.completed_twice}; in flight at the fault {self.in_flight}, cut {self.cut}), "
            f"re-dispatch {s(self.redispatch_s)}, re-run {s(self.rerun_s)}, "
            f"recovered {s(self.recovered_s)}, settled {s(self.settled_s)}"
            + "".join(f", {k} {v}" for k, v in self.extra.items())
        )


class Chaos:
    def __init__(
        self,
        scenario: str,
        tmp_path: Path,
        redis: PrivateRedis,
        pg: PrivatePostgres,
        *,
        settings: str = "tuned",
        **sections: Any,
    ) -> None:
        self.scenario, self.settings = scenario, settings
        self.redis, self.pg = redis, pg
        database = pg.create_database(unique("chaos_"))
        if settings == "tuned":
            for key, value in TUNED.items():
                sections[key] = {**value, **sections.get(key, {})}
        data = cluster_data(
            unique("ce"),
            redis.url,
            {"type": "postgresql", "config": {"url": database, "connect_timeout": 2}},
            {"executors": LEDGER_TASKS, **sections},
        )
        self.cluster = Cluster(tmp_path, data)
        self.cluster.runtime.storage.migrate()
        self.ledger_path = tmp_path / "ledger.txt"
        self.ledger_path.touch()
        self.schedulers: list[SchedulerProcess] = []
        self.accepted: list[str] = []
        self.fault_at: float | None = None
        self.in_flight: set[str] = set()
        self._pids: set[int] = set()  # the failed processes
        self._tokens: dict[str, str | None] = {}  # the in-flight tasks' dispatch tokens at the fault
        self._redispatched_at: float | None = None
        self._watching = threading.Event()
        self.extra: dict[str, Any] = {}

    # --- processes ------------------------------------------------------------------------

    def worker(self, **kwargs: Any) -> WorkerProcess:
        return self.cluster.worker(env={LEDGER_ENV: str(self.ledger_path)}, **kwargs)

    def scheduler(self, lead: bool = True) -> SchedulerProcess:
        """A scheduler process, once it leads (``lead``) or has started: it takes a while to
        start on a busy machine, and a fault before that would measure its start-up."""
        s = SchedulerProcess(self.cluster).start()
        self.schedulers.append(s)
        s.wait_for_log("is the leader" if lead else "started (interval", 120)
        return s

    def close(self) -> None:
        self._watching.clear()
        for s in self.schedulers:
            if s.proc is not None and s.proc.poll() is None:
                s.stop()
        self.cluster.close()

    # --- work -----------------------------------------------------------------------------

    def submit(self, n: int, seconds: float, **options: Any) -> list[str]:
        options.setdefault("max_retries", 5)
        specs = [{"task_type": "ledger", "payload": {"seconds": seconds}, **options} for _ in range(n)]
        ids = [t.task_id for t in self.cluster.manager.submit_many(specs)]
        self.accepted += ids
        return ids

    def lines(self) -> list[Line]:
        out = []
        for text in self.ledger_path.read_text().splitlines():
            kind, task_id, pid, at = text.split()
            out.append(Line(kind, task_id, int(pid), float(at)))
        return out

    def running(self, pids: set[int] | None = None) -> set[str]:
        """Ids whose latest run (by ``pids``, if given) started and has not ended."""
        open_runs: dict[tuple[str, int], int] = {}
        for ln in self.lines():
            key = (ln.task_id, ln.pid)
            open_runs[key] = open_runs.get(key, 0) + (1 if ln.kind == "start" else -1)
        return {tid for (tid, pid), n in open_runs.items() if n > 0 and (pids is None or pid in pids)}

    def wait_running(self, pids: set[int] | None, count: int = 1, timeout: float = 60.0) -> set[str]:
        deadline = time.monotonic() + timeout
        while len(found := self.running(pids)) < count:
            assert time.monotonic() < deadline, f"never {count} task(s) running on {pids}: {self.lines()}"
            time.sleep(0.05)
        return found

    def fault(self, inject: Callable[[], object], pids: set[int] | None = None) -> float:
        """Inject the fault (``inject()``), noting its time and the tasks in flight on the
        processes it fails (``pids``; any process for a fault of a server): those running just
        before it, and those still running once it is in (one may start while it goes in)."""
        before = self.running(pids)
        self._tokens = {tid: self._token(tid) for tid in before}
        self.fault_at = time.time()
        inject()
        after = self.running(pids)
        self.in_flight = before | after
        self._tokens.update({tid: self._token(tid) for tid in after - before})
        self._tokens = {tid: token for tid, token in self._tokens.items() if token is not None}
        self._pids = pids if pids is not None else {ln.pid for ln in self.lines() if ln.task_id in self.in_flight}
        if self._tokens:
            self._watching.set()
            threading.Thread(target=self._watch, name="chaos-watch", daemon=True).start()
        return self.fault_at

    def _token(self, task_id: str) -> str | None:
        """The record's dispatch token; None when storage is away (the fault took it)."""
        try:
            record = self.cluster.runtime.storage.tasks.get(task_id)
        except Exception:  # noqa: BLE001
            return None
        return record.dispatch_token if record is not None else None

    def _watch(self) -> None:
        """Note when a task in flight at the fault is first seen under a new dispatch token."""
        storage = self.cluster.runtime.storage
        while self._watching.is_set() and self._redispatched_at is None:
            try:
                for tid, token in self._tokens.items():
                    record = storage.tasks.get(tid)
                    if record is not None and record.dispatch_token != token:
                        self._redispatched_at = time.time()
                        return
            except Exception:  # noqa: BLE001 - storage down during the fault
                pass
            time.sleep(0.2)

    def statuses(self) -> dict[str, TaskStatus | None]:
        """Each accepted task's status (None: no record); empty while storage is away."""
        try:
            records = {tid: self.cluster.runtime.storage.tasks.get(tid) for tid in self.accepted}
        except Exception:  # noqa: BLE001 - storage down during the fault: not settled yet
            self.cluster.runtime.storage.close()
            return {}
        return {tid: (r.status if r is not None else None) for tid, r in records.items()}

    def settle(self, timeout: float = 120.0) -> bool:
        """Wait until every accepted task is terminal; False if the deadline passed first."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.statuses()
            if st and all(s is not None and s.terminal for s in st.values()):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.25)

    # --- counts ---------------------------------------------------------------------------

    def figures(self) -> Figures:
        self._watching.clear()
        storage = self.cluster.runtime.storage
        records = {tid: storage.tasks.get(tid) for tid in self.accepted}
        lines = self.lines()
        starts: dict[str, list[float]] = {}
        ends: dict[str, int] = {}
        for ln in lines:
            if ln.kind == "start":
                starts.setdefault(ln.task_id, []).append(ln.at)
            else:
                ends[ln.task_id] = ends.get(ln.task_id, 0) + 1
        f = Figures(self.scenario, self.settings, accepted=len(self.accepted), in_flight=len(self.in_flight))
        finished: dict[str, float] = {}
        for tid, r in records.items():
            if r is None or not r.status.terminal:
                f.stuck += 1
                if r is None or tid not in starts:
                    f.lost += 1
                continue
            if r.status is TaskStatus.SUCCEEDED:
                f.succeeded += 1
            else:
                reason = f"{r.status.value}:{r.error.reason if r.error else '-'}"
                f.failed[reason] = f.failed.get(reason, 0) + 1
            if r.finished_at is not None:
                finished[tid] = r.finished_at.timestamp()
        f.doubled = sum(1 for tid in self.accepted if len(starts.get(tid, [])) > 1)
        f.completed_twice = sum(1 for tid in self.accepted if ends.get(tid, 0) > 1)
        ended = {(ln.task_id, ln.pid) for ln in lines if ln.kind == "end"}
        f.cut = sum(1 for tid in self.in_flight if not any((tid, pid) in ended for pid in self._pids))
        t0 = self.fault_at
        if t0 is not None:
            again = [at - t0 for tid in self.in_flight for at in starts.get(tid, []) if at > t0]
            f.rerun_s = min(again) if again else None
            f.redispatch_s = self._redispatched_at - t0 if self._redispatched_at is not None else None
            back = [finished[tid] - t0 for tid in self.in_flight if tid in finished]
            f.recovered_s = max(back) if back and len(back) == len(self.in_flight) else None
            if finished and len(finished) == len(self.accepted):
                f.settled_s = max(finished.values()) - t0
        f.extra = dict(self.extra)
        return f

    def record(self) -> Figures:
        f = self.figures()
        print(f.line())
        path = Path(os.environ.get(RESULTS_ENV) or DEFAULT_RESULTS)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as out:
            out.write(json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **asdict(f)}) + "\n")
        return f

    def check(self, f: Figures, *, doubled_at_most: int = 0, all_succeed: bool = True) -> None:
        """The correctness counts every scenario asserts (timing is reported, not asserted)."""
        detail = f"{f.line()}\nledger:\n" + "\n".join(map(str, self.lines()[-60:]))
        assert f.lost == 0, detail
        assert f.stuck == 0, detail
        assert f.doubled <= doubled_at_most, detail
        if all_succeed:
            assert f.succeeded == f.accepted, detail


def table(path: Path) -> str:
    """The Markdown table of docs/reliability.md from a results file (the last line of each
    scenario and settings)."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for text in path.read_text().splitlines():
        row = json.loads(text)
        latest[(row["scenario"], row["settings"])] = row

    def s(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    out = [
        "| scenario | settings | accepted | succeeded | lost | stuck | in flight | doubled | completed twice "
        "| re-dispatch s | recovered s | settled s | other |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (scenario, settings), r in latest.items():
        other = ", ".join(f"{k} {v}" for k, v in r["extra"].items())
        out.append(
            f"| {scenario} | {settings} | {r['accepted']} | {r['succeeded']} | {r['lost']} | {r['stuck']} "
            f"| {r['in_flight']} | {r['doubled']} | {r['completed_twice']} | {s(r['redispatch_s'])} "
            f"| {s(r['recovered_s'])} | {s(r['settled_s'])} | {other} |"
        )
    return "\n".join(out)


if __name__ == "__main__":  # python -m tests.chaos.harness [results file]: the table for the docs
    import sys

    print(table(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(os.environ.get(RESULTS_ENV) or DEFAULT_RESULTS)))
