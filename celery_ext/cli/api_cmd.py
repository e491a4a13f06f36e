"""``celery-ext api [--host H] [--port P]``: serve the REST API (``celery_ext.api``) with uvicorn."""

from __future__ import annotations

import argparse
from typing import Any

from celery_ext.cli.common import EXIT_OK, EXIT_USAGE, CommandError, runtime


def register(sub: Any) -> None:
    p = sub.add_parser("api", help="serve the REST API (api.host:api.port, default 127.0.0.1:8808)")
    p.add_argument("--host", help="bind address (default: api.host)")
    p.add_argument("--port", type=int, help="port (default: api.port)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from celery_ext.api import create_api
    except ModuleNotFoundError as exc:
        raise CommandError(f"the REST API needs {exc.name}: pip install celery-ext[api]", EXIT_USAGE) from exc
    rt = runtime(args)
    rt.storage.migrate()
    settings = rt.config.api
    uvicorn.run(
        create_api(rt),
        host=args.host or settings.host,
        port=args.port or settings.port,
        log_level="info",
        access_log=False,
    )
    return EXIT_OK
