"""The log spool across a real storage outage: a MongoDB wire server (nx-27017) that is stopped
and started again on the same port."""

from __future__ import annotations

from pathlib import Path

from celery_ext.model import TaskLog, utcnow
from celery_ext.storage.mongo import MongoStorage
from celery_ext.storage.spool import Spool
from tests.support.mongo import MongoServer


def lines(task_id: str, start: int, n: int) -> list[TaskLog]:
    return [TaskLog(task_id, 1, utcnow(), "INFO", f"line {i}") for i in range(start, start + n)]


def test_lines_written_during_an_outage_are_spooled_and_flushed_in_order(tmp_path: Path) -> None:
    server = MongoServer(tmp_path).start()
    try:
        storage = MongoStorage.from_config(
            "mongodb", {"uri": f"{server.url}/spool", "server_selection_timeout": 0.3}, tmp_path
        )
        spool = Spool(storage.logs.append)
        spool.submit(lines("a", 0, 3))  # store up: written at once
        assert spool.pending_lines == 0 and len(storage.logs.list("a")) == 3

        port = server.port
        server.stop()
        spool.submit(lines("a", 3, 4))
        spool.submit(lines("b", 0, 2))
        spool.submit(lines("a", 7, 3))
        assert spool.pending_lines == 9  # returned at once: the caller (a task) is not held
        assert not spool.flush(0.5)

        server.start(port=port)  # in-memory: it comes back empty
        assert spool.flush(30)
        assert [ln.message for ln in storage.logs.list("a")] == [f"line {i}" for i in range(3, 10)]
        assert [ln.message for ln in storage.logs.list("b")] == ["line 0", "line 1"]
        spool.submit(lines("a", 10, 1))  # back to direct writes
        assert spool.pending_lines == 0
        storage.close()
    finally:
        server.stop()
