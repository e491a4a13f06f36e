"""Task commands: submit, get, list, logs, cancel, retry, wait."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery_ext.cli.common import (
    EXIT_OK,
    EXIT_TASK_FAILED,
    CommandError,
    add_json,
    print_json,
    print_table,
    runtime,
)
from celery_ext.dispatch import MAX_PRIORITY
from celery_ext.model import Task, TaskStatus

FAILED_END = (TaskStatus.FAILED, TaskStatus.DEAD, TaskStatus.CANCELLED)


def register(sub: Any) -> None:
    p = sub.add_parser("submit", help="submit a task")
    p.add_argument("task_type", metavar="TYPE")
    p.add_argument(
        "payload",
        metavar="PAYLOAD_JSON",
        nargs="?",
        default="{}",
        help="a JSON object; @FILE reads it from FILE, - from standard input (default {})",
    )
    p.add_argument(
        "--priority", type=bounded(int, 0, MAX_PRIORITY), default=0, help=f"0..{MAX_PRIORITY}, higher runs first"
    )
    p.add_argument("--delay", type=bounded(float, 0), metavar="SECONDS")
    p.add_argument("--max-retries", type=bounded(int, 0), metavar="N")
    p.add_argument("--timeout", type=bounded(float, 0, strict=True), metavar="SECONDS")
    p.add_argument("--idempotency-key", metavar="KEY")
    p.add_argument("--wait", action="store_true", help="wait for a terminal status")
    p.add_argument("--wait-timeout", type=bounded(float, 0, strict=True), metavar="SECONDS")
    add_json(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("get", help="show one task")
    p.add_argument("task_id", metavar="ID")
    add_json(p)
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("list", help="list tasks, newest first")
    p.add_argument("--status", action="append", choices=[s.value for s in TaskStatus])
    p.add_argument("--type", dest="task_type", action="append")
    p.add_argument("--worker")
    p.add_argument("--parent", metavar="ID", help="tasks sent by this one (a chain's next step, a subtask)")
    p.add_argument("--root", metavar="ID", help="the tasks of the workflow (chain, chord) this one started")
    p.add_argument("--group", metavar="ID", help="the members (and chord body) of this Celery group")
    p.add_argument("--limit", type=bounded(int, 1, 1000), default=50)
    p.add_argument("--cursor", help="next_cursor of the previous page")
    add_json(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("logs", help="show a task's log lines")
    p.add_argument("task_id", metavar="ID")
    p.add_argument("--run", type=bounded(int, 1), help="only this run (a manual retry starts a new run)")
    p.add_argument("--attempt", type=bounded(int, 0), help="only this attempt (within each run)")
    add_json(p)
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("cancel", help="cancel a task")
    p.add_argument("task_id", metavar="ID")
    p.add_argument(
        "--terminate", action="store_true", help="if it is running, also kill the pool process running it (SIGTERM)"
    )
    add_json(p)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("retry", help="run a finished task again")
    p.add_argument("task_id", metavar="ID")
    add_json(p)
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser("wait", help="wait for a task to finish")
    p.add_argument("task_id", metavar="ID")
    p.add_argument("--timeout", type=bounded(float, 0, strict=True), metavar="SECONDS")
    add_json(p)
    p.set_defaults(func=cmd_wait)


def bounded(
    kind: Callable[[str], Any], low: float, high: float | None = None, *, strict: bool = False
) -> Callable[[str], Any]:
    """An argparse type: a number of ``kind`` within bounds, refused with the bounds named (argparse
    prefixes the option's name: ``argument --priority: must be an integer 0..9 (got -5)``)."""
    noun = "an integer" if kind is int else "a number"
    bounds = f"{low:g}..{high:g}" if high is not None else f"> {low:g}" if strict else f">= {low:g}"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {noun} {bounds} (got {text!r})") from None
        if value < low or (strict and value == low) or (high is not None and value > high) or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {noun} {bounds} (got {text})")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def read_payload(text: str) -> Any:
    """PAYLOAD_JSON: inline JSON, ``@FILE`` or ``-`` (standard input): no argument-length limit."""
    if text == "-":
        source, raw = "the payload on standard input", sys.stdin.read()
    elif text.startswith("@"):
        source = f"payload file {text[1:]}"
        try:
            raw = Path(text[1:]).read_text()
        except OSError as exc:
            raise CommandError(f"cannot read {source}: {exc.strerror}") from None
    else:
        source, raw = "PAYLOAD_JSON", text
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CommandError(f"{source} is not valid JSON: {exc}") from None


def _show(task: Task, as_json: bool) -> None:
    if as_json:
        print_json(task.to_dict())
        return
    d = task.to_dict()
    d["error"] = f"{task.error.reason}: {task.error.message}" if task.error else None
    d["payload"] = json.dumps(task.payload)
    d["result"] = json.dumps(task.result) if task.result is not None else None
    print_table(f"task {task.task_id}", ["field", "value"], [(k, v) for k, v in d.items()])


def _exit_for(task: Task) -> int:
    return EXIT_TASK_FAILED if task.status in FAILED_END else EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    payload = read_payload(args.payload)
    manager = runtime(args).manager
    task = manager.submit(
        args.task_type,
        payload,
        priority=args.priority,
        delay=args.delay,
        max_retries=args.max_retries,
        timeout=args.timeout,
        idempotency_key=args.idempotency_key,
    )
    if args.wait:
        task = manager.wait(task.task_id, args.wait_timeout)
    if args.json:
        print_json(task.to_dict())
    elif args.wait:
        reason = f" {task.error.reason}: {task.error.message}" if task.error else ""
        print(f"{task.task_id} {task.status.value}{reason}")
    else:
        print(task.task_id)
    return _exit_for(task) if args.wait else EXIT_OK


def cmd_get(args: argparse.Namespace) -> int:
    _show(runtime(args).manager.get(args.task_id), args.json)
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    page = runtime(args).manager.list(
        status=tuple(args.status or ()),
        task_type=tuple(args.task_type or ()),
        worker_id=args.worker,
        parent_id=args.parent,
        root_id=args.root,
        group_id=args.group,
        limit=args.limit,
        cursor=args.cursor,
    )
    if args.json:
        print_json({"items": [t.to_dict() for t in page.items], "next_cursor": page.next_cursor})
        return EXIT_OK
    rows = [
        (
            t.task_id,
            t.task_type,
            t.status.value,
            t.attempt,
            t.worker_id,
            t.created_at.isoformat(timespec="seconds"),
            t.error.reason if t.error else None,
        )
        for t in page.items
    ]
    print_table(None, ["id", "type", "status", "attempt", "worker", "created", "error"], rows)
    if page.next_cursor:
        print(f"next page: --cursor {page.next_cursor}")
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    lines = runtime(args).manager.logs(args.task_id, attempt=args.attempt, run=args.run)
    if args.json:
        print_json([line.to_dict() for line in lines])
    else:
        print_table(
            None,
            ["time", "run", "attempt", "level", "message"],
            [(ln.time.isoformat(timespec="milliseconds"), ln.run, ln.attempt, ln.level, ln.message) for ln in lines],
        )
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    _show(runtime(args).manager.cancel(args.task_id, terminate=args.terminate), args.json)
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    _show(runtime(args).manager.retry(args.task_id), args.json)
    return EXIT_OK


def cmd_wait(args: argparse.Namespace) -> int:
    task = runtime(args).manager.wait(args.task_id, args.timeout)
    _show(task, args.json)
    return _exit_for(task)
