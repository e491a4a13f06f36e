"""The REST API's OpenAPI document, its JSON errors, batch submit and probes, and a schemathesis
run against the live API: a real ``celery-ext api`` process, a real worker, real HTTP."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from celery_ext.config import config_version, parse_config
from tests.conftest import TEST_TASKS, Cluster, cluster_data, storage_section
from tests.integration.test_api import ApiProcess, wait_done
from tests.support.scrape import free_port, poll
from tests.support.services import REDIS_HOST, REDIS_PORT, require, unique

pytestmark = pytest.mark.timeout(300)
TOKEN = "openapi-token"


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, database_urls: dict[str, str]
) -> Iterator[tuple[Cluster, ApiProcess]]:
    """One worker and one API process (token set) for the whole module."""
    require("Redis", REDIS_HOST, REDIS_PORT)
    data = cluster_data(
        unique("ce"),
        f"redis://{REDIS_HOST}:{REDIS_PORT}/0",
        storage_section("sqlite", database_urls),
        {"executors": TEST_TASKS, "api": {"token": TOKEN}},
    )
    cluster = Cluster(tmp_path_factory.mktemp("openapi"), data)
    cluster.worker()
    server = ApiProcess(cluster)
    yield cluster, server
    server.stop()
    for worker in cluster.workers:
        worker.kill()  # schemathesis leaves long sleep tasks behind: no warm shutdown for them
    cluster.close()


@pytest.fixture
def client(live: tuple[Cluster, ApiProcess]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live[1].url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
        yield c


def test_the_document_is_openapi_3_1_made_from_the_request_models(client: httpx.Client) -> None:
    doc = httpx.get(f"{client.base_url}/openapi.json").json()  # public: it holds no data
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {
        "/tasks",
        "/tasks:batch",
        "/tasks/{task_id}",
        "/tasks/{task_id}/logs",
        "/tasks/{task_id}/cancel",
        "/tasks/{task_id}/retry",
        "/workers",
        "/healthz",
        "/readyz",
        "/health",
    }
    submit = doc["components"]["schemas"]["SubmitRequest"]
    assert submit["additionalProperties"] is False and submit["required"] == ["task_type"]
    assert submit["properties"]["priority"]["maximum"] == 9 and "echo" in submit["properties"]["task_type"]["examples"]
    assert doc["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "api.token",
    }
    assert "422" not in str(doc["paths"])  # errors are 400 with the ErrorBody shape, as documented
    post = doc["paths"]["/tasks"]["post"]["responses"]
    assert {"200", "201", "400", "401", "413", "503"} <= set(post)

    # The same model refuses what the document refuses.
    r = client.post("/tasks", json={"task_type": "echo", "priority": 12})
    assert r.status_code == 400 and r.json()["error"] == {
        "code": "invalid_payload",
        "message": "priority: must be <= 9 (got 12)",
        "field": "priority",
    }
    strict = client.post("/tasks", json={"task_type": "echo", "max_retries": "3"})
    assert strict.status_code == 400 and strict.json()["error"]["field"] == "max_retries"


def test_errors_are_json_everywhere_and_bearer_is_case_insensitive(client: httpx.Client) -> None:
    base = str(client.base_url)
    missing = client.get("/no/such/route")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = client.delete("/tasks")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    assert set(wrong.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST"}
    assert client.put("/tasks/abc").json()["error"]["code"] == "method_not_allowed"
    no_token = httpx.get(f"{base}/tasks")
    assert no_token.status_code == 401 and no_token.json()["error"]["code"] == "unauthorized"
    assert no_token.headers["www-authenticate"] == "Bearer"
    for scheme in ("bearer", "BEARER", "Bearer"):
        assert httpx.get(f"{base}/tasks", headers={"Authorization": f"{scheme} {TOKEN}"}).status_code == 200
    assert httpx.get(f"{base}/tasks", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    assert client.get("/tasks", params={"cursor": "not-a-cursor"}).json()["error"]["field"] == "cursor"
    text = client.post("/tasks", content=b'{"task_type": "echo"}', headers={"Content-Type": "text/plain"})
    assert text.status_code == 400 and "application/json" in text.json()["error"]["message"]


def test_batch_submit_validates_all_then_submits_together(
    live: tuple[Cluster, ApiProcess], client: httpx.Client
) -> None:
    cluster, _ = live
    key = unique("batch-")
    r = client.post(
        "/tasks:batch",
        json={
            "tasks": [
                {"task_type": "echo", "payload": {"i": 0}},
                {"task_type": "echo", "payload": {"i": 1}, "priority": 5},
                {"task_type": "echo", "payload": {"i": 2}, "idempotency_key": key},
            ]
        },
    )
    assert r.status_code == 201, r.text
    items = r.json()["items"]
    assert [t["payload"] for t in items] == [{"i": 0}, {"i": 1}, {"i": 2}] and items[1]["priority"] == 5
    assert [wait_done(client, t["task_id"])["result"] for t in items] == [{"i": 0}, {"i": 1}, {"i": 2}]
    again = client.post("/tasks:batch", json={"tasks": [{"task_type": "echo", "idempotency_key": key}]})
    assert again.json()["items"][0]["task_id"] == items[2]["task_id"]

    before = len(cluster.manager.list(limit=1000).items)
    bad = client.post("/tasks:batch", json={"tasks": [{"task_type": "echo"}, {"task_type": "nope"}]})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "tasks[1].task_type"
    assert "echo" in bad.json()["error"]["known_types"]
    shape = client.post("/tasks:batch", json={"tasks": [{"task_type": "echo"}, {"task_type": "echo", "delay": -1}]})
    assert shape.status_code == 400 and shape.json()["error"]["field"] == "tasks[1].delay"
    assert client.post("/tasks:batch", json={"tasks": []}).status_code == 400
    assert len(cluster.manager.list(limit=1000).items) == before  # nothing of a refused batch is written


def test_cancel_can_terminate_a_running_task(live: tuple[Cluster, ApiProcess], client: httpx.Client) -> None:
    task = client.post("/tasks", json={"task_type": "sleep", "payload": {"seconds": 30}, "max_retries": 0}).json()
    poll(lambda: client.get(f"/tasks/{task['task_id']}").json()["status"] == "running", 30, "the sleep to start")
    r = client.post(f"/tasks/{task['task_id']}/cancel", params={"terminate": "true"})
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    worker = live[0].workers[0]
    poll(lambda: f"Terminating {task['task_id']}" in worker.log(), 20, "the worker to terminate the task")


def test_probes(live: tuple[Cluster, ApiProcess], client: httpx.Client, tmp_path: Path) -> None:
    base = str(client.base_url)
    cluster = live[0]
    # The API knows the config it runs: the same version a worker started from it reports.
    expected = config_version(parse_config(cluster.data, source=str(cluster.config_path)))
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok", "config_version": expected}
    assert httpx.get(f"{base}/readyz").json() == {"status": "ok", "checks": {"storage": "ok", "broker": "ok"}}

    # The same cluster with its broker gone: alive, not ready, and the answer says why.
    cluster, _ = live
    dead = Cluster(tmp_path, {**cluster.data, "broker": {"url": f"redis://127.0.0.1:{free_port()}/0"}})
    server = ApiProcess(dead)
    try:
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        r = httpx.get(f"{server.url}/readyz", timeout=30)
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["code"] == "unavailable" and error["checks"]["storage"] == "ok"
        assert error["checks"]["broker"] != "ok" and "broker" in error["message"]
    finally:
        server.stop()


def test_schemathesis_finds_no_server_error_and_no_schema_violation(live: tuple[Cluster, ApiProcess]) -> None:
    """Every operation, with the token, every check but one: ``positive_data_acceptance`` expects a
    2xx for any schema-valid body, but the set of task types is not in the schema (live workers
    advertise theirs), so a well-formed unknown type is rightly a 400."""
    _, server = live
    st = Path(sys.executable).with_name("schemathesis")
    run = subprocess.run(
        [
            str(st),
            "run",
            f"{server.url}/openapi.json",
            "-H",
            f"Authorization: Bearer {TOKEN}",
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--max-examples",
            "40",
            "--workers",
            "1",
            "--generation-database",
            "none",
            "--no-color",
            "--request-timeout",
            "30",
        ],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=server.log_path.parent,
    )
    assert run.returncode == 0, (
        f"{run.stdout[-12000:]}\n{run.stderr[-3000:]}\n--- api log ---\n{server.log_path.read_text()[-6000:]}"
    )
    assert "Tested: 11" in run.stdout, run.stdout[-3000:]
