"""The http executor in a real worker process against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from celery_ext.model import Task, TaskStatus
from tests.conftest import Cluster, module_cluster
from tests.support.httpserver import HttpTestServer
from tests.support.services import unique

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cluster(
    server: HttpTestServer, tmp_path_factory: pytest.TempPathFactory, database_urls: dict[str, str]
) -> Iterator[Cluster]:
    """One worker for the module.  The test server is on loopback, hence allow_networks; the
    metadata address is allowed *by name* so that the address check is what refuses it."""
    http = {
        "type": "http",
        "config": {
            "allow_networks": ["127.0.0.1/32"],
            "allow_hosts": ["127.0.0.1", "169.254.169.254"],
            "endpoints": {"local": server.url("/")},
            "max_redirects": 3,
        },
    }
    yield from module_cluster(tmp_path_factory, database_urls, "http", [http])


def run(c: Cluster, payload: dict[str, Any], task_type: str = "http_request", **kw: Any) -> Task:
    t = c.manager.submit(task_type, payload, **kw)
    return c.manager.wait(t.task_id, 60)  # type: ignore[no-any-return]


def test_200_with_json(cluster: Cluster, server: HttpTestServer) -> None:
    t = run(
        cluster,
        {
            "method": "post",
            "url": server.url("/json?a=1"),
            "params": {"b": "2"},
            "headers": {"X-Trace": "abc"},
            "json": {"hello": "world"},
        },
    )
    assert t.status is TaskStatus.SUCCEEDED, t.error
    assert t.result["status"] == 200 and t.result["truncated"] is False
    echoed = t.result["json"]
    assert echoed["method"] == "POST" and echoed["query"] == {"a": "1", "b": "2"}
    assert echoed["headers"]["x-trace"] == "abc" and echoed["body"] == '{"hello":"world"}'
    assert t.result["headers"]["content-type"] == "application/json" and t.result["elapsed"] > 0


def test_endpoint_and_webhook(cluster: Cluster) -> None:
    t = run(cluster, {"endpoint": "local", "path": "/json", "body": "ping"}, "send_webhook")
    assert t.status is TaskStatus.SUCCEEDED, t.error
    assert t.result["json"]["method"] == "POST" and t.result["json"]["body"] == "ping"


def test_500_then_200_is_retried(cluster: Cluster, server: HttpTestServer) -> None:
    key = unique("k")
    t = run(cluster, {"url": server.url(f"/flaky/{key}?fail=1")}, max_retries=2)
    assert t.status is TaskStatus.SUCCEEDED, t.error
    assert t.attempt == 2 and t.result["json"] == {"calls": 2}


def test_500_exhausts_retries(cluster: Cluster, server: HttpTestServer) -> None:
    key = unique("k")
    t = run(cluster, {"url": server.url(f"/flaky/{key}?fail=10")}, max_retries=1)
    assert t.status is TaskStatus.FAILED and t.error and t.error.reason == "http_server_error"
    assert t.attempt == 2 and server.calls[key] == 2
    assert t.result["status"] == 500  # the failing response is kept for inspection


def test_4xx_fails_at_once(cluster: Cluster, server: HttpTestServer) -> None:
    t = run(cluster, {"url": server.url("/status/404")}, max_retries=3)
    assert t.status is TaskStatus.FAILED and t.error and t.error.reason == "http_status"
    assert t.attempt == 1
    t = run(cluster, {"url": server.url("/status/404"), "expected_status": [200, 404]})
    assert t.status is TaskStatus.SUCCEEDED and t.result["status"] == 404


def test_slow_endpoint_times_out(cluster: Cluster, server: HttpTestServer) -> None:
    t = run(cluster, {"url": server.url("/slow?seconds=3"), "timeout": 0.3}, max_retries=0)
    assert t.status is TaskStatus.FAILED and t.error and t.error.reason == "timeout"
    assert "0.3s" in t.error.message


def test_redirect_to_forbidden_address_is_refused(cluster: Cluster, server: HttpTestServer) -> None:
    t = run(cluster, {"url": server.url("/redirect?to=http://169.254.169.254/latest/meta-data/")}, max_retries=3)
    assert t.status is TaskStatus.FAILED and t.error and t.error.reason == "destination_not_allowed"
    assert "169.254.169.254 is link-local" in t.error.message and t.attempt == 1


def test_huge_body_is_capped(cluster: Cluster, server: HttpTestServer) -> None:
    t = run(cluster, {"url": server.url(f"/big?bytes={3 * 1024 * 1024}")})
    assert t.status is TaskStatus.SUCCEEDED, t.error
    assert t.result["truncated"] is True and len(t.result["body"]) == 1024 * 1024


def test_disallowed_host_and_scheme(cluster: Cluster) -> None:
    for url, words in [("http://example.com/", "not in allow_hosts"), ("ftp://127.0.0.1/", "scheme 'ftp'")]:
        t = run(cluster, {"url": url}, max_retries=3)
        assert t.status is TaskStatus.FAILED and t.error and t.error.reason == "destination_not_allowed"
        assert words in t.error.message and t.attempt == 1


def test_invalid_payload_names_the_field(cluster: Cluster) -> None:
    t = run(cluster, {"url": "http://127.0.0.1/", "timeout": "soon"}, max_retries=3)
    assert t.status is TaskStatus.FAILED and t.error and t.error.reason == "invalid_payload"
    assert "payload.timeout" in t.error.message and t.attempt == 1


def test_loopback_refused_without_allow_networks(make_cluster: Callable[..., Cluster], server: HttpTestServer) -> None:
    c = make_cluster(executors=[{"type": "http", "config": {}}])
    c.worker()
    t = run(c, {"url": server.url("/json")}, max_retries=2)
    assert t.status is TaskStatus.FAILED and t.error and t.error.reason == "destination_not_allowed"
    assert "127.0.0.1 is loopback" in t.error.message and t.attempt == 1


def test_failing_initialize_marks_only_http_unavailable(
    make_cluster: Callable[..., Cluster], server: HttpTestServer
) -> None:
    c = make_cluster(
        executors=[
            {"type": "http", "config": {"verify": "/nonexistent/ca-bundle.pem", "allow_networks": ["127.0.0.1/32"]}},
            {"type": "python", "config": {}},
        ]
    )
    w = c.worker()
    t = run(c, {"url": server.url("/json")}, max_retries=0)
    assert t.status is TaskStatus.FAILED and t.error and t.error.reason == "executor_unavailable"
    assert "ca-bundle.pem" in t.error.message
    echo = run(c, {"still": "up"}, "echo")
    assert echo.status is TaskStatus.SUCCEEDED and echo.result == {"still": "up"}
    assert "failed to initialize" in w.log()
