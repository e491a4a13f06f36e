"""A/B of the batch path against an older checkout, in one process, interleaved round by round.

Side ``old``: the older checkout's ``Dispatcher.publish_many`` and SQLAlchemy's executemany for
``create_many`` (``SqlTaskRepository.executemany``, PostgreSQL's before the unnest insert); side
``new``: this tree's.
Everything else is this tree's.  Each round runs bare ``apply_async``, ``submit_many`` in batches
of 1,000 and the due dispatch of one in-process leader, both sides, the order reversed every other
round; printed: medians, ratios to bare of the same round, and new/old per round.

    git archive <commit> | tar -x -C /tmp/old
    .venv/bin/python bench/ab_batch.py --old /tmp/old [--n 3000] [--rounds 6]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import REDIS, postgres_bench  # noqa: E402
from bench.bench_submit import dispatch  # noqa: E402
from tests.support.services import drop_database  # noqa: E402


def old_publish_many(old_tree: Path) -> Callable[..., None]:
    spec = importlib.util.spec_from_file_location("old_dispatch", old_tree / "celery_ext" / "dispatch.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_dispatch"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.Dispatcher.publish_many  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, required=True, help="an older checkout (git archive)")
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()

    import redis

    from celery_ext import dispatch as dispatch_module
    from celery_ext.storage import sql

    sides = {
        "old": (old_publish_many(args.old), sql.SqlTaskRepository.executemany),
        "new": (dispatch_module.Dispatcher.publish_many, sql.SqlTaskRepository.create_many),
    }

    def use(side: str) -> None:
        dispatch_module.Dispatcher.publish_many, sql.SqlTaskRepository.create_many = sides[side]  # type: ignore[method-assign]

    name, rt, bare, _, _, db_url = postgres_bench("bab", app={"log_level": "WARNING"})
    rds = redis.Redis.from_url(REDIS)
    n = args.n

    def clean() -> None:
        for key in rds.scan_iter(f"{name}*"):
            if not key.endswith(b".broker.epoch"):
                rds.delete(key)

    def many() -> float:
        start = time.perf_counter()
        for i in range(0, n, 1000):
            spec = {"task_type": "echo", "payload": {"i": i, "to": "someone@example.com"}, "max_retries": 0}
            rt.manager.submit_many([spec] * min(1000, n - i))
        return n / (time.perf_counter() - start)

    def bare_rate() -> float:
        noop = bare.tasks["bench.noop"]
        start = time.perf_counter()
        for _ in range(n):
            noop.apply_async()
        return n / (time.perf_counter() - start)

    runs: dict[str, Callable[[], float]] = {
        "bare apply_async": bare_rate,
        "many old": lambda: (use("old"), many())[1],
        "many new": lambda: (use("new"), many())[1],
        "dispatch old": lambda: (use("old"), dispatch(rt, n))[1],
        "dispatch new": lambda: (use("new"), dispatch(rt, n))[1],
    }
    res: dict[str, list[float]] = {k: [] for k in runs}
    try:
        many()
        clean()
        for r in range(args.rounds):
            for key in list(runs) if r % 2 == 0 else list(runs)[::-1]:
                res[key].append(runs[key]())
                clean()
            print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:,.0f}" for k, v in res.items()), flush=True)
    finally:
        use("new")
        rt.storage.close()
        for key in rds.scan_iter(f"{name}*"):
            rds.delete(key)
        drop_database("postgresql", db_url)
    report(res, n, args.rounds)


def report(res: dict[str, list[float]], n: int, rounds: int) -> None:
    base = res["bare apply_async"]
    print(f"\nmedians, n={n}, {rounds} rounds (ratio to bare apply_async of the same round):")
    for key, values in res.items():
        ratios = [x / y for x, y in zip(values, base, strict=True)]
        print(
            f"  {key:<18} {statistics.median(values):8,.0f}/s  ratio {statistics.median(ratios):.2f}"
            f" ({min(ratios):.2f}-{max(ratios):.2f})"
        )
    for what in ("many", "dispatch"):
        gains = [x / y for x, y in zip(res[f"{what} new"], res[f"{what} old"], strict=True)]
        each = ", ".join(f"{g:.2f}" for g in gains)
        print(f"  {what}: new/old per round {each} (median {statistics.median(gains):.2f})")


if __name__ == "__main__":
    main()
