"""Task commands: submit, get, list, logs, cancel, retry, wait."""

from __future__ import annotations

import argparse
import json
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
from celery_ext.model import Task, TaskStatus

FAILED_END = (TaskStatus.FAILED, TaskStatus.DEAD, TaskStatus.CANCELLED)


def register(sub: Any) -> None:
    p = sub.add_parser("submit", help="submit a task")
    p.add_argument("task_type", metavar="TYPE")
    p.add_argument("payload", metavar="PAYLOAD_JSON", nargs="?", default="{}")
    p.add_argument("--priority", type=int, default=0, help="0..9, higher runs first")
    p.add_argument("--delay", type=float, metavar="SECONDS")
    p.add_argument("--max-retries", type=int)
    p.add_argument("--timeout", type=float, metavar="SECONDS")
    p.add_argument("--idempotency-key", metavar="KEY")
    p.add_argument("--wait", action="store_true", help="wait for a terminal status")
    p.add_argument("--wait-timeout", type=float, metavar="SECONDS")
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
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--cursor", help="next_cursor of the previous page")
    add_json(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("logs", help="show a task's log lines")
    p.add_argument("task_id", metavar="ID")
    p.add_argument("--run", type=int, help="only this run (a manual retry starts a new run)")
    p.add_argument("--attempt", type=int, help="only this attempt (within each run)")
    add_json(p)
    p.set_defaults(func=cmd_logs)

    for name, func, text in (
        ("cancel", cmd_cancel, "cancel a task"), ("retry", cmd_retry, "run a finished task again")):
        p = sub.add_parser(name, help=text)
        p.add_argument("task_id", metavar="ID")
        add_json(p)
        p.set_defaults(func=func)

    p = sub.add_parser("wait", help="wait for a task to finish")
    p.add_argument("task_id", metavar="ID")
    p.add_argument("--timeout", type=float, metavar="SECONDS")
    add_json(p)
    p.set_defaults(func=cmd_wait)


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
    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as exc:
        raise CommandError(f"PAYLOAD_JSON is not valid JSON: {exc}") from exc
    manager = runtime(args).manager
    task = manager.submit(
        args.task_type, payload, priority=args.priority, delay=args.delay, max_retries=args.max_retries,
        timeout=args.timeout, idempotency_key=args.idempotency_key,
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
        status=tuple(args.status or ()), task_type=tuple(args.task_type or ()), worker_id=args.worker,
        limit=args.limit, cursor=args.cursor,
    )
    if args.json:
        print_json({"items": [t.to_dict() for t in page.items], "next_cursor": page.next_cursor})
        return EXIT_OK
    rows = [(t.task_id, t.task_type, t.status.value, t.attempt, t.worker_id, t.created_at.isoformat(timespec="seconds"),
             t.error.reason if t.error else None) for t in page.items]
    print_table(None, ["id", "type", "status", "attempt", "worker", "created", "error"], rows)
    if page.next_cursor:
        print(f"next page: --cursor {page.next_cursor}")
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    lines = runtime(args).manager.logs(args.task_id, attempt=args.attempt, run=args.run)
    if args.json:
        print_json([line.to_dict() for line in lines])
    else:
        print_table(None, ["time", "run", "attempt", "level", "message"],
                    [(ln.time.isoformat(timespec="milliseconds"), ln.run, ln.attempt, ln.level, ln.message)
                     for ln in lines])
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    _show(runtime(args).manager.cancel(args.task_id), args.json)
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    _show(runtime(args).manager.retry(args.task_id), args.json)
    return EXIT_OK


def cmd_wait(args: argparse.Namespace) -> int:
    task = runtime(args).manager.wait(args.task_id, args.timeout)
    _show(task, args.json)
    return _exit_for(task)
