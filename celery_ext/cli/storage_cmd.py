"""Storage commands: ``celery-ext storage migrate | status | purge``.

They open only the task store named by ``storage`` in the config (no broker needed).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from celery_ext.cli.common import EXIT_OK, add_json, print_json, print_table
from celery_ext.config import Config, load_config
from celery_ext.storage import Storage, open_storage
from celery_ext.storage.base import TaskMaintenance, missing_capability


def register(sub: Any) -> None:
    p = sub.add_parser("storage", help="task store: schema migration, status, retention purge")
    ssub = p.add_subparsers(dest="storage_command", metavar="ACTION", required=True)

    m = ssub.add_parser("migrate", help="create the schema or upgrade it in place (keeps all data)")
    add_json(m)
    m.set_defaults(func=cmd_migrate)

    s = ssub.add_parser("status", help="where the store is, its schema version, records per status")
    s.add_argument("--no-counts", action="store_true", help="skip counting records (slow on huge stores)")
    add_json(s)
    s.set_defaults(func=cmd_status)

    g = ssub.add_parser("purge", help="delete finished tasks and log lines older than storage.retention")
    g.add_argument("--max-batches", type=int, metavar="N", help="stop after N batches of each kind")
    add_json(g)
    g.set_defaults(func=cmd_purge)


def _open(args: argparse.Namespace) -> tuple[Config, Storage]:
    config = load_config(args.config)
    return config, open_storage(config.storage, config.data_dir)


def cmd_migrate(args: argparse.Namespace) -> int:
    _, storage = _open(args)
    try:
        before, latest = storage.schema_version()
        applied = storage.migrate() or []
        after, _ = storage.schema_version()
        warnings = storage.upkeep_warnings()
    finally:
        storage.close()
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        print_json(
            {"storage": storage.description, "from": before, "to": after, "applied": applied, "warnings": warnings}
        )
    elif before is None:
        print(f"{storage.description}: created schema version {after}")
    elif applied:
        print(f"{storage.description}: migrated from version {before} to {after}")
        for step in applied:
            print(f"  applied {step}")
    else:
        print(f"{storage.description}: schema version {after} is up to date (latest {latest})")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    _, storage = _open(args)
    try:
        storage.ping()
        version, latest = storage.schema_version()
        counts = None
        if not args.no_counts and version is not None:
            if isinstance(storage.tasks, TaskMaintenance):
                counts = storage.tasks.count_by_status()
            else:
                need = "counting records by status (--no-counts skips it)"
                print(f"note: {missing_capability(storage, storage.tasks, TaskMaintenance, need)}", file=sys.stderr)
    finally:
        storage.close()
    state = "empty" if version is None else ("up to date" if version >= latest else "migration needed")
    if args.json:
        print_json(
            {
                "storage": storage.description,
                "schema_version": version,
                "latest_version": latest,
                "state": state,
                "counts": counts,
            }
        )
        return EXIT_OK
    rows: list[tuple[str, Any]] = [
        ("storage", storage.description),
        ("schema version", version),
        ("latest version", latest),
        ("state", state),
    ]
    rows += [(f"tasks {status}", n) for status, n in sorted((counts or {}).items())]
    print_table("task store", ["", "value"], rows)
    return EXIT_OK


def cmd_purge(args: argparse.Namespace) -> int:
    from celery_ext.storage.retention import cutoffs, purge

    config, storage = _open(args)
    try:
        if not cutoffs(config.storage.retention):
            report = None
        else:
            report = purge(storage, config.storage.retention, max_batches=args.max_batches)
    finally:
        storage.close()
    if args.json:
        print_json(report.to_dict() if report else {"tasks": {}, "logs": 0, "groups": 0, "seconds": 0.0})
    elif report is None:
        print("storage.retention is not set: nothing to purge")
    else:
        parts = [f"{n} {status}" for status, n in report.tasks.items()]
        print(
            f"deleted tasks: {', '.join(parts) or 'none'}; log lines: {report.logs}; "
            f"saved groups: {report.groups} ({report.seconds:.1f}s)"
        )
    return EXIT_OK
