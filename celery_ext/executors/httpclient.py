"""The guarded, pooled HTTP client shared by the ``http`` and ``rpc`` executors.

Config keys (besides ``timeout`` and ``max_retries``):
  endpoints:       {name: base URL}; payloads name one instead of giving a full URL.
  allow_hosts:     list of ``host``, ``host:port``, ``*.example.com``; unset = any host name.
  allow_networks:  list of CIDRs of non-public addresses that may be reached (default empty).
  max_redirects:   redirects followed per request (default 5; 0 = none followed).
  max_body_bytes:  response body cap; a larger body is truncated and says so (default 1 MiB).
  request_timeout: per-request timeout when the payload gives none (default 30s).
  max_connections: pool size per worker process (default 10).
  verify:          TLS verification: true, false, or a CA bundle path (default true).
  headers:         headers sent with every request (use ``${ENV}`` for secrets).

Reason codes: destination_not_allowed, too_many_redirects, invalid_payload, unknown_endpoint,
invalid_response (permanent);
timeout, connect_error, transport_error (retried).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator

from celery_ext.config import PositiveDuration, format_errors
from celery_ext.errors import PermanentError, TransientError
from celery_ext.executors.base import ExecutorSettings
from celery_ext.executors.netguard import DEFAULT_PORTS, HostPattern, NetPolicy, guarded_transport

logger = logging.getLogger(__name__)

MiB = 1024 * 1024


class HttpClientSettings(ExecutorSettings):
    endpoints: dict[str, str] = Field(default_factory=dict)
    allow_hosts: list[str] | None = None
    allow_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(default_factory=list)
    max_redirects: int = Field(5, ge=0, le=50)
    max_body_bytes: int = Field(MiB, ge=0)
    request_timeout: PositiveDuration = 30.0
    max_connections: int = Field(10, ge=1)
    verify: bool | str = True
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("endpoints")
    @classmethod
    def _check_endpoints(cls, value: dict[str, str]) -> dict[str, str]:
        for name, url in value.items():
            parts = urlsplit(url)
            if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
                raise ValueError(f"endpoint {name!r}: expected an http(s) URL with a host (got {url!r})")
        return value

    @field_validator("allow_hosts")
    @classmethod
    def _check_hosts(cls, value: list[str] | None) -> list[str] | None:
        for entry in value or ():
            HostPattern.parse(entry)  # ValueError names the bad entry
        return value

    def policy(self) -> NetPolicy:
        endpoint_hosts = []
        for url in self.endpoints.values():
            parts = urlsplit(url)
            host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
            endpoint_hosts.append(f"{host}:{parts.port or DEFAULT_PORTS[parts.scheme]}")
        return NetPolicy.build(self.allow_hosts, self.allow_networks, endpoint_hosts)


def parse_payload(model: type[Any], payload: dict[str, Any]) -> Any:
    """Validate ``payload``; a failure is ``invalid_payload`` naming each bad field."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise PermanentError("invalid_payload", "; ".join(format_errors(exc, "payload"))) from None


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    truncated: bool
    elapsed: float
    url: str
    encoding: str | None

    def text(self) -> str:
        return self.body.decode(self.encoding or "utf-8", errors="replace")

    def json(self) -> Any:
        """The parsed body if it is complete JSON, else None."""
        if self.truncated or not self.body:
            return None
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def to_result(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": self.status,
            "headers": self.headers,
            "body": self.text(),
            "truncated": self.truncated,
            "elapsed": round(self.elapsed, 6),
            "url": self.url,
        }
        if "json" in self.headers.get("content-type", ""):
            out["json"] = self.json()
        return out


class HttpClient:
    """One pooled ``httpx.Client`` per worker process, behind the network guard."""

    def __init__(self, settings: HttpClientSettings) -> None:
        try:
            import httpx
        except ImportError as exc:
            raise ImportError("the http and rpc executors need httpx: pip install celery-ext[http]") from exc
        self.settings = settings
        self._httpx = httpx
        self.client = httpx.Client(
            transport=guarded_transport(
                settings.policy(), verify=settings.verify, max_connections=settings.max_connections
            ),
            follow_redirects=settings.max_redirects > 0,
            max_redirects=settings.max_redirects,
            headers=settings.headers,
            trust_env=False,
            timeout=settings.request_timeout,
        )

    def url_for(self, endpoint: str, path: str = "") -> str:
        base = self.settings.endpoints.get(endpoint)
        if base is None:
            known = ", ".join(sorted(self.settings.endpoints)) or "(none configured)"
            raise PermanentError("unknown_endpoint", f"payload.endpoint: no endpoint {endpoint!r} (known: {known})")
        if not path:
            return base
        return base.rstrip("/") + "/" + path.lstrip("/")

    def merge_params(self, url: str, params: dict[str, Any]) -> str:
        """``url`` with ``params`` added to its query (httpx's ``params=`` would replace the query)."""
        try:
            return str(self._httpx.URL(url).copy_merge_params(params))
        except self._httpx.InvalidURL as exc:
            raise PermanentError("invalid_payload", f"payload.url: {exc}") from exc

    def request(self, method: str, url: str, *, timeout: float | None = None, **kwargs: Any) -> HttpResponse:
        """Send one request; network failures become ``TransientError``/``PermanentError``."""
        httpx = self._httpx
        timeout = timeout or self.settings.request_timeout
        start = time.monotonic()
        try:
            with self.client.stream(method, url, timeout=timeout, **kwargs) as resp:
                body, truncated = self._read_capped(resp, start + timeout)
                return HttpResponse(
                    resp.status_code,
                    _flat_headers(resp.headers),
                    body,
                    truncated,
                    time.monotonic() - start,
                    str(resp.url),
                    resp.encoding,
                )
        except httpx.TimeoutException as exc:
            raise TransientError(
                "timeout", f"{method} {url}: no answer within {timeout:g}s ({exc.__class__.__name__})"
            ) from exc
        except httpx.TooManyRedirects as exc:
            raise PermanentError(
                "too_many_redirects", f"{method} {url}: more than {self.settings.max_redirects} redirects"
            ) from exc
        except httpx.ConnectError as exc:
            raise TransientError("connect_error", f"{method} {url}: {exc}") from exc
        except httpx.DecodingError as exc:
            raise PermanentError("invalid_response", f"{method} {url}: {exc}") from exc
        except (httpx.InvalidURL, httpx.UnsupportedProtocol, httpx.LocalProtocolError) as exc:
            # Checked before TransportError, their base: these come from what we were asked to send.
            raise PermanentError("invalid_payload", f"{method} {url}: {exc}") from exc
        except httpx.TransportError as exc:
            raise TransientError("transport_error", f"{method} {url}: {exc.__class__.__name__}: {exc}") from exc

    def _read_capped(self, resp: Any, deadline: float) -> tuple[bytes, bool]:
        cap = self.settings.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        for chunk in resp.iter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size > cap:
                logger.warning("response body of %s truncated at %d bytes (max_body_bytes)", resp.url, cap)
                return b"".join(chunks)[:cap], True
            # Per-read timeouts do not bound a server that drips bytes: bound the whole body too.
            if time.monotonic() > deadline:
                raise self._httpx.ReadTimeout("response body not complete in time")
        return b"".join(chunks), False

    def close(self) -> None:
        self.client.close()


def _flat_headers(headers: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in headers.multi_items():
        key = key.lower()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out
