"""The rpc executor in a real worker process against a real JSON-RPC 2.0 server on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
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
    rpc = {
        "type": "rpc",
        "config": {
            "allow_networks": ["127.0.0.1/32"],  # the test server is on loopback
            "endpoints": {"main": server.url("/rpc"), "broken": server.url("/status/503"), "html": server.url("/json")},
        },
    }
    yield from module_cluster(tmp_path_factory, database_urls, "rpc", [rpc])


def call(c: Cluster, payload: dict[str, Any], **kw: Any) -> Task:
    t = c.manager.submit("rpc_call", payload, **kw)
    return c.manager.wait(t.task_id, 60)  # type: ignore[no-any-return]


def ids_for(server: HttpTestServer, method: str, params: Any) -> list[str]:
    with server.lock:
        return [s["rpc_id"] for s in server.seen if s.get("method") == method and s.get("params") == params]


def test_success(cluster: Cluster, server: HttpTestServer) -> None:
    t = call(cluster, {"endpoint": "main", "method": "add", "params": [2, 40]})
    assert t.status is TaskStatus.SUCCEEDED, t.error
    assert t.result["result"] == 42
    assert ids_for(server, "add", [2, 40]) == [t.result["request_id"]]


def test_method_not_found_fails_at_once(cluster: Cluster) -> None:
    t = call(cluster, {"endpoint": "main", "method": "no_such_method"}, max_retries=3)
    assert t.status is TaskStatus.FAILED and t.error and t.error.reason == "rpc_error"
    assert "-32601" in t.error.message and "Method not found" in t.error.message
    assert t.result == {"code": -32601, "message": "Method not found", "data": None}
    assert t.attempt == 1


def test_server_error_is_retried_with_a_new_request_id(cluster: Cluster, server: HttpTestServer) -> None:
    params = {"key": unique("k"), "fail": 1}
    t = call(cluster, {"endpoint": "main", "method": "flaky", "params": params}, max_retries=2)
    assert t.status is TaskStatus.SUCCEEDED, t.error
    assert t.attempt == 2 and t.result["result"] == {"calls": 2}
    ids = ids_for(server, "flaky", params)
    assert len(ids) == 2 and len(set(ids)) == 2 and ids[-1] == t.result["request_id"]


def test_server_error_exhausts_retries(cluster: Cluster) -> None:
    params = {"key": unique("k"), "fail": 5}
    t = call(cluster, {"endpoint": "main", "method": "flaky", "params": params}, max_retries=1)
    assert t.status is TaskStatus.FAILED and t.error and t.error.reason == "rpc_error"
    assert t.attempt == 2 and t.result["code"] == -32000


def test_timeout(cluster: Cluster) -> None:
    t = call(cluster, {"endpoint": "main", "method": "slow", "params": {"seconds": 3}, "timeout": 0.3}, max_retries=0)
    assert t.status is TaskStatus.FAILED and t.error and t.error.reason == "timeout"


def test_http_errors_and_non_rpc_answers(cluster: Cluster) -> None:
    t = call(cluster, {"endpoint": "broken", "method": "add", "params": [1, 2]}, max_retries=1)
    assert t.status is TaskStatus.FAILED and t.error and t.error.reason == "http_server_error"
    assert t.attempt == 2
    t = call(cluster, {"endpoint": "html", "method": "add", "params": [1, 2]}, max_retries=2)
    assert t.status is TaskStatus.FAILED and t.error and t.error.reason == "invalid_response"
    assert t.attempt == 1


def test_unknown_endpoint_and_bad_payload(cluster: Cluster) -> None:
    t = call(cluster, {"endpoint": "nope", "method": "add"}, max_retries=2)
    assert t.status is TaskStatus.FAILED and t.error and t.error.reason == "unknown_endpoint"
    assert "known: broken, html, main" in t.error.message
    t = call(cluster, {"endpoint": "main", "method": "add", "params": "1,2"}, max_retries=2)
    assert t.status is TaskStatus.FAILED and t.error and t.error.reason == "invalid_payload"
    assert "payload.params" in t.error.message and t.attempt == 1
