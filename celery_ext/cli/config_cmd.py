"""``celery-ext config validate [PATH]``, ``config apply PATH``, ``config status``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from celery_ext.cli.common import (
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    CommandError,
    add_json,
    print_json,
    print_table,
    runtime,
)


def register(sub: Any) -> None:
    config = sub.add_parser("config", help="configuration commands")
    config_sub = config.add_subparsers(dest="config_command", metavar="COMMAND", required=True)
    validate = config_sub.add_parser("validate", help="validate a config file; print every error with its YAML path")
    validate.add_argument("path", nargs="?", help="file or config URL to check (default: the one --config would load)")
    validate.set_defaults(func=cmd_validate)
    apply = config_sub.add_parser(
        "apply", help="validate a config file and push it to every worker and scheduler of its app"
    )
    apply.add_argument("path", help="the config file")
    apply.set_defaults(func=cmd_apply)
    status = config_sub.add_parser(
        "status", help="the config version each worker and scheduler runs, and what waits for a restart"
    )
    add_json(status)
    status.set_defaults(func=cmd_status)


def _print_report(report: Any) -> None:
    for line in report.warnings:
        print(f"warning: {line}", file=sys.stderr)
    for line in report.errors:
        print(line, file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    """Every error and warning of the file in one run (``celery_ext.config_check``)."""
    from celery_ext.config_check import check_file

    report = check_file(args.path or args.config)
    _print_report(report)
    if report.errors:
        return EXIT_USAGE
    print(f"{report.source or '(built-in defaults)'}: valid")
    return EXIT_OK


def cmd_apply(args: argparse.Namespace) -> int:
    """Validate (as ``validate`` does), then store it as the app's config (``config_store``)."""
    from celery_ext.config_check import check_file
    from celery_ext.config_store import apply_config
    from celery_ext.factory import broker_for
    from celery_ext.routing.router import registry_url_for

    if "://" in args.path:
        raise CommandError(f"config apply takes a file (got {args.path!r})")
    report = check_file(args.path)
    _print_report(report)
    if report.errors or report.config is None:
        print(f"{args.path}: not applied", file=sys.stderr)
        return EXIT_USAGE
    config = report.config
    url = registry_url_for(config, broker_for(config)[0])
    if url is None:
        raise CommandError(
            "config apply needs the worker registry: the broker is not Redis and scheduler.registry_url is not set",
            EXIT_UNAVAILABLE,
        )
    try:
        applied = apply_config(args.path, config, url)
    except Exception as exc:  # noqa: BLE001 - any client error means the registry is unreachable
        raise CommandError(f"worker registry unreachable: {exc}", EXIT_UNAVAILABLE) from exc
    print(f"applied {report.source} as version {applied.version} of app {config.app.name} (key {applied.key})")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """Per worker and scheduler: the config version it runs, whether it is the applied one, and
    the keys that wait for its restart."""
    from celery_ext.config_store import Component, applied_config, config_key, schedulers

    rt = runtime(args)
    registry = rt.registry
    if registry is None:
        raise CommandError(
            "no worker registry: the broker is not Redis and scheduler.registry_url is not set", EXIT_UNAVAILABLE
        )
    name = rt.config.app.name
    try:
        applied = applied_config(registry.client, config_key(name))
        components = [Component("worker", w.id, w.config_version, w.restart_needed) for w in registry.all() if w.online]
        components += schedulers(registry.client, name)
    except Exception as exc:  # noqa: BLE001 - any client error means the registry is unreachable
        raise CommandError(f"worker registry unreachable: {exc}", EXIT_UNAVAILABLE) from exc
    version = applied.version if applied is not None else None

    def state(c: Component) -> str:
        if version is None:
            return "-"
        return "applied" if c.config_version == version else "differs"

    if args.json:
        print_json(
            {
                "app": name,
                "applied": None if applied is None else vars(applied),
                "components": [
                    {
                        "kind": c.kind,
                        "id": c.id,
                        "config_version": c.config_version,
                        "matches": None if version is None else c.config_version == version,
                        "restart_needed": list(c.restart_needed),
                        "leader": c.leader if c.kind == "scheduler" else None,
                    }
                    for c in components
                ],
            }
        )
        return EXIT_OK
    if applied is None:
        print(f"app {name}: no config applied (`celery-ext config apply FILE`)")
    else:
        print(f"app {name}: applied version {applied.version} from {applied.source} at {applied.applied_at}")
    rows = [
        (c.kind, c.id + (" (leader)" if c.leader else ""), c.config_version, state(c), ", ".join(c.restart_needed))
        for c in components
    ]
    print_table(None, ["kind", "id", "version", "state", "restart needed"], rows)
    return EXIT_OK
