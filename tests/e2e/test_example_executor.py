"""The README's worked example: a third-party executor package, pip-installed, run by a real worker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from celery_ext.model import TaskStatus
from celery_ext.registry import EXECUTORS

EXAMPLE = Path(__file__).parents[2] / "examples" / "greeting_executor"


def test_entry_point_executor_runs_in_a_real_worker(make_cluster, tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", str(EXAMPLE)],
        check=True,
        cwd=tmp_path,
    )
    assert "greeting" in EXECUTORS.known()
    c = make_cluster(executors=[{"type": "python"}, {"type": "greeting", "config": {"greeting": "Hi"}}])
    c.worker()
    m = c.manager
    done = m.wait(m.submit("greet", {"name": "Ada"}).task_id, 30)
    assert done.status is TaskStatus.SUCCEEDED and done.result == "Hi, Ada!"
    assert [ln.message for ln in m.logs(done.task_id)] == ["celery_ext_greeting: greeting Ada"]
    bad = m.wait(m.submit("greet", {"nam": "x"}).task_id, 30)
    assert bad.status is TaskStatus.FAILED and bad.error.reason == "invalid_payload"
    assert "name" in bad.error.message
