"""Shared pieces of the CLI: building the runtime from ``--config``, printing JSON or tables."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery_ext.runtime import Runtime

EXIT_OK, EXIT_TASK_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_WAIT_TIMEOUT = 0, 1, 2, 3, 4


class CommandError(Exception):
    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def runtime(args: argparse.Namespace) -> Runtime:
    """The command's runtime, built on first use; ``main`` closes it when the command ends
    (``close_runtime``), so the events it published are sent before the process exits."""
    rt: Runtime | None = getattr(args, "runtime", None)
    if rt is None:
        # Imported on use: ``celery-ext --help`` and a usage error need no Celery app.
        from celery_ext.factory import create_app
        from celery_ext.runtime import runtime_of

        rt = args.runtime = runtime_of(create_app(config_path=args.config))
    return rt


def close_runtime(args: argparse.Namespace) -> None:
    rt: Runtime | None = getattr(args, "runtime", None)
    if rt is not None:
        rt.close()


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")


def print_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    # Imported here: Celery loads this module's commands into every ``celery`` process of the
    # environment (``celery.commands``), workers included, which print no tables.
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    # Scripts and pipes get full ids rather than 80-column folding.
    Console(width=None if sys.stdout.isatty() else 200).print(table)
