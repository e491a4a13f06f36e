"""The ``celery-ext`` command line.

Exit codes: 0 success (or task accepted), 1 the task ended failed/dead/cancelled, or an unexpected
error (one line; ``--debug`` prints its traceback), 2 usage or validation error, 3 a service
(storage, broker) is unavailable, 4 a wait ran out before the task ended (it goes on).

Each command module adds its sub-commands through ``register(subparsers)``; they are imported when
the parser is built, because Celery imports this package into every ``celery`` process (workers,
``celery call``, Flower) for the ``celery.commands`` plugin (``scheduler_cmd``), which needs none
of them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence

from celery_ext.cli.common import (
    EXIT_TASK_FAILED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    EXIT_WAIT_TIMEOUT,
    CommandError,
    close_runtime,
)
from celery_ext.errors import (
    CeleryExtError,
    ConfigError,
    PublishError,
    ScheduleError,
    StorageError,
    TaskError,
    TaskWaitTimeoutError,
)

#: The command modules, in the order of ``celery-ext --help``.
MODULES = ("tasks_cmd", "config_cmd", "storage_cmd", "workers_cmd", "schedules_cmd", "api_cmd", "embedded_cmd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="celery-ext", description="Submit, inspect and manage celery_ext tasks.")
    parser.add_argument("--config", metavar="PATH", help="config.yaml (default: $CELERY_EXT_CONFIG, ./config.yaml)")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in MODULES:
        importlib.import_module(f"celery_ext.cli.{name}").register(sub)
    _debug_everywhere(sub)
    return parser


def _debug_everywhere(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``--debug`` also after the sub-command (``celery-ext submit echo --debug``)."""
    for parser in sub.choices.values():
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _debug_everywhere(action)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    finally:
        close_runtime(args)  # a producer's last events are sent before it exits


def _run(args: argparse.Namespace) -> int:
    try:
        code: int = args.func(args)
        return code
    except CommandError as exc:
        return _fail(exc, exc.code)
    except (ConfigError, TaskError, ScheduleError) as exc:
        return _fail(exc, EXIT_USAGE)
    except (StorageError, PublishError) as exc:
        return _fail(exc, EXIT_UNAVAILABLE)
    except TaskWaitTimeoutError as exc:  # the task goes on: not a service's failure
        return _fail(exc, EXIT_WAIT_TIMEOUT)
    except CeleryExtError as exc:
        return _fail(exc, EXIT_UNAVAILABLE)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback; --debug shows it
        if args.debug:
            traceback.print_exc()
        hint = "" if args.debug else " (run with --debug for the traceback)"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"error: unexpected {exc.__class__.__name__}{': ' + first if first else ''}{hint}", file=sys.stderr)
        return EXIT_TASK_FAILED


def _fail(exc: Exception, code: int) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
