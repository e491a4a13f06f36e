"""``celery-ext workers [--json] [--all]``: the registered workers and their load."""

from __future__ import annotations

import argparse
import time
from typing import Any

from celery_ext.cli.common import EXIT_OK, EXIT_UNAVAILABLE, CommandError, add_json, print_json, print_table, runtime


def register(sub: Any) -> None:
    p = sub.add_parser("workers", help="list registered workers with their load")
    p.add_argument("--all", action="store_true", help="include workers that went offline and are not swept yet")
    add_json(p)
    p.set_defaults(func=cmd_workers)


def cmd_workers(args: argparse.Namespace) -> int:
    rt = runtime(args)
    registry = rt.registry
    if registry is None:
        raise CommandError(
            "no worker registry: the broker is not Redis and scheduler.registry_url is not set", EXIT_UNAVAILABLE
        )
    try:
        workers = [w for w in registry.all() if args.all or w.online]
    except Exception as exc:  # noqa: BLE001 - any client error means the registry is unreachable
        raise CommandError(f"worker registry unreachable: {exc}", EXIT_UNAVAILABLE) from exc
    if args.json:
        print_json([w.to_dict() for w in workers])
        return EXIT_OK
    now = time.time()
    rows = [
        (
            w.id,
            "offline" if not w.online else "online" if w.healthy else "unhealthy",
            f"{w.in_flight}/{w.capacity}",
            w.weight,
            ",".join(w.supported_types),
            f"{max(0.0, now - w.heartbeat_at):.1f}s",
            w.queue,
        )
        for w in workers
    ]
    print_table(
        f"{len(rows)} worker(s), strategy {rt.config.scheduler.load_balance_strategy}",
        ["worker", "state", "load", "weight", "types", "heartbeat", "queue"],
        rows,
    )
    for w in workers:
        if w.online and not w.healthy:
            print(f"{w.id}: {w.problem}")
    return EXIT_OK
