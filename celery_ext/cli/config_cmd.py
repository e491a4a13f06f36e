"""``celery-ext config validate [PATH]``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from celery_ext.cli.common import EXIT_OK, EXIT_USAGE


def register(sub: Any) -> None:
    config = sub.add_parser("config", help="configuration commands")
    config_sub = config.add_subparsers(dest="config_command", metavar="COMMAND", required=True)
    validate = config_sub.add_parser("validate", help="validate a config file; print every error with its YAML path")
    validate.add_argument("path", nargs="?", help="file to check (default: the one --config would load)")
    validate.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    """Every error and warning of the file in one run (``celery_ext.config_check``)."""
    from celery_ext.config_check import check_file

    report = check_file(args.path or args.config)
    for line in report.warnings:
        print(f"warning: {line}", file=sys.stderr)
    for line in report.errors:
        print(line, file=sys.stderr)
    if report.errors:
        return EXIT_USAGE
    print(f"{report.source or '(built-in defaults)'}: valid")
    return EXIT_OK
