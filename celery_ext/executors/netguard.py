"""Outbound network guard shared by the ``http`` and ``rpc`` executors.

Config keys (in the executor's ``config``; see ``executors/httpclient.py``):
  allow_hosts:    ``host``, ``host:port``, ``[v6addr]:port``, ``*.example.com`` (any subdomain,
                  not the bare domain) or ``*`` (any host).  Unset: any host name.  Set: nothing
                  else is reachable (the hosts of configured ``endpoints`` are always allowed).
  allow_networks: CIDRs of non-public addresses that may be reached anyway (empty by default).

Two checks, both applied to every request including each redirect hop:
  1. ``GuardedTransport`` checks the URL: scheme http/https and host in ``allow_hosts``.
  2. ``GuardedBackend`` resolves the host itself, checks every address, and connects to the
     checked address, so a name that resolves (or re-resolves: DNS rebinding) to loopback,
     private, link-local (169.254.169.254) or another non-public address is refused.
A refusal raises ``DestinationNotAllowedError`` (reason ``destination_not_allowed``).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery_ext.errors import PermanentError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_PORTS = {"http": 80, "https": 443}
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: not private, not public
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class DestinationNotAllowedError(PermanentError):
    """A URL or address the guard refuses; never retried."""

    def __init__(self, message: str) -> None:
        super().__init__("destination_not_allowed", message)


def classify(ip: IPAddress) -> str:
    """``"public"`` or the kind of non-public address (``loopback``, ``private``, ...)."""
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv6 form of an IPv4 address reaches that IPv4 address: judge the embedded one.
        if ip.ipv4_mapped is not None:
            return classify(ip.ipv4_mapped)
        if ip in _NAT64:
            return classify(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip in _SHARED:
        return "shared"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "reserved"
    return "public"


@dataclass(frozen=True)
class HostPattern:
    """One ``allow_hosts`` entry."""

    host: str  # lowercase; "*" = any host; "*.x.y" = any subdomain of x.y
    port: int | None = None  # None = any port

    @classmethod
    def parse(cls, text: str) -> HostPattern:
        raw = text.strip().lower()
        host, port = raw, None
        if raw.startswith("["):  # [v6]:port or [v6]
            end = raw.find("]")
            if end < 0:
                raise ValueError(f"unclosed '[' in {text!r}")
            host, rest = raw[1:end], raw[end + 1 :]
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(f"expected ':port' after ']' in {text!r}")
                port = _port(rest[1:], text)
        elif raw.count(":") == 1:
            host, port_text = raw.split(":")
            port = _port(port_text, text)
        if (
            not host
            or any(c in host for c in "/@ ?#")
            or ("*" in host and host != "*" and not (host.startswith("*.") and "*" not in host[2:]))
        ):
            raise ValueError(f"not a host, host:port or *.domain pattern: {text!r}")
        return cls(host, port)

    def matches(self, host: str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        host = host.lower().rstrip(".")
        if self.host == "*":
            return True
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and len(host) > len(self.host) - 1
        return host == self.host


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port in {whole!r}")
    return int(text)


@dataclass(frozen=True)
class NetPolicy:
    """What the guard lets through; ``allow_hosts=None`` means any host name."""

    allow_hosts: tuple[HostPattern, ...] | None = None
    allow_networks: tuple[IPNetwork, ...] = ()
    schemes: frozenset[str] = field(default_factory=lambda: frozenset(DEFAULT_PORTS))

    @classmethod
    def build(
        cls,
        allow_hosts: Sequence[str] | None,
        allow_networks: Iterable[str | IPNetwork] = (),
        extra_hosts: Iterable[str] = (),
    ) -> NetPolicy:
        hosts = None
        if allow_hosts is not None:
            hosts = tuple(HostPattern.parse(h) for h in (*allow_hosts, *extra_hosts))
        nets = tuple(ipaddress.ip_network(n, strict=False) if isinstance(n, str) else n for n in allow_networks)
        return cls(hosts, nets)

    def check_url(self, scheme: str, host: str, port: int | None) -> None:
        """Raise ``DestinationNotAllowedError`` unless the URL's scheme and host are allowed."""
        if scheme not in self.schemes:
            raise DestinationNotAllowedError(f"scheme {scheme!r} is not allowed (only http and https)")
        if not host:
            raise DestinationNotAllowedError("URL has no host")
        effective = port or DEFAULT_PORTS[scheme]
        if self.allow_hosts is not None and not any(p.matches(host, effective) for p in self.allow_hosts):
            raise DestinationNotAllowedError(f"host {host}:{effective} is not in allow_hosts")

    def check_address(self, ip: IPAddress) -> str | None:
        """None if ``ip`` may be connected to, else why not."""
        kind = classify(ip)
        if kind == "public" or any(ip.version == n.version and ip in n for n in self.allow_networks):
            return None
        return f"address {ip} is {kind} and not in allow_networks"


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to (an IP literal resolves to itself), in resolver order."""
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: dict[IPAddress, None] = {}
    for _family, _type, _proto, _canon, sockaddr in infos:
        seen.setdefault(ipaddress.ip_address(str(sockaddr[0]).split("%")[0]), None)
    return list(seen)


def _make_backend(policy: NetPolicy) -> Any:
    import httpcore

    class GuardedBackend(httpcore.SyncBackend):
        """Resolves, checks, then connects to the checked address (never re-resolves)."""

        def connect_tcp(
            self,
            host: str,
            port: int,
            timeout: float | None = None,
            local_address: str | None = None,
            socket_options: Any = None,
        ) -> Any:
            try:
                addresses = resolve(host, port)
            except OSError as exc:
                raise httpcore.ConnectError(f"cannot resolve {host!r}: {exc}") from exc
            refused = [why for why in map(policy.check_address, addresses) if why]
            allowed = [ip for ip in addresses if policy.check_address(ip) is None]
            if not allowed:
                raise DestinationNotAllowedError(f"{host}: {refused[0]}")
            last: Exception | None = None
            for ip in allowed:  # like socket.create_connection: first address that answers
                try:
                    return super().connect_tcp(str(ip), port, timeout, local_address, socket_options)
                except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                    last = exc
            assert last is not None
            raise last

    return GuardedBackend()


def guarded_transport(policy: NetPolicy, *, verify: bool | str = True, max_connections: int = 10) -> Any:
    """An ``httpx`` transport that checks every request (redirects included) against ``policy``."""
    import ssl

    import httpcore
    import httpx

    class GuardedTransport(httpx.HTTPTransport):
        def __init__(self) -> None:
            # Built here rather than by HTTPTransport.__init__ so the pool gets our backend; no
            # proxy support on purpose: a proxy would make the guard check the proxy's address.
            if verify is True:
                context = ssl.create_default_context()
            elif verify is False:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            else:
                try:
                    context = ssl.create_default_context(cafile=verify)
                except (OSError, ssl.SSLError) as exc:
                    raise ValueError(f"verify: cannot load CA bundle {verify!r}: {exc}") from exc
            self._pool = httpcore.ConnectionPool(
                ssl_context=context,
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
                keepalive_expiry=5.0,
                network_backend=_make_backend(policy),
            )

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            policy.check_url(request.url.scheme, request.url.host, request.url.port)
            return super().handle_request(request)

    return GuardedTransport()
