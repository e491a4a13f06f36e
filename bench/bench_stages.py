"""Where a task's submit-to-result time goes, stage by stage, on each side, in one run.

    .venv/bin/python bench/bench_stages.py [--n 400]

The same two workers as ``bench_core.py`` (prefork -c 2, events, acks_late, prefetch 1; celery_ext
with PostgreSQL records, bare Celery with a Redis result backend), started with the marks of
``bench/stages.py`` (``-A bench.stages_ext`` / ``-A bench.stages_bare``: receivers of Celery's
signals and wrappers of a few methods, no change to either side's code).  One task at a time,
the sides in a shuffled order, as ``bench_core``'s latency probes: celery_ext ``submit`` +
``manager.wait``, bare ``apply_async().get()``.  Each task's marks are matched by its id.

For each stage the table gives the median time since the submit began, and the median of the
step from the stage before it (medians of steps do not add up to the median total exactly).
The marks cost a list append each; the workers write them to a file after each task.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = {
    "ext": [
        ("submit", "submit called"),
        ("publish sent", "message being published"),
        ("insert sent", "record's INSERT being sent (script's reply due)"),
        ("insert done", "INSERT sent (its result read later)"),
        ("publish done", "message written (reservation script)"),
        ("submitted", "submit returned"),
        ("received", "worker main process has the message"),
        ("handoff sent", "main process hands it to the pool"),
        ("handoff done", "main process done handing it"),
        ("trace sent", "pool process has it"),
        ("prerun", "pool process starts the task"),
        ("claim sent", "claim sent (PostgreSQL)"),
        ("claim done", "claim done"),
        ("execute sent", "executor called"),
        ("execute done", "executor returned"),
        ("outcome sent", "outcome sent (PostgreSQL, waits for the disk)"),
        ("outcome done", "outcome done"),
        ("push sent", "completion PUBLISH built"),
        ("push done", "completion PUBLISH written"),
        ("returned", "manager.wait returned"),
    ],
    "bare": [
        ("submit", "apply_async called"),
        ("submitted", "apply_async returned"),
        ("received", "worker main process has the message"),
        ("handoff sent", "main process hands it to the pool"),
        ("handoff done", "main process done handing it"),
        ("trace sent", "pool process has it"),
        ("prerun", "pool process starts the task"),
        ("result sent", "result store sent (Redis SET + PUBLISH)"),
        ("result done", "result stored"),
        ("returned", "AsyncResult.get returned"),
    ],
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=400, help="tasks per side")
    parser.add_argument(
        "--load-rate",
        type=float,
        default=0.0,
        help="probe under a background flow of this many tasks/s through the probed side's worker "
        "(bench/flow.py; the sides in turn, a block each, as bench_core's --load-rate)",
    )
    parser.add_argument(
        "--paced",
        action="store_true",
        help="the flow sends one task at a time, evenly spaced (submit against apply_async), "
        "instead of a batch every 10 ms (bench/flow.py)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    marks_path = Path(tempfile.mkdtemp(prefix="bench-stages-")) / "marks.txt"
    os.environ["BENCH_STAGES"] = str(marks_path)  # before bench.stages is imported, here and in the workers
    from bench import bare_worker, stages, wait_until, with_app
    from bench.bench_core import run_bare, run_ext, setup
    from tests.support.services import drop_database
    from tests.support.workers import WorkerProcess

    run = setup(argparse.Namespace(storage="postgresql", synchronous_commit="outcomes"))
    stages.install_producer()
    ext_worker = with_app(WorkerProcess(run.config_path, concurrency=2, extra_args=["-E"]), "bench.stages_ext")
    bare = bare_worker(run.config_path, f"{run.name}.bare", app="bench.stages_bare")
    probed: dict[str, list[str]] = {"ext": [], "bare": []}
    try:
        bare.start()
        ext_worker.start()
        manager, noop = run.rt.manager, run.bare.tasks["bench.noop"]
        run_bare(run.bare, run.rds, 100)  # warm up both
        run_ext(manager, run.rt.storage, 100, 0)

        def ext() -> None:
            start = time.time_ns()
            task = manager.submit("echo", {}, max_retries=0)
            submitted = time.time_ns()
            manager.wait(task.task_id, 30)
            probed["ext"].append(task.task_id)
            for label, at in (("submit", start), ("submitted", submitted), ("returned", time.time_ns())):
                stages.mark(label, task.task_id, at)

        def bare_probe() -> None:
            start = time.time_ns()
            result = noop.apply_async()
            submitted = time.time_ns()
            result.get(timeout=30)
            probed["bare"].append(result.id)
            for label, at in (("submit", start), ("submitted", submitted), ("returned", time.time_ns())):
                stages.mark(label, result.id, at)

        if args.load_rate:
            loaded({"ext": ext, "bare": bare_probe}, run.config_path, args.n, args.load_rate, args.paced)
        else:
            ways = [ext, bare_probe]
            shuffle = random.Random(args.n).shuffle
            for _ in range(args.n):
                shuffle(ways)
                for way in ways:
                    way()
        stages.flush()
        probes = probed["ext"] + probed["bare"]
        wait_until(lambda: all("postrun" in stages.read(str(marks_path)).get(i, {}) for i in probes[-4:]))
    finally:
        bare.stop()
        ext_worker.stop()
        run.rt.storage.close()
        if run.db_url:
            drop_database("postgresql", run.db_url)
    report(stages.read(str(marks_path)), probed)


def loaded(probes: dict[str, Callable[[], None]], config_path: Path, n: int, rate: float, paced: bool) -> None:
    """``n`` probes a side while a flow of ``rate`` tasks/s runs through that side's worker: four
    blocks, the sides' order alternating."""
    from bench.flow import Flow

    for block in range(4):
        for side in ("ext", "bare") if block % 2 == 0 else ("bare", "ext"):
            flow = Flow(side, config_path if side == "ext" else None, rate, paced=paced).start()
            try:
                for _ in range(n // 4):
                    probes[side]()
            finally:
                kept = flow.stop()
            print(f"block {block + 1}, {side}: the flow kept {kept:.0f} tasks/s", flush=True)
            time.sleep(2)  # the flow's last tasks


def report(marks: dict[str, dict[str, int]], probed: dict[str, list[str]]) -> None:
    totals = {}
    for side, stage_list in STAGES.items():
        tasks = [marks[i] for i in probed[side] if i in marks]
        print(f"\n{side}: {len(tasks)} tasks, median ms since the submit began, and of the step before")
        previous: str | None = None
        for label, meaning in stage_list:
            since = [(m[label] - m["submit"]) / 1e6 for m in tasks if label in m]
            if not since:
                continue
            step: list[float] = []
            if previous is not None:
                step = [(m[label] - m[previous]) / 1e6 for m in tasks if label in m and previous in m]
            step_text = f"{statistics.median(step):6.3f}" if step else "      "
            print(f"  {meaning:48s} {statistics.median(since):6.3f}   step {step_text}")
            previous = label
        totals[side] = statistics.median((m["returned"] - m["submit"]) / 1e6 for m in tasks)
    print(
        f"\nsubmit-to-result p50: celery_ext {totals['ext']:.3f} ms, bare {totals['bare']:.3f} ms, "
        f"ratio {totals['ext'] / totals['bare']:.3f}"
    )


if __name__ == "__main__":
    main()
