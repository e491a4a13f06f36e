"""``celery-ext schedules list | add | remove | pause | resume | import-beat``: periodic schedules."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from celery_ext.cli.common import EXIT_OK, EXIT_USAGE, add_json, print_json, print_table, runtime
from celery_ext.cli.tasks_cmd import bounded, read_payload
from celery_ext.config import parse_duration
from celery_ext.dispatch import MAX_PRIORITY
from celery_ext.errors import ScheduleError, TaskError
from celery_ext.schedules import Schedule, from_beat, load_app
from celery_ext.schedules.model import CATCH_UP

COLUMNS = ["name", "task type", "when", "next fire", "last fire", "last task", "state", "source"]


def register(sub: Any) -> None:
    p = sub.add_parser("schedules", help="periodic schedules: list, add, remove, pause, resume, import-beat")
    ssub = p.add_subparsers(dest="schedules_command", metavar="ACTION", required=True)

    s = ssub.add_parser("list", help="every schedule with its next and last fire")
    add_json(s)
    s.set_defaults(func=cmd_list)

    s = ssub.add_parser("add", help="add a schedule, or replace the one of that name")
    s.add_argument("name", metavar="NAME")
    s.add_argument("task_type", metavar="TYPE")
    s.add_argument("payload", metavar="PAYLOAD_JSON", nargs="?", default="{}", help="as submit's (default {})")
    timing = s.add_mutually_exclusive_group(required=True)
    timing.add_argument(
        "--cron", metavar="EXPR", help='5 fields: minute hour day-of-month month day-of-week ("0 9 * * 1-5")'
    )
    timing.add_argument("--every", type=_interval, metavar="DURATION", help="an interval: 30s, 5m, 1h or seconds")
    s.add_argument("--timezone", default="UTC", metavar="TZ", help="IANA time zone of --cron (default UTC)")
    _catch_up(s)
    s.add_argument("--paused", action="store_true", help="add it paused")
    s.add_argument("--priority", type=bounded(int, 0, MAX_PRIORITY), default=0, help=f"0..{MAX_PRIORITY}")
    s.add_argument("--max-retries", type=bounded(int, 0), metavar="N")
    s.add_argument("--timeout", type=bounded(float, 0, strict=True), metavar="SECONDS")
    add_json(s)
    s.set_defaults(func=cmd_add)

    for action, helptext, func in (
        ("remove", "remove a schedule", cmd_remove),
        ("pause", "stop firing a schedule", cmd_pause),
        ("resume", "fire a paused schedule again (missed times per its catch-up)", cmd_resume),
    ):
        s = ssub.add_parser(action, help=helptext)
        s.add_argument("name", metavar="NAME")
        add_json(s)
        s.set_defaults(func=func)

    s = ssub.add_parser("import-beat", help="add the entries of a Celery app's beat_schedule as schedules")
    s.add_argument("app", metavar="MODULE[:APP]", help="the Celery app whose conf.beat_schedule to import")
    _catch_up(s)
    s.add_argument("--dry-run", action="store_true", help="show what would be added; add nothing")
    add_json(s)
    s.set_defaults(func=cmd_import_beat)


def _catch_up(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--catch-up", choices=CATCH_UP, default="skip", help="fire times missed while no scheduler ran (default skip)"
    )


def _interval(text: str) -> float:
    try:
        seconds = float(parse_duration(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {text})")
    return seconds


def _when(s: Schedule) -> str:
    return f"cron {s.cron} {s.timezone}" if s.cron is not None else f"every {s.every:g}s"


def _row(s: Schedule) -> list[Any]:
    times = [t.isoformat(timespec="seconds") if t else None for t in (s.next_fire_at, s.last_fire_at)]
    return [s.name, s.task_type, _when(s), *times, s.last_task_id, "paused" if s.paused else "active", s.source]


def _show(schedules: list[Schedule], as_json: bool) -> None:
    if as_json:
        print_json([s.to_dict() for s in schedules])
    else:
        print_table(None, COLUMNS, [_row(s) for s in schedules])


def cmd_list(args: argparse.Namespace) -> int:
    _show(runtime(args).manager.list_schedules(), args.json)
    return EXIT_OK


def cmd_add(args: argparse.Namespace) -> int:
    schedule = runtime(args).manager.add_schedule(
        args.name,
        args.task_type,
        read_payload(args.payload),
        cron=args.cron,
        every=args.every,
        timezone=args.timezone,
        catch_up=args.catch_up,
        paused=args.paused,
        priority=args.priority,
        max_retries=args.max_retries,
        timeout=args.timeout,
    )
    _show([schedule], args.json)
    return EXIT_OK


def cmd_remove(args: argparse.Namespace) -> int:
    runtime(args).manager.remove_schedule(args.name)
    if args.json:
        print_json({"removed": args.name})
    else:
        print(f"removed {args.name}")
    return EXIT_OK


def cmd_pause(args: argparse.Namespace) -> int:
    _show([runtime(args).manager.pause_schedule(args.name)], args.json)
    return EXIT_OK


def cmd_resume(args: argparse.Namespace) -> int:
    _show([runtime(args).manager.resume_schedule(args.name)], args.json)
    return EXIT_OK


def cmd_import_beat(args: argparse.Namespace) -> int:
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `celery -A` finds the app's module
    found = from_beat(load_app(args.app))
    refused = list(found.refused)
    imported = [s.replace(catch_up=args.catch_up) for s in found.schedules]
    if not args.dry_run:
        manager, added = runtime(args).manager, []
        for schedule in imported:
            try:
                added.append(manager.add_schedule(**schedule.definition()))
            except (TaskError, ScheduleError) as exc:
                refused.append(f"beat entry {schedule.name!r}: {exc}")
        imported = added
    if args.json:
        print_json({"imported": [s.to_dict() for s in imported], "refused": refused, "dry_run": args.dry_run})
    else:
        print_table("would import" if args.dry_run else "imported", COLUMNS, [_row(s) for s in imported])
        for line in refused:
            print(f"refused {line}", file=sys.stderr)
    return EXIT_USAGE if refused else EXIT_OK
