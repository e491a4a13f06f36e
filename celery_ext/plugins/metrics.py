"""The ``metrics`` plugin: serves Prometheus text on ``/metrics`` from the worker's main process.

Under the prefork pool one scrape holds the counts of every pool child, replaced ones included
(see ``metrics.prometheus``).  It also samples, every ``sample_interval``, the length of every
celery_ext queue (``celery_ext_queue_length``) and this worker's tasks in flight
(``celery_ext_worker_load``).

Config keys (``plugins[i].config``):
  prometheus_port: TCP port (default 9808; 0 picks a free one, logged)
  bind:            address to listen on (default 127.0.0.1; set 0.0.0.0 to expose it)
  sample_interval: queue length / load sampling period (default 5s)
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from celery_ext.config import PositiveDuration
from celery_ext.errors import ConfigError
from celery_ext.plugins.base import Plugin, PluginContext

logger = logging.getLogger("celery_ext.plugins.metrics")


class MetricsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    prometheus_port: int = Field(9808, ge=0, le=65535)
    # Where ``celery -A celery_ext scheduler`` serves its own metrics (leader gauge, due lag,
    # schedule fires); another port, so that it can run next to a worker.  0 picks a free one.
    scheduler_port: int = Field(9809, ge=0, le=65535)
    bind: str = "127.0.0.1"
    sample_interval: PositiveDuration = 5.0


class MetricsPlugin(Plugin):
    name = "metrics"
    version = "1.0"
    settings_model = MetricsSettings

    def __init__(self) -> None:
        super().__init__()
        self.server: ThreadingHTTPServer | None = None
        self._stop = threading.Event()

    def start(self, ctx: PluginContext) -> None:
        s: MetricsSettings = self.settings
        collector = ctx.metrics
        if not hasattr(collector, "exposition"):
            raise ConfigError(
                f"{self.config_path}: the metrics plugin needs metrics.type prometheus (got {type(collector).__name__})"
            )
        collector.app_info(ctx.config.app.name, ctx.config.app.version or "")
        self.server = serve(collector, s.bind, s.prometheus_port)
        threading.Thread(target=self._sample_loop, args=(ctx,), name="celery_ext-metrics-sample", daemon=True).start()

    def stop(self, ctx: PluginContext) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    @property
    def port(self) -> int:
        return self.server.server_address[1] if self.server else 0

    def _sample_loop(self, ctx: PluginContext) -> None:
        while not self._stop.is_set():
            try:
                self.sample(ctx)
            except Exception as exc:  # noqa: BLE001 - a broker hiccup must not end sampling
                logger.warning("metrics sampling failed: %s", exc)
            self._stop.wait(self.settings.sample_interval)

    def sample(self, ctx: PluginContext) -> None:
        from celery.worker import state

        ctx.metrics.worker_load(ctx.worker_id, len(state.active_requests))
        if ctx.app is None:
            return
        prefix = f"{ctx.config.app.name}."
        plain = ctx.config.worker.celery_queue  # Celery's ``celery``, where plain producers send
        # Configured queues (``-Q`` may deselect some in this worker) and the ones it consumes.
        configured = [q.name for q in ctx.app.conf.task_queues or ()]
        names = sorted({n for n in [*configured, *ctx.app.amqp.queues] if n.startswith(prefix) or n == plain})
        with ctx.app.connection_for_read() as conn:
            for name in names:
                ctx.metrics.queue_length(name, _length(conn, name))


def serve(collector: Any, bind: str, port: int) -> ThreadingHTTPServer:
    """Serve ``collector``'s exposition at ``/metrics`` from a daemon thread."""
    server = ThreadingHTTPServer((bind, port), _handler(collector))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="celery_ext-metrics-http", daemon=True).start()
    logger.info("metrics on http://%s:%d/metrics", *server.server_address[:2])
    return server


def scheduler_metrics(config: Any, collector: Any) -> ThreadingHTTPServer | None:
    """The scheduler process's metrics endpoint, when the ``metrics`` plugin is enabled in its
    config (``plugins[].config.scheduler_port``, bound like the workers' endpoint)."""
    entry = next((p for p in config.plugins if p.name == "metrics" and p.enabled), None)
    if entry is None or not hasattr(collector, "exposition"):
        return None
    s = MetricsSettings.model_validate(entry.config or {})
    collector.app_info(config.app.name, config.app.version or "")
    return serve(collector, s.bind, s.scheduler_port)


def _length(conn: Any, name: str) -> int:
    try:
        return int(conn.default_channel.queue_declare(queue=name, passive=True).message_count)
    except Exception:  # noqa: BLE001 - a queue not declared yet holds nothing
        conn.collect()  # AMQP closes the channel on a missing queue; start afresh
        return 0


def _handler(collector: Any) -> type[BaseHTTPRequestHandler]:
    class MetricsHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404)
                return
            try:
                body, content_type = collector.exposition()
            except Exception as exc:  # noqa: BLE001
                logger.exception("metrics exposition failed")
                self.send_error(500, str(exc))
                return
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # scrapes every few seconds would flood the worker log

    return MetricsHandler
