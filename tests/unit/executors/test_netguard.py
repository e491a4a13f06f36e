"""The outbound network guard: address classification, allowed networks, host patterns, URL checks."""

from __future__ import annotations

import ipaddress

import pytest

from celery_ext.executors.netguard import DestinationNotAllowedError, HostPattern, NetPolicy, classify


@pytest.mark.parametrize(
    "address, kind",
    [
        ("8.8.8.8", "public"),
        ("2606:4700:4700::1111", "public"),
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("100.64.0.1", "shared"),
        ("240.0.0.1", "reserved"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped IPv6 reaches the IPv4 address
        ("::ffff:169.254.169.254", "link-local"),
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 form of 169.254.169.254
    ],
)
def test_classify(address: str, kind: str) -> None:
    assert classify(ipaddress.ip_address(address)) == kind


def test_allow_networks_admit_listed_non_public_addresses_only() -> None:
    policy = NetPolicy.build(None, ["127.0.0.1/32", "10.0.0.0/8"])
    assert policy.check_address(ipaddress.ip_address("127.0.0.1")) is None
    assert policy.check_address(ipaddress.ip_address("10.9.9.9")) is None
    assert policy.check_address(ipaddress.ip_address("8.8.8.8")) is None
    assert "loopback" in (policy.check_address(ipaddress.ip_address("127.0.0.2")) or "")
    assert "link-local" in (policy.check_address(ipaddress.ip_address("169.254.169.254")) or "")


@pytest.mark.parametrize(
    "pattern, host, port, expected",
    [
        ("example.com", "example.com", 443, True),
        ("example.com", "EXAMPLE.com.", 80, True),
        ("example.com", "api.example.com", 443, False),
        ("example.com:8443", "example.com", 8443, True),
        ("example.com:8443", "example.com", 443, False),
        ("*.example.com", "api.example.com", 443, True),
        ("*.example.com", "a.b.example.com", 443, True),
        ("*.example.com", "example.com", 443, False),
        ("*.example.com", "badexample.com", 443, False),
        ("*.example.com:443", "api.example.com", 80, False),
        ("*", "anything.test", 1234, True),
        ("[::1]:8080", "::1", 8080, True),
        ("::1", "::1", 9, True),
        ("127.0.0.1", "127.0.0.1", 5000, True),
    ],
)
def test_host_patterns(pattern: str, host: str, port: int, expected: bool) -> None:
    assert HostPattern.parse(pattern).matches(host, port) is expected


@pytest.mark.parametrize("bad", ["", "a.*.com", "*example.com", "h:0", "h:http", "user@h", "[::1", "http://h/"])
def test_bad_host_patterns_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        HostPattern.parse(bad)


def test_check_url_scheme_and_allow_list() -> None:
    policy = NetPolicy.build(["api.example.com", "*.hooks.test:8443"])
    policy.check_url("https", "api.example.com", None)
    policy.check_url("https", "x.hooks.test", 8443)
    for scheme, host, port in [
        ("ftp", "api.example.com", None),
        ("https", "evil.test", None),
        ("https", "x.hooks.test", None),
        ("file", "", None),
    ]:
        with pytest.raises(DestinationNotAllowedError) as info:
            policy.check_url(scheme, host, port)
        assert info.value.reason == "destination_not_allowed"
    NetPolicy.build(None).check_url("http", "anything.test", None)  # unset allow_hosts: any name
