"""The ``alert`` plugin: POSTs chosen events as JSON to a webhook.

Config keys (``plugins[i].config``):
  webhook_url:    http(s) URL to POST to (required; use ``${ENV}`` for secrets in it)
  events:         event types to send (default ``[task_failed, worker_offline]``)
  secret:         HMAC-SHA256 key; adds ``X-CeleryExt-Signature: sha256=<hex of the body>``
  timeout:        per request (default 5s)
  max_retries:    retries on connection errors, 5xx and 429 (default 3), backoff doubling from
  backoff:        (default 0.5s)
  dedupe_window:  the same event type for the same task/worker is sent once per window (default 5m)
  max_per_window: at most this many alerts per ``window`` (default 30, window 60s); the rest are
                  counted and reported in one ``alerts_suppressed`` alert when the window ends
  scope:          ``local`` (default): events of this worker only, so N workers do not send N
                  copies; ``all``: every event on the bus
  headers:        extra HTTP headers

Sending happens on the plugin's own thread: a slow receiver never holds up a task or the bus.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from celery_ext.config import Duration, PositiveDuration
from celery_ext.events.model import EVENT_TYPES, TASK_FAILED, WORKER_OFFLINE, Event
from celery_ext.plugins.base import Plugin, PluginContext

logger = logging.getLogger("celery_ext.plugins.alert")

SIGNATURE_HEADER = "X-CeleryExt-Signature"


class AlertSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    webhook_url: str = Field(pattern=r"^https?://")
    events: list[str] = Field(default_factory=lambda: [TASK_FAILED, WORKER_OFFLINE])
    secret: str | None = None
    timeout: PositiveDuration = 5.0
    max_retries: int = Field(3, ge=0)
    backoff: Duration = 0.5
    dedupe_window: Duration = 300.0
    max_per_window: int = Field(30, ge=1)
    window: PositiveDuration = 60.0
    scope: Literal["local", "all"] = "local"
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("events")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - EVENT_TYPES)
        if unknown:
            raise ValueError(f"unknown event types {unknown} (known: {', '.join(sorted(EVENT_TYPES))})")
        return value


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class AlertPlugin(Plugin):
    name = "alert"
    version = "1.0"
    settings_model = AlertSettings

    def __init__(self) -> None:
        super().__init__()
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(1000)
        self._seen: dict[tuple[str, str], float] = {}
        self._window_start = 0.0
        self._window_count = 0
        self.suppressed = 0
        self.sent = 0
        self.failed = 0
        self._thread: threading.Thread | None = None

    def start(self, ctx: PluginContext) -> None:
        s: AlertSettings = self.settings
        self._ctx = ctx
        self._thread = threading.Thread(target=self._send_loop, name="celery_ext-alert", daemon=True)
        self._thread.start()
        for kind in s.events:
            ctx.events.subscribe(kind, self.on_event, local_only=s.scope == "local")

    def stop(self, ctx: PluginContext) -> None:
        for kind in self.settings.events:
            ctx.events.unsubscribe(kind, self.on_event)
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(self.settings.timeout * 2)

    # --- deciding what to send ----------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        now = time.monotonic()
        key = (event.type, event.task_id or event.worker_id or event.id)
        window = self.settings.dedupe_window
        if now - self._seen.get(key, -window - 1) <= window:
            return
        self._seen[key] = now
        if len(self._seen) > 10000:  # keep memory bounded in a long failure storm
            self._seen = {k: t for k, t in self._seen.items() if now - t <= window}
        if now - self._window_start >= self.settings.window:
            self._flush_suppressed()
            self._window_start, self._window_count = now, 0
        if self._window_count >= self.settings.max_per_window:
            self.suppressed += 1
            return
        self._window_count += 1
        self._enqueue({"event": event.to_dict()})

    def _flush_suppressed(self) -> None:
        if self.suppressed:
            self._enqueue({"event": Event("alerts_suppressed", data={"count": self.suppressed}).to_dict()})
            self.suppressed = 0

    def _enqueue(self, body: dict[str, Any]) -> None:
        body.update(app=self._ctx.config.app.name, worker=self._ctx.worker_id)
        try:
            self._queue.put_nowait(body)
        except queue.Full:
            self.failed += 1

    # --- sending --------------------------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            body = self._queue.get()
            if body is None:
                return
            try:
                self.post(body)
            except Exception:  # noqa: BLE001 - an unreachable receiver must not end the thread
                logger.exception("alert not delivered")

    def post(self, body: dict[str, Any]) -> bool:
        s: AlertSettings = self.settings
        data = json.dumps(body, separators=(",", ":"), default=str).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "celery-ext-alert", **s.headers}
        if s.secret:
            headers[SIGNATURE_HEADER] = sign(s.secret, data)
        for attempt in range(s.max_retries + 1):
            request = urllib.request.Request(s.webhook_url, data=data, headers=headers, method="POST")  # noqa: S310
            try:
                with urllib.request.urlopen(request, timeout=s.timeout) as response:  # noqa: S310 - scheme checked
                    response.read()
                self.sent += 1
                return True
            except urllib.error.HTTPError as exc:
                if exc.code < 500 and exc.code != 429:
                    logger.error("alert refused by %s: HTTP %d", _host(s.webhook_url), exc.code)
                    break
                why = f"HTTP {exc.code}"
            except OSError as exc:
                why = str(exc)
            if attempt < s.max_retries:
                delay = s.backoff * 2**attempt
                logger.warning("alert to %s failed (%s); retry in %.1fs", _host(s.webhook_url), why, delay)
                time.sleep(delay)
        self.failed += 1
        return False


def _host(url: str) -> str:
    # Log the host only: the URL's path or query may carry a token.
    return url.split("/")[2] if url.count("/") >= 2 else "?"
