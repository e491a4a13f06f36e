"""A real HTTP and JSON-RPC 2.0 server on 127.0.0.1 (a free port), run in a thread by tests.

Routes (GET or POST unless noted):
  /json                   200 JSON echo of method, path, query, headers, body
  /status/<code>          that status, JSON body {"status": code}
  /flaky/<key>?fail=n     500 the first n requests for <key>, then 200 {"calls": k}
  /slow?seconds=s         waits s seconds, then 200
  /redirect?to=<url>      302 to <url>
  /big?bytes=n            n bytes of "x" (text/plain)
  POST /rpc               JSON-RPC 2.0: add [a, b]; echo (params); flaky {key, fail} (error -32000
                          the first <fail> calls); slow {seconds}; anything else -32601.
Every request's id (for /rpc) and path are recorded in ``server.seen``.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest


class HttpTestServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.calls: Counter[str] = Counter()
        self.seen: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def count(self, key: str) -> int:
        with self.lock:
            self.calls[key] += 1
            return self.calls[key]

    def start(self) -> HttpTestServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-request (a capped body, a timeout) is what those tests do;
        anything else is printed, as socketserver does."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: HttpTestServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._route()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def _route(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with self.server.lock:
            self.server.seen.append({"method": self.command, "path": parts.path})
        segments = parts.path.strip("/").split("/")
        try:
            if parts.path == "/json":
                self._json(
                    200,
                    {
                        "method": self.command,
                        "path": parts.path,
                        "query": query,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": body.decode(errors="replace"),
                    },
                )
            elif segments[0] == "status":
                self._json(int(segments[1]), {"status": int(segments[1])})
            elif segments[0] == "flaky":
                n = self.server.count(segments[1])
                self._json(500 if n <= int(query.get("fail", "1")) else 200, {"calls": n})
            elif parts.path == "/slow":
                time.sleep(float(query.get("seconds", "1")))
                self._json(200, {"slept": float(query.get("seconds", "1"))})
            elif parts.path == "/redirect":
                self._send(302, b"", "text/plain", {"Location": query["to"]})
            elif parts.path == "/big":
                self._big(int(query.get("bytes", "0")))
            elif parts.path == "/rpc" and self.command == "POST":
                self._rpc(body)
            else:
                self._json(404, {"error": "not found"})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading (capped body, timeout): expected

    def setup(self) -> None:
        super().setup()
        # Headers and body go out as separate writes: without NODELAY, Nagle plus the client's
        # delayed ACK adds ~40 ms to every keep-alive response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _send(self, status: int, data: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _big(self, n: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(n))
        self.end_headers()
        chunk = b"x" * 65536
        while n > 0:
            self.wfile.write(chunk[:n])
            n -= len(chunk)

    def _rpc(self, body: bytes) -> None:
        call = json.loads(body)
        with self.server.lock:
            self.server.seen.append(
                {"rpc_id": call.get("id"), "method": call.get("method"), "params": call.get("params")}
            )
        method, params, rid = call.get("method"), call.get("params"), call.get("id")
        if method == "add":
            self._json(200, {"jsonrpc": "2.0", "id": rid, "result": params[0] + params[1]})
        elif method == "echo":
            self._json(200, {"jsonrpc": "2.0", "id": rid, "result": params})
        elif method == "flaky":
            n = self.server.count("rpc:" + params["key"])
            if n <= params.get("fail", 1):
                self._json(
                    200, {"jsonrpc": "2.0", "id": rid, "error": {"code": -32000, "message": f"server busy (call {n})"}}
                )
            else:
                self._json(200, {"jsonrpc": "2.0", "id": rid, "result": {"calls": n}})
        elif method == "slow":
            time.sleep(params["seconds"])
            self._json(200, {"jsonrpc": "2.0", "id": rid, "result": "late"})
        else:
            self._json(200, {"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": "Method not found"}})


@pytest.fixture(scope="module")
def server() -> Iterator[HttpTestServer]:
    """A test server on 127.0.0.1 for the tests of a module."""
    s = HttpTestServer().start()
    yield s
    s.stop()
