"""pytest plugin ``-p suite_limits``: run_canvas.py loads it on BOTH sides of a run of Celery's suite.

It bounds a run without changing what any test does, and records outcomes as they happen:

- ``CELERY_SUITE_TEST_TIMEOUT`` (seconds): caps every test's ``timeout`` marker (the suite's
  ``@flaky`` tests carry ``timeout=300``); unmarked tests get pytest-timeout's ``--timeout``.
- ``CELERY_SUITE_MAX_RERUNS``: caps the reruns of every ``flaky`` marker (the suite asks for 5 on
  connection errors and result timeouts; 5 x 60 s per test is too long when a side times out).
- ``CELERY_SUITE_DEADLINE`` (a ``time.time()``): no test starts after it; pytest stops as after
  ``-x``, so session fixtures are torn down and ``--junitxml`` is still written.  The harness
  reports the tests that never started as "not run".
- ``CELERY_SUITE_MAX_SETUP_ERRORS``: after that many tests in a row fail in setup (say, the
  session worker cannot start: each test pays its start-up timeout again), pytest stops the same way.
- ``CELERY_SUITE_RESULTS`` (a path): JSON lines, first ``{"collected": [...]}``, then one
  ``{"id", "outcome", "message"}`` per test when its last attempt finishes -- the harness's source
  of truth (junit.xml lists every rerun attempt and folds subtests and teardown errors into one
  testcase; this does not, and survives a run that had to be killed).  Outcomes: passed, failed,
  error (in setup), skipped, xfailed, xpassed, and "<outcome> +teardown" when a fixture's teardown
  failed after the test (the suite checks its apps' queues there).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest

_outcomes: dict[str, tuple[str, str]] = {}
_rerun: set[str] = set()
_state: dict[str, Any] = {"session": None, "setup_errors": 0}


def _float_env(name: str) -> float | None:
    value = os.environ.get(name)
    return float(value) if value else None


def _write(record: dict[str, Any]) -> None:
    path = os.environ.get("CELERY_SUITE_RESULTS")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def _marker_value(marker: pytest.Mark, key: str, default: Any) -> Any:
    if key in marker.kwargs:
        return marker.kwargs[key]
    return marker.args[0] if marker.args else default


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    timeout_cap = _float_env("CELERY_SUITE_TEST_TIMEOUT")
    reruns_cap = os.environ.get("CELERY_SUITE_MAX_RERUNS")
    for item in items:
        marker = item.get_closest_marker("timeout")
        if marker is not None and timeout_cap is not None:
            timeout = _marker_value(marker, "timeout", None)
            if timeout is None or float(timeout) > timeout_cap:
                # Prepended, so it is the closest marker and pytest-timeout reads it.
                item.add_marker(pytest.mark.timeout(timeout=timeout_cap), append=False)
        marker = item.get_closest_marker("flaky")
        if marker is not None and reruns_cap is not None:
            kwargs = dict(marker.kwargs)
            kwargs["reruns"] = min(int(_marker_value(marker, "reruns", 1)), int(reruns_cap))
            item.add_marker(pytest.mark.flaky(**kwargs), append=False)


def pytest_sessionstart(session: pytest.Session) -> None:
    _state["session"] = session


def pytest_collection_finish(session: pytest.Session) -> None:
    _write({"collected": [item.nodeid for item in session.items]})


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    deadline = _float_env("CELERY_SUITE_DEADLINE")
    if deadline is not None and time.time() > deadline:
        item.session.shouldstop = "celery suite: the overall time cap was reached"
        return True  # handled: this test does not run
    return None


def _message(report: pytest.TestReport) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    text = getattr(report.longrepr, "reprcrash", None)
    return str(text.message) if text is not None else str(report.longrepr or "")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    nodeid = report.nodeid
    if report.outcome == "rerun":  # pytest-rerunfailures: this attempt is run again
        _rerun.add(nodeid)
        return
    if nodeid in _rerun:  # the rest of an attempt that is run again (its passing teardown)
        return
    previous = _outcomes.get(nodeid)
    if type(report).__name__ == "SubtestReport":  # pytest's subtests: a failed one fails the test
        if report.failed and (previous is None or previous[0] != "failed"):
            _outcomes[nodeid] = ("failed", "subtest: " + _message(report))
        return
    if report.when == "teardown":
        if report.failed and (previous is None or previous[0] not in ("failed", "error")):
            # Keep what the test itself did: "passed +teardown", "skipped +teardown".
            outcome = previous[0] if previous is not None else "passed"
            _outcomes[nodeid] = (f"{outcome} +teardown", "teardown: " + _message(report))
    elif report.when == "call" and not report.failed and previous is not None and previous[0] == "failed":
        pass  # the test body passed, a subtest of it failed
    elif report.failed or report.skipped or report.when == "call":
        _outcomes[nodeid] = (_outcome(report), _message(report) if not report.passed else "")


def _outcome(report: pytest.TestReport) -> str:
    xfail = hasattr(report, "wasxfail")
    if report.failed:
        return "failed" if report.when == "call" else "error"
    if report.skipped:
        return "xfailed" if xfail else "skipped"
    return "xpassed" if xfail else "passed"


def pytest_runtest_logfinish(nodeid: str) -> None:
    if nodeid in _rerun:  # logged again when its next attempt finishes
        _rerun.discard(nodeid)
        _outcomes.pop(nodeid, None)
        return
    outcome, message = _outcomes.pop(nodeid, ("error", "no report"))
    _write({"id": nodeid, "outcome": outcome, "message": message[:500]})
    setup_error = outcome == "error"
    _state["setup_errors"] = _state["setup_errors"] + 1 if setup_error else 0
    limit = os.environ.get("CELERY_SUITE_MAX_SETUP_ERRORS")
    if limit and _state["setup_errors"] >= int(limit) and _state["session"] is not None:
        _state["session"].shouldstop = f"celery suite: {limit} tests in a row failed in setup"
