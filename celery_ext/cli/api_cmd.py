"""``celery-ext api [--host H] [--port P] [--workers N]``: serve the REST API (``celery_ext.api``) with uvicorn.

With ``--workers N`` (N > 1) uvicorn starts N server processes (spawned, not forked) that share
the listening socket; each builds its own runtime (storage pool, broker connections) in
``celery_ext.api:from_environment`` from the config file named in ``$CELERY_EXT_CONFIG``, and
closes it at its shutdown.  The parent only migrates the store and supervises them.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from celery_ext.cli.common import EXIT_OK, EXIT_USAGE, CommandError, runtime
from celery_ext.config import ENV_VAR, find_config_file


def register(sub: Any) -> None:
    p = sub.add_parser("api", help="serve the REST API (api.host:api.port, default 127.0.0.1:8808)")
    p.add_argument("--host", help="bind address (default: api.host)")
    p.add_argument("--port", type=int, help="port (default: api.port)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="server processes sharing the port (default: 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise CommandError(f"--workers: must be at least 1, got {args.workers}", EXIT_USAGE)
    try:
        import uvicorn

        from celery_ext.api import create_api
    except ModuleNotFoundError as exc:
        raise CommandError(f"the REST API needs {exc.name}: pip install celery-ext[api]", EXIT_USAGE) from exc
    rt = runtime(args)
    rt.storage.migrate()
    settings = rt.config.api
    host, port = args.host or settings.host, args.port or settings.port
    if args.workers == 1:
        uvicorn.run(create_api(rt), host=host, port=port, log_level="info", access_log=False)
        return EXIT_OK
    # Each server process builds its own runtime from the same file; this one needs none.
    path = find_config_file(args.config)
    if path is not None:
        os.environ[ENV_VAR] = str(path.resolve())
    rt.close()
    uvicorn.run(
        "celery_ext.api:from_environment",
        factory=True,
        workers=args.workers,
        host=host,
        port=port,
        log_level="info",
        access_log=False,
    )
    return EXIT_OK
