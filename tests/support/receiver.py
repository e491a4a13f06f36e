"""A real webhook receiver on 127.0.0.1 (a free port) that records every POST."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class WebhookReceiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, fail_first: int = 0) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.calls: list[dict[str, Any]] = []  # {"body": bytes, "json": ..., "headers": {...}}
        self.fail_first = fail_first  # answer 500 to this many requests first
        self.attempts = 0
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook?token=abc"

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        with self.lock:
            return [c for c in self.calls if c["json"]["event"]["type"] == kind]

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: WebhookReceiver

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.server.lock:
            self.server.attempts += 1
            failing = self.server.attempts <= self.server.fail_first
            if not failing:
                headers = {k.lower(): v for k, v in self.headers.items()}
                self.server.calls.append({"body": body, "json": json.loads(body), "headers": headers})
        self.send_response(500 if failing else 204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass
