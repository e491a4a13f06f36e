"""``celery -A celery_ext scheduler``: a Celery sub-command (entry point group ``celery.commands``).

Runs ``celery_ext.scheduler.Scheduler`` until SIGTERM or SIGINT, then gives the leader lease up so
that another scheduler takes over at once.  ``--once`` does one round and prints its report as
JSON (for cron, or to look at what the scheduler would do).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from dataclasses import asdict
from typing import Any

import click
from celery.bin.base import CeleryCommand, CeleryOption, handle_preload_options


@click.command(cls=CeleryCommand)
@click.option(
    "--once",
    cls=CeleryOption,
    is_flag=True,
    default=False,
    help_group="Scheduler Options",
    help="Do one round, print its report as JSON and exit (1 if it was not the leader).",
)
@click.option(
    "-l", "--loglevel", cls=CeleryOption, default="INFO", help_group="Scheduler Options", help="Logging level."
)
@click.pass_context
@handle_preload_options
def scheduler(ctx: click.Context, once: bool, loglevel: str) -> None:
    """Run the celery_ext scheduler: leader election, recovery, unpublished tasks, retention."""
    from celery_ext.runtime import runtime_of
    from celery_ext.scheduler import Scheduler

    logging.basicConfig(
        level=loglevel.upper(), stream=sys.stderr, format="[%(asctime)s: %(levelname)s/%(name)s] %(message)s"
    )
    rt = runtime_of(ctx.obj.app)
    if not rt.config.scheduler.enabled:
        # The design's one config for every role: this one runs no scheduler.
        logging.getLogger("celery_ext.scheduler").warning(
            "scheduler.enabled is false in %s: not starting a scheduler", rt.config.source or "the config"
        )
        ctx.exit(0)
    rt.storage.migrate()
    sched = Scheduler(rt)
    if once:
        report = sched.tick()
        if sched.lease is not None and report.leader:
            sched.lease.release()
        rt.close()  # the round's events go out before the process exits
        click.echo(json.dumps(asdict(report), default=str))
        ctx.exit(0 if report.leader else 1)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        logging.getLogger("celery_ext.scheduler").info("got %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    from celery_ext.plugins.metrics import scheduler_metrics

    metrics = scheduler_metrics(rt.config, rt.metrics)
    stop_watching = follow_config(sched)
    try:
        sched.run(stop)
    finally:
        stop_watching()
        if metrics is not None:
            metrics.shutdown()
            metrics.server_close()
        rt.close()  # the last leader_changed event goes out


def follow_config(sched: Any) -> Any:
    """Apply live config changes (its source's and ``config apply``'s: celery_ext/reload.py) and
    announce this scheduler's config version for ``celery-ext config status`` every round."""
    from celery_ext.config_store import SchedulerPresence
    from celery_ext.reload import SchedulerReloader, config_loaders, watch

    rt = sched.rt
    reloader = SchedulerReloader(sched, rt.config)
    log = logging.getLogger("celery_ext.scheduler")

    def on_change(new: Any) -> None:
        applied, restart = reloader.apply(new)
        if restart:
            log.warning(
                "config %s changed %s: needs a scheduler restart to take effect", new.source, ", ".join(restart)
            )
        if applied:
            log.warning("config %s reloaded: applied %s", new.source, ", ".join(applied))

    stop = watch(config_loaders(rt), on_change)
    presence = None
    if sched.lease is not None:
        presence = SchedulerPresence(sched.lease.client, rt.config.app.name, sched.holder, 3 * sched.config.interval)
        current = presence

        def announce(report: Any) -> None:
            current.ttl = 3 * sched.config.interval
            current.announce(reloader.version, reloader.restart_needed, report.leader)

        sched.after_tick = announce

    def stop_all() -> None:
        stop()
        if presence is not None:
            try:
                presence.withdraw()
            except Exception:  # noqa: BLE001, S110 - its entry ages out
                pass

    return stop_all
