"""Celery's own canvas integration tests (``t/integration/test_canvas.py`` of the Celery sdist),
run against a bare Celery worker and against a celery_ext worker: celery_ext must not break
what passes on bare Celery.  See tests/celery_suite/run_canvas.py (also runnable by hand)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.services import REDIS_HOST, REDIS_PORT, require

RUN_CANVAS = Path(__file__).resolve().parents[1] / "celery_suite" / "run_canvas.py"
MAX_TIME_PER_SIDE = 1800  # seconds before no further test starts (run_canvas --max-time); bare: ~16 min
TEST_TIMEOUT = 600  # run_canvas --test-timeout (the slowest test of the suite takes ~300 s on bare Celery)

# Tests of the suite that pass on bare Celery and may fail (or error, or not run) on celery_ext.
# Empty until the worker rewrite (issue 10) lands; then list each deliberate difference as
# "test_class::test_name[param]": "why celery_ext behaves differently, on purpose".  Every entry
# must still be a difference (a stale entry fails the test).  Tests that celery_ext *skips* need no
# entry: the suite skips what a non-Redis result backend cannot do (the report counts them).
_CHORD_UNLOCK = (
    "celery_ext's result backend has no native chord join (like Celery's database backend): "
    "Celery's chord_unlock polls the header once a second (result_chord_retry_interval) and "
    "only then fails the body; the test reads the body's state right after get() raised the "
    "member's failure, before that poll. The body's record does end FAILED (parent_failed)."
)
EXPECTED_DIFFERENCES: dict[str, str] = {
    "test_chain::test_header_failure_fails_the_chords_after_it[2]": _CHORD_UNLOCK,
    "test_chain::test_header_failure_fails_the_chords_after_a_group_body": _CHORD_UNLOCK,
    "test_chord::test_chord_error_propagation_with_different_body_types[body is a group]": _CHORD_UNLOCK,
}

# Opt-in: the two sides take 30-40 minutes on the 2-core machine, more than a third of CI's
# budget, so `make test` skips it unless CELERY_EXT_CANVAS_SUITE=1 (the report is made by hand
# with tests/celery_suite/run_canvas.py; figures in docs/celery.md).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("CELERY_EXT_CANVAS_SUITE") != "1",
        reason="Celery's canvas suite runs with CELERY_EXT_CANVAS_SUITE=1 (30-40 min)",
    ),
]


def failing(outcome: str) -> bool:
    """As run_canvas.failing: failed, error (in setup), "<outcome> +teardown", "not run"."""
    return outcome in ("failed", "error", "not run") or outcome.endswith("+teardown")


@pytest.mark.timeout(2 * (MAX_TIME_PER_SIDE + TEST_TIMEOUT) + 600)
def test_canvas_suite_on_celery_ext_passes_what_bare_celery_passes(tmp_path: Path) -> None:
    require("Redis", REDIS_HOST, REDIS_PORT)
    summary_path = tmp_path / "summary.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(RUN_CANVAS),
            "--out-dir",
            str(tmp_path),
            "--json",
            str(summary_path),
            "--redis-host",
            REDIS_HOST,
            "--redis-port",
            str(REDIS_PORT),
            "--max-time",
            str(MAX_TIME_PER_SIDE),
            "--test-timeout",
            str(TEST_TIMEOUT),
            "--diff-only",
        ],
        capture_output=True,
        text=True,
    )
    print(proc.stdout[-30000:])  # the table of differences and the totals, shown when this fails
    assert proc.returncode == 0, f"run_canvas.py could not make a report:\n{proc.stderr[-5000:]}"
    summary = json.loads(summary_path.read_text())
    bare = {i: r["outcome"] for i, r in summary["tests"]["bare"].items()}
    ext = {i: r["outcome"] for i, r in summary["tests"]["celery_ext"].items()}

    assert list(bare.values()).count("passed") > 0, f"bare Celery passed nothing: {summary['sides']['bare']}"
    regressions = sorted(i for i, outcome in bare.items() if outcome == "passed" and failing(ext.get(i, "not run")))
    unexpected = [
        f"{i}: {ext.get(i, 'not run')}: {summary['tests']['celery_ext'].get(i, {}).get('message', '')[:200]}"
        for i in regressions
        if i not in EXPECTED_DIFFERENCES
    ]
    assert not unexpected, f"{len(unexpected)} tests pass on bare Celery but not on celery_ext:\n" + "\n".join(
        unexpected
    )
    stale = sorted(set(EXPECTED_DIFFERENCES) - set(regressions))
    assert not stale, f"EXPECTED_DIFFERENCES entries that are no longer differences: {stale}"
