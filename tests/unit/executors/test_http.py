"""``HttpExecutor`` and its guarded client against a real HTTP server on 127.0.0.1: settings and payload
errors, loopback, redirects, the checked address, the body cap."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from celery_ext.errors import ConfigError, ExecutorError
from celery_ext.executors import netguard
from celery_ext.executors.http import HttpExecutor
from celery_ext.model import Task
from tests.support.httpserver import HttpTestServer


def executor(config: dict[str, Any]) -> HttpExecutor:
    ex = HttpExecutor(HttpExecutor.parse_settings(config))
    ex.initialize(ex.settings)
    return ex


def run(ex: HttpExecutor, payload: dict[str, Any], task_type: str = "http_request") -> Any:
    return ex.execute(Task("t1", task_type, payload)).data


def test_settings_errors_name_the_key() -> None:
    cases = [
        ({"allow_hosts": ["a.*.com"]}, "config.allow_hosts"),
        ({"allow_networks": ["10.0.0.0/33"]}, "config.allow_networks"),
        ({"endpoints": {"x": "ftp://h/"}}, "config.endpoints"),
        ({"max_body_bytes": -1}, "config.max_body_bytes"),
        ({"alow_hosts": []}, "config.alow_hosts"),
    ]
    for config, path in cases:
        with pytest.raises(ConfigError) as info:
            HttpExecutor.parse_settings(config)
        assert path in str(info.value)


def test_loopback_is_refused_without_allow_networks(server: HttpTestServer) -> None:
    ex = executor({})
    for url in (server.url("/json"), f"http://localhost:{server.port}/json"):
        with pytest.raises(ExecutorError) as info:
            run(ex, {"url": url})
        assert info.value.reason == "destination_not_allowed" and not info.value.retryable
        assert "127.0.0.1 is loopback" in str(info.value)
    ex.close()


def test_loopback_is_reached_when_allowed(server: HttpTestServer) -> None:
    ex = executor({"allow_networks": ["127.0.0.1/32"]})
    data = run(ex, {"url": f"http://localhost:{server.port}/json?a=1", "params": {"b": 2}})
    assert data["status"] == 200 and data["json"]["query"] == {"a": "1", "b": "2"}
    ex.close()


def test_redirect_is_checked_at_each_hop(server: HttpTestServer) -> None:
    ex = executor({"allow_networks": ["127.0.0.1/32"], "max_redirects": 2})
    with pytest.raises(ExecutorError) as info:
        run(ex, {"url": server.url("/redirect?to=http://169.254.169.254/latest/meta-data/")})
    assert info.value.reason == "destination_not_allowed" and "link-local" in str(info.value)
    hop = server.url("/redirect?to=/json")
    assert run(ex, {"url": hop})["url"] == server.url("/json")
    with pytest.raises(ExecutorError) as info:
        run(ex, {"url": server.url("/redirect?to=" + server.url("/redirect?to=" + hop))})
    assert info.value.reason == "too_many_redirects"
    ex.close()


def test_connects_to_the_checked_address(server: HttpTestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The name is resolved once per connection and the socket goes to that checked address:
    'rebind.invalid' exists in no DNS, so reaching the server proves no second lookup happened."""
    answers = iter([[ipaddress.ip_address("127.0.0.1")], [ipaddress.ip_address("169.254.169.254")]])
    calls: list[str] = []

    def fake_resolve(host: str, port: int) -> list[Any]:
        calls.append(host)
        return next(answers)

    monkeypatch.setattr(netguard, "resolve", fake_resolve)
    ex = executor({"allow_networks": ["127.0.0.1/32"]})
    assert run(ex, {"url": f"http://rebind.invalid:{server.port}/json"})["status"] == 200
    ex.close()
    ex = executor({"allow_networks": ["127.0.0.1/32"]})  # a new connection re-resolves: now rebound
    with pytest.raises(ExecutorError) as info:
        run(ex, {"url": f"http://rebind.invalid:{server.port}/json"})
    assert info.value.reason == "destination_not_allowed" and "169.254.169.254" in str(info.value)
    assert calls == ["rebind.invalid", "rebind.invalid"]
    ex.close()


def test_body_is_capped_and_says_so(server: HttpTestServer) -> None:
    ex = executor({"allow_networks": ["127.0.0.1/32"], "max_body_bytes": 1000})
    data = run(ex, {"url": server.url("/big?bytes=200000")})
    assert data["truncated"] is True and len(data["body"]) == 1000
    data = run(ex, {"url": server.url("/big?bytes=1000")})
    assert data["truncated"] is False and len(data["body"]) == 1000
    ex.close()


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"url": "http://h/", "endpoint": "x"}, "exactly one of url or endpoint"),
        ({}, "exactly one of url or endpoint"),
        ({"url": "http://h/", "method": "BREW"}, "payload.method"),
        ({"url": "http://h/", "timeout": -1}, "payload.timeout"),
        ({"url": "http://h/", "json": {}, "body": "x"}, "json or body"),
        ({"url": "http://h/", "headerz": {}}, "payload.headerz"),
        ({"endpoint": "nope"}, "no endpoint 'nope'"),
    ],
)
def test_invalid_payload_names_the_field(payload: dict[str, Any], field: str) -> None:
    ex = executor({})
    with pytest.raises(ExecutorError) as info:
        run(ex, payload)
    assert info.value.reason in ("invalid_payload", "unknown_endpoint") and not info.value.retryable
    assert field in str(info.value)
    ex.close()


def test_endpoint_hosts_are_allowed_even_with_allow_hosts(server: HttpTestServer) -> None:
    ex = executor(
        {
            "allow_hosts": ["api.example.com"],
            "allow_networks": ["127.0.0.1/32"],
            "endpoints": {"local": server.url("/")},
        }
    )
    assert run(ex, {"endpoint": "local", "path": "json"})["json"]["path"] == "/json"
    with pytest.raises(ExecutorError) as info:
        run(ex, {"url": f"http://localhost:{server.port}/json"})
    assert info.value.reason == "destination_not_allowed" and "not in allow_hosts" in str(info.value)
    ex.close()


def test_redirects_not_followed_when_max_redirects_is_zero(server: HttpTestServer) -> None:
    ex = executor({"allow_networks": ["127.0.0.1/32"], "max_redirects": 0})
    with pytest.raises(ExecutorError) as info:
        run(ex, {"url": server.url("/redirect?to=/json")})
    assert info.value.reason == "http_status" and info.value.data["status"] == 302  # type: ignore[index]
    assert run(ex, {"url": server.url("/redirect?to=/json"), "expected_status": 302})["status"] == 302
    ex.close()
