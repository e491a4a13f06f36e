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
    from celery_ext.config import find_config_file, load_config
    from celery_ext.errors import ConfigError
    from celery_ext.executors.pool import ExecutorSet
    from celery_ext.registry import STORAGE

    path = args.path or args.config
    try:
        config = load_config(path)
        errors: list[str] = []
        try:
            # What only a worker needs (the python executor's modules) is a warning here: this
            # host may be a client that cannot import the users' code.
            for problem in ExecutorSet.from_config(config).worker_problems():
                print(f"warning: {problem} (a worker with this config would refuse to start)", file=sys.stderr)
        except ConfigError as exc:
            errors.extend(exc.errors)
        try:
            STORAGE.resolve(config.storage.type, "storage.type").from_config(
                config.storage.type, config.storage.config, config.data_dir)
        except ConfigError as exc:
            errors.extend(exc.errors)
        try:
            from celery_ext.routing.router import build_balancer

            build_balancer(config)
        except ConfigError as exc:
            errors.extend(exc.errors)
        if errors:
            raise ConfigError(errors)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return EXIT_USAGE
    print(f"{find_config_file(path) or '(built-in defaults)'}: valid")
    return EXIT_OK
