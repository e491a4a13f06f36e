"""The ``celery-ext`` command line.

Exit codes: 0 success (or task accepted), 1 the task ended failed/dead/cancelled,
2 usage or validation error, 3 a service (storage, broker) is unavailable.
Each command module adds its sub-commands through ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from celery_ext.cli import api_cmd, config_cmd, storage_cmd, tasks_cmd, workers_cmd
from celery_ext.cli.common import EXIT_UNAVAILABLE, EXIT_USAGE, CommandError
from celery_ext.errors import CeleryExtError, ConfigError, PublishError, StorageError, TaskError

MODULES = [tasks_cmd, config_cmd, storage_cmd, workers_cmd, api_cmd]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="celery-ext", description="Submit, inspect and manage celery_ext tasks.")
    parser.add_argument("--config", metavar="PATH", help="config.yaml (default: $CELERY_EXT_CONFIG, ./config.yaml)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except (ConfigError, TaskError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (StorageError, PublishError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except CeleryExtError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
