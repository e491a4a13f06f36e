"""Run Celery's own canvas integration tests against bare Celery and against celery_ext; diff them.

    .venv/bin/python tests/celery_suite/run_canvas.py [--sides bare,celery_ext] [-k EXPR] [--diff-only]

1. Fetches the Celery sdist (``pip download --no-binary :all: --no-deps celery==VERSION``, sha256
   checked) into a cache dir (``--cache-dir``, default ``$CELERY_SUITE_CACHE`` or
   ``${XDG_CACHE_HOME:-~/.cache}/celery_ext/celery-src``) and extracts its ``t/`` tests and
   ``pyproject.toml`` (its pytest settings) -- not its ``celery/`` package, so the installed Celery
   is the one under test.
2. Runs ``t/integration/test_canvas.py`` with pytest in a subprocess, once per side, one after the
   other: the suite's own Redis client (``get_redis_connection()``: ``$REDIS_HOST``,
   ``$REDIS_PORT``, always db 0) keeps its helper keys (``redis-echo``, ``redis-count``...) there,
   shared by both sides.  The broker is an empty Redis db claimed for the run and flushed after
   each side (not db 0: its ``celery`` queue would be shared with any other worker on db 0).
   - ``bare``: the suite as Celery's CI runs it, ``TEST_BROKER=redis://HOST:PORT/DB`` and
     ``TEST_BACKEND=redis://HOST:PORT/0`` -- db 0, because some tests read the backend's chord
     keys with that client.
   - ``celery_ext``: ``TEST_BACKEND=celery_ext://`` and ``-p celery_ext_overlay``: every app of the
     suite gets ``celery_ext.factory.celery_settings(...)`` for a generated config (this broker,
     SQLite or PostgreSQL storage, no executors: the suite's tasks are plain Celery tasks), and the
     worker's app is built by ``create_app`` (see celery_ext_overlay.py).
   Both sides load ``-p celery.contrib.pytest`` (Celery's fixtures, which the suite's conftest
   uses) and ``-p suite_limits`` (see there): per-test timeout ``--test-timeout`` (also caps the
   suite's own ``timeout=300`` markers), ``flaky`` reruns capped at ``--max-reruns``, and no test
   starts after ``--max-time`` seconds or after ``--max-setup-errors`` setup errors in a row (then
   the rest is reported "not run").
3. Prints a table (test id, bare outcome, celery_ext outcome), per-side totals and runtimes and the
   most common failure messages; writes everything to ``--out-dir`` (per side: junit.xml,
   pytest.log, and results.jsonl -- suite_limits' per-test outcomes, which the table is made from;
   summary.json, report.txt).

Exit status: 0 when a report was made (whatever the tests did), 2 when it could not be.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CELERY_VERSION = "5.7.0"
SDIST_SHA256 = "6a5dfcf6662287204f009a02002b9e66c83d4105e47ebabdc7079108772fc6f0"
SUITE_FILE = "t/integration/test_canvas.py"
ID_PREFIX = SUITE_FILE + "::"
HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
SIDES = ("bare", "celery_ext")
# Outcomes (suite_limits.py) that count as "the test did not pass".  "<outcome> +teardown": a
# fixture's teardown failed after the test (e.g. the suite's check that its apps use only the
# "celery" queue); "not run": collected, never started (time cap, or too many setup errors in a row).
FAILING = ("failed", "error", "not run")


def failing(outcome: str) -> bool:
    return outcome in FAILING or outcome.endswith("+teardown")


CLAIM_KEY = "celery-canvas-suite:claim"


class HarnessError(Exception):
    pass


# --- the suite ---------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    if os.environ.get("CELERY_SUITE_CACHE"):
        return Path(os.environ["CELERY_SUITE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "celery_ext" / "celery-src"


def ensure_suite(cache_dir: Path) -> Path:
    """The extracted ``celery-VERSION/`` (``t/`` and ``pyproject.toml``), downloading once."""
    suite = cache_dir / f"celery-{CELERY_VERSION}"
    done = suite / ".extracted"
    if done.is_file():
        return suite
    dist = cache_dir / "dist"
    sdist = dist / f"celery-{CELERY_VERSION}.tar.gz"
    if not sdist.is_file():
        dist.mkdir(parents=True, exist_ok=True)
        print(f"downloading the celery {CELERY_VERSION} sdist into {dist}", flush=True)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-binary",
                ":all:",
                "--no-deps",
                f"celery=={CELERY_VERSION}",
                "-d",
                str(dist),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0 or not sdist.is_file():
            raise HarnessError(f"pip download failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        sdist.unlink()
        raise HarnessError(f"{sdist}: sha256 {digest}, expected {SDIST_SHA256} (file removed)")
    shutil.rmtree(suite, ignore_errors=True)
    top = f"celery-{CELERY_VERSION}/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(top + "t/") or m.name == top + "pyproject.toml"]
        tar.extractall(cache_dir, members=members, filter="data")
    if not (suite / SUITE_FILE).is_file():
        raise HarnessError(f"{sdist} has no {SUITE_FILE}")
    done.write_text(f"{SDIST_SHA256}\n")
    return suite


# --- Redis -------------------------------------------------------------------------------------


def claim_redis_db(host: str, port: int) -> int:
    """An empty db (not 0: the repo's tests and the suite's helpers use it), claimed by a key."""
    import redis

    try:
        databases = int(redis.Redis(host=host, port=port).config_get("databases")["databases"])
    except redis.RedisError as exc:
        raise HarnessError(f"Redis on {host}:{port}: {exc}") from exc
    for db in range(databases - 1, 0, -1):
        client = redis.Redis(host=host, port=port, db=db)
        if client.dbsize() == 0 and client.set(CLAIM_KEY, os.getpid(), nx=True):
            return db
    raise HarnessError(f"Redis on {host}:{port} has no empty db to use")


def reset_redis_db(host: str, port: int, db: int, release: bool = False) -> None:
    """Drop what a side left in its (claimed) db; keep the claim unless ``release``."""
    import redis

    client = redis.Redis(host=host, port=port, db=db)
    client.flushdb()
    if not release:
        client.set(CLAIM_KEY, os.getpid())


# --- one side ----------------------------------------------------------------------------------


@dataclass
class Side:
    name: str
    directory: Path
    results: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (outcome, message)
    runtime: float = 0.0
    returncode: int | None = None
    stopped: str = ""  # why the run ended early, if it did

    def totals(self) -> dict[str, int]:
        return dict(collections.Counter(outcome for outcome, _ in self.results.values()))

    def as_json(self) -> dict[str, Any]:
        return {
            "dir": str(self.directory),
            "runtime": round(self.runtime, 1),
            "returncode": self.returncode,
            "stopped": self.stopped,
            "totals": self.totals(),
        }


def short_id(nodeid: str) -> str:
    return nodeid.removeprefix(ID_PREFIX)


def parse_jsonl(path: Path) -> tuple[list[str], dict[str, tuple[str, str]]]:
    collected: list[str] = []
    results: dict[str, tuple[str, str]] = {}
    if not path.is_file():
        return collected, results
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "collected" in record:
            collected = [short_id(n) for n in record["collected"]]
        else:
            results[short_id(record["id"])] = (record["outcome"], record["message"])
    return collected, results


def pytest_command(side: str, directory: Path, args: argparse.Namespace) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "pytest",
        SUITE_FILE,
        "-v",
        "--color=no",
        "-p",
        "no:cacheprovider",
        # Celery's fixtures: no longer an entry-point plugin (Celery's CI gets them via pytest-celery).
        "-p",
        "celery.contrib.pytest",
        "-p",
        "suite_limits",
        f"--timeout={args.test_timeout:g}",
        f"--junitxml={directory / 'junit.xml'}",
        "--durations=15",
    ]
    if side == "celery_ext":
        command += ["-p", "celery_ext_overlay"]
    if args.k:
        command += ["-k", args.k]
    return command + list(args.pytest_args)


def side_environment(
    side: str, directory: Path, args: argparse.Namespace, broker_url: str, deadline: float
) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "CELERY_EXT_CONFIG"):
        env.pop(name, None)
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p),
        REDIS_HOST=args.redis_host,
        REDIS_PORT=str(args.redis_port),
        TEST_BROKER=broker_url,
        TEST_BACKEND=f"redis://{args.redis_host}:{args.redis_port}/0",
        CELERY_SUITE_TEST_TIMEOUT=f"{args.test_timeout:g}",
        CELERY_SUITE_MAX_RERUNS=str(args.max_reruns),
        CELERY_SUITE_DEADLINE=f"{deadline:.0f}",
        CELERY_SUITE_MAX_SETUP_ERRORS=str(args.max_setup_errors),
        CELERY_SUITE_RESULTS=str(directory / "results.jsonl"),
    )
    if side == "celery_ext":
        env.update(
            TEST_BACKEND="celery_ext://",
            CELERY_EXT_SUITE_WORKER=args.ext_worker,
            CELERY_EXT_CONFIG=str(directory / "config.yaml"),
            CELERY_EXT_SUITE_PING_CHECK="0" if args.ext_no_ping_check else "1",
        )
    return env


def write_ext_config(directory: Path, broker_url: str, storage: dict[str, Any]) -> None:
    data = {
        "app": {"name": f"canvas{uuid.uuid4().hex[:8]}", "data_dir": "data", "log_level": "INFO"},
        "broker": {"url": broker_url},
        "executors": [],  # the suite brings its own (plain Celery) tasks
        "storage": storage,
    }
    (directory / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def run_side(side: str, suite: Path, out_dir: Path, args: argparse.Namespace, broker_url: str) -> Side:
    directory = out_dir / side
    directory.mkdir(parents=True, exist_ok=True)
    for stale in ("junit.xml", "results.jsonl"):
        (directory / stale).unlink(missing_ok=True)
    result = Side(side, directory)
    started = time.time()
    env = side_environment(side, directory, args, broker_url, started + args.max_time)
    hard_limit = args.max_time + args.test_timeout + 180  # the last test, then teardown
    print(f"[{side}] pytest {SUITE_FILE} (log: {directory / 'pytest.log'})", flush=True)
    with open(directory / "pytest.log", "wb") as log:
        proc = subprocess.Popen(
            pytest_command(side, directory, args),
            cwd=suite,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            result.returncode = proc.wait(hard_limit)
        except subprocess.TimeoutExpired:
            result.stopped = f"killed after {hard_limit:g}s"
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: pytest and its worker's pool
            result.returncode = proc.wait()
    result.runtime = time.time() - started
    collected, live = parse_jsonl(directory / "results.jsonl")
    result.results = dict(live)
    for test_id in collected:
        result.results.setdefault(test_id, ("not run", ""))
    never_started = len(set(collected) - set(live))
    if never_started and not result.stopped:
        result.stopped = f"{never_started} tests never started (time cap or setup errors: see pytest.log)"
    if not collected and not result.results:
        result.stopped = result.stopped or f"nothing collected (pytest exit {result.returncode}; see pytest.log)"
    print(
        f"[{side}] {fmt_totals(result.totals())} in {result.runtime:.0f}s"
        f"{' -- ' + result.stopped if result.stopped else ''}",
        flush=True,
    )
    return result


# --- report ------------------------------------------------------------------------------------


def fmt_totals(totals: dict[str, int]) -> str:
    order = ["passed", "failed", "error", "skipped", "xfailed", "xpassed", "not run"]
    keys = [k for k in order if k in totals] + sorted(set(totals) - set(order))
    return ", ".join(f"{totals[k]} {k}" for k in keys) or "no tests"


def report(sides: dict[str, Side], diff_only: bool) -> str:
    ids = sorted({test_id for side in sides.values() for test_id in side.results})
    names = list(sides)
    width = max([len(i) for i in ids] + [10])
    lines = [f"{'test':<{width}}  " + "  ".join(f"{n:<14}" for n in names)]
    for test_id in ids:
        outcomes = [sides[n].results.get(test_id, ("-", ""))[0] for n in names]
        if diff_only and len(set(outcomes)) == 1:
            continue
        mark = "  <-- differs" if len(set(outcomes)) > 1 else ""
        lines.append(f"{test_id:<{width}}  " + "  ".join(f"{o:<14}" for o in outcomes) + mark)
    lines.append("")
    for name, side in sides.items():
        lines.append(
            f"{name}: {fmt_totals(side.totals())} in {side.runtime:.0f}s (pytest exit {side.returncode}"
            f"{', ' + side.stopped if side.stopped else ''}; {side.directory})"
        )
    if len(sides) == 2:
        bare, ext = sides["bare"].results, sides["celery_ext"].results
        regressions = [i for i in ids if bare.get(i, ("-",))[0] == "passed" and failing(ext.get(i, ("-",))[0])]
        skipped = [i for i in ids if bare.get(i, ("-",))[0] == "passed" and ext.get(i, ("-",))[0] == "skipped"]
        lines.append(
            f"passed on bare, not on celery_ext (failed, error, +teardown, not run): {len(regressions)}; "
            f"passed on bare but skipped on celery_ext: {len(skipped)}"
        )
    for name, side in sides.items():
        messages = collections.Counter(
            m.splitlines()[0][:160] if m else "(no message)"
            for o, m in side.results.values()
            if failing(o) and o != "not run"
        )
        if messages:
            lines.append(f"most common failures on {name}:")
            lines += [f"  {count:4d} x {message}" for message, count in messages.most_common(5)]
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated: bare, celery_ext")
    parser.add_argument("--out-dir", type=Path, help="default: a new temp dir")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the sdist is kept")
    parser.add_argument("--json", type=Path, help="also write the summary here (always in --out-dir)")
    # Not 60: three chord tests of the suite take 120-300 s on bare Celery (2 cores).  pytest-timeout
    # cannot cut a test inside a `subtests.test()` block anyway: the subtest swallows its Failed.
    parser.add_argument("--test-timeout", type=float, default=600.0, help="seconds per test (pytest-timeout)")
    parser.add_argument("--max-time", type=float, default=1800.0, help="seconds per side before no test starts")
    parser.add_argument("--max-reruns", type=int, default=1, help="cap on the suite's flaky reruns")
    parser.add_argument(
        "--max-setup-errors", type=int, default=10, help="stop a side after this many tests in a row fail in setup"
    )
    parser.add_argument("-k", help="pytest -k expression, for both sides")
    parser.add_argument("--redis-host", default=os.environ.get("REDIS_HOST", "127.0.0.1"))
    parser.add_argument("--redis-port", type=int, default=int(os.environ.get("REDIS_PORT", "6379")))
    parser.add_argument("--ext-storage", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument(
        "--ext-worker",
        choices=["factory", "settings"],
        default="factory",
        help="factory: the worker app is celery_ext's create_app; settings: conf only",
    )
    parser.add_argument(
        "--ext-no-ping-check",
        action="store_true",
        help="diagnostic: start the celery_ext side's worker without the suite's celery.ping check",
    )
    parser.add_argument("--diff-only", action="store_true", help="print only rows whose outcomes differ")
    parser.add_argument("pytest_args", nargs="*", help="after --: more pytest arguments, for both sides")
    args = parser.parse_args(argv)
    args.sides = [s for s in args.sides.split(",") if s]
    unknown = set(args.sides) - set(SIDES)
    if unknown:
        parser.error(f"unknown sides: {', '.join(sorted(unknown))}")
    return args


def ext_storage(kind: str) -> tuple[dict[str, Any], Any]:
    """The storage section for the celery_ext side, and a cleanup callable."""
    if kind == "sqlite":
        return {"type": "sqlite", "config": {}}, lambda: None
    sys.path.insert(0, str(REPO_ROOT))
    from tests.support.services import create_database, drop_database

    url = create_database(kind)
    return {"type": kind, "config": {"url": url}}, lambda: drop_database(kind, url)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="celery-canvas-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        suite = ensure_suite(args.cache_dir or default_cache_dir())
        db = claim_redis_db(args.redis_host, args.redis_port)
    except HarnessError as exc:
        print(f"run_canvas: {exc}", file=sys.stderr)
        return 2
    broker_url = f"redis://{args.redis_host}:{args.redis_port}/{db}"
    print(f"suite {suite / SUITE_FILE}; broker {broker_url}; output {out_dir}", flush=True)
    sides: dict[str, Side] = {}
    try:
        for side in args.sides:
            cleanup: Any = lambda: None  # noqa: E731
            if side == "celery_ext":
                storage, cleanup = ext_storage(args.ext_storage)
                (out_dir / side).mkdir(parents=True, exist_ok=True)
                write_ext_config(out_dir / side, broker_url, storage)
            try:
                sides[side] = run_side(side, suite, out_dir, args, broker_url)
            finally:
                cleanup()
                reset_redis_db(args.redis_host, args.redis_port, db)
    finally:
        reset_redis_db(args.redis_host, args.redis_port, db, release=True)
    text = report(sides, args.diff_only)
    print(text)
    (out_dir / "report.txt").write_text(report(sides, False) + "\n")
    summary = {
        "celery_version": CELERY_VERSION,
        "suite": SUITE_FILE,
        "broker": broker_url,
        "sides": {name: side.as_json() for name, side in sides.items()},
        "tests": {
            name: {i: {"outcome": o, "message": m} for i, (o, m) in side.results.items()}
            for name, side in sides.items()
        },
    }
    for path in filter(None, [out_dir / "summary.json", args.json]):
        path.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
