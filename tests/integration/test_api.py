"""The REST API: a real ``celery-ext api`` process on 127.0.0.1, a real worker, real HTTP."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import TEST_TASKS, Cluster
from tests.support.scrape import free_port, poll
from tests.support.workers import subprocess_env

pytestmark = pytest.mark.timeout(180)
TOKEN = "s3cret-token"


class ApiProcess:
    def __init__(self, cluster: Cluster, *args: str, startup: float = 30) -> None:
        self.port = free_port()
        self.log_path = cluster.tmp_path / "api.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery_ext.cli", "api", "--port", str(self.port), *args],
                env=subprocess_env(CELERY_EXT_CONFIG=str(cluster.config_path)),
                cwd=cluster.tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.url = f"http://127.0.0.1:{self.port}"
        try:
            poll(self.ready, startup, f"the api on port {self.port}")
        except AssertionError as exc:
            self.stop()  # else a server that starts late outlives the test
            raise AssertionError(f"{exc}; its log:\n{self.log_path.read_text()}") from None

    def ready(self) -> bool:
        assert self.proc.poll() is None, self.log_path.read_text()
        try:
            return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


@pytest.fixture
def api(make_cluster: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Cluster, httpx.Client]]:
    monkeypatch.setenv("API_TOKEN", TOKEN)  # the secret comes from the environment of every process
    c = make_cluster(executors=TEST_TASKS, api={"token": "${API_TOKEN}"})
    c.worker()
    server = ApiProcess(c)
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as client:
        yield c, client
    server.stop()


def wait_done(client: httpx.Client, task_id: str) -> dict[str, Any]:
    def record() -> dict[str, Any]:
        return client.get(f"/tasks/{task_id}").json()  # type: ignore[no-any-return]

    poll(lambda: record()["status"] in ("succeeded", "failed", "cancelled", "dead"), 30, f"task {task_id}")
    return record()


def test_submit_follow_list_and_read_logs(api: tuple[Cluster, httpx.Client]) -> None:
    c, client = api
    r = client.post("/tasks", json={"task_type": "chatty", "payload": {"lines": 3}, "max_retries": 0})
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["status"] == "queued" and created["task_type"] == "chatty"
    done = wait_done(client, created["task_id"])
    assert done["status"] == "succeeded" and done["worker_id"]
    assert done == c.manager.get(created["task_id"]).to_dict()  # the same record the CLI prints

    logs = client.get(f"/tasks/{created['task_id']}/logs").json()["items"]
    assert len(logs) >= 3 and all(line["attempt"] == 1 for line in logs)

    page = client.get("/tasks", params={"status": "succeeded", "type": "chatty", "limit": 10}).json()
    assert [t["task_id"] for t in page["items"]] == [created["task_id"]] and page["next_cursor"] is None
    assert client.get("/tasks", params={"status": "bogus"}).json()["error"]["code"] == "invalid_payload"

    again = client.post("/tasks", json={"task_type": "echo", "idempotency_key": "k1"})
    same = client.post("/tasks", json={"task_type": "echo", "idempotency_key": "k1"})
    assert (again.status_code, same.status_code) == (201, 200)
    assert same.json()["task_id"] == again.json()["task_id"]
    workers = client.get("/workers").json()["items"]
    assert len(workers) == 1 and workers[0]["capacity"] >= 1


def test_list_by_canvas_ids(api: tuple[Cluster, httpx.Client]) -> None:
    """``GET /tasks?root_id=&parent_id=&group_id=``: a workflow's records, as Celery links them."""
    c, client = api
    first, second, third = c.manager.submit_chain([{"task_type": "echo", "payload": {"step": i}} for i in range(3)])
    members = c.manager.submit_group([{"task_type": "echo", "payload": {"member": i}} for i in range(2)])

    def ids(**params: str) -> set[str]:
        r = client.get("/tasks", params=params)
        assert r.status_code == 200, r.text
        return {t["task_id"] for t in r.json()["items"]}

    assert ids(root_id=first.task_id) == {first.task_id, second.task_id, third.task_id}
    assert ids(parent_id=first.task_id) == {second.task_id}
    assert ids(group_id=members[0].group_id or "") == {t.task_id for t in members}
    assert ids(root_id="no-such-root") == set()
    bad = client.get("/tasks", params={"group_id": "x" * 256})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_payload", bad.text


def test_cancel_retry_and_conflicts(api: tuple[Cluster, httpx.Client]) -> None:
    _, client = api
    later = client.post("/tasks", json={"task_type": "echo", "delay": 60}).json()
    cancelled = client.post(f"/tasks/{later['task_id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = client.post(f"/tasks/{later['task_id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["status"] == "cancelled"
    retried = client.post(f"/tasks/{later['task_id']}/retry")
    assert retried.status_code == 200 and retried.json()["status"] in ("queued", "running", "succeeded")
    assert wait_done(client, later["task_id"])["status"] == "succeeded"


def test_bad_input_gets_clear_errors_and_nothing_is_written(api: tuple[Cluster, httpx.Client]) -> None:
    c, client = api
    before = c.manager.list(limit=1000).items
    cases = [
        ({"task_type": "nope"}, 400, "unknown_task_type"),
        ({"task_type": "echo", "payload": [1, 2]}, 400, "invalid_payload"),
        ({"task_type": "echo", "delay": "soon"}, 400, "invalid_payload"),
        ({"task_type": "echo", "colour": "blue"}, 400, "invalid_payload"),
        ({"payload": {}}, 400, "invalid_payload"),
    ]
    for body, status, code in cases:
        r = client.post("/tasks", json=body)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (body, r.text)
    unknown = client.post("/tasks", json={"task_type": "nope"}).json()["error"]
    assert "echo" in unknown["known_types"] and "nope" in unknown["message"]
    assert (
        client.post("/tasks", content=b"{not json", headers={"Content-Type": "application/json"}).json()["error"][
            "code"
        ]
        == "invalid_json"
    )
    big = client.post("/tasks", json={"task_type": "echo", "payload": {"x": "y" * 2_000_000}})
    assert big.status_code == 413
    assert client.get("/tasks/does-not-exist").status_code == 404
    assert c.manager.list(limit=1000).items == before  # nothing written


def test_the_token_is_required_and_health_is_public(api: tuple[Cluster, httpx.Client]) -> None:
    _, client = api
    base = str(client.base_url)
    assert httpx.get(f"{base}/tasks").status_code == 401
    assert httpx.get(f"{base}/tasks", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_api_with_two_server_processes(make_cluster: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--workers 2``: two spawned server processes, each with its own runtime built after it
    started, serve the same port; one SIGKILLed is replaced; SIGTERM stops them, and each closes
    its runtime."""
    monkeypatch.setenv("API_TOKEN", TOKEN)
    c = make_cluster(executors=TEST_TASKS, api={"token": "${API_TOKEN}"})
    c.worker()
    server = ApiProcess(c, "--workers", "2", startup=240)  # two interpreters import everything
    try:

        def servers() -> list[int]:
            return [int(pid) for pid in re.findall(r"Started server process \[(\d+)\]", server.log_path.read_text())]

        poll(lambda: len(servers()) == 2, 120, "two server processes")
        assert server.proc.pid not in servers()
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as client:
            ids = []
            for i in range(20):  # a new connection each: the kernel spreads them over both processes
                r = httpx.post(
                    f"{server.url}/tasks",
                    json={"task_type": "echo", "payload": {"i": i}},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )
                assert r.status_code == 201, r.text
                ids.append(r.json()["task_id"])
            for task_id in ids:
                assert wait_done(client, task_id)["status"] == "succeeded"
            listed = {t["task_id"] for t in client.get("/tasks", params={"limit": 1000}).json()["items"]}
            assert set(ids) <= listed
            assert client.get("/ui/tasks", follow_redirects=False).status_code in (200, 303)
            assert httpx.get(f"{server.url}/tasks").status_code == 401
        # A server process killed outright is replaced by a new one, which builds its own runtime.
        os.kill(servers()[0], signal.SIGKILL)
        poll(lambda: len(servers()) == 3, 120, "a replacement server process")
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as client:
            for _ in range(10):
                assert client.get("/tasks", params={"limit": 5}).status_code == 200
        pids = servers()[1:]
        for pid in pids:
            os.kill(pid, 0)  # alive
    finally:
        server.stop()
    assert server.proc.returncode == 0, server.log_path.read_text()
    log = server.log_path.read_text()
    assert len(re.findall(r"Finished server process", log)) == 2, log
    assert "Traceback" not in log, log
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_api_refuses_zero_workers(make_cluster: Any) -> None:
    c = make_cluster(executors=TEST_TASKS)
    r = subprocess.run(
        [sys.executable, "-m", "celery_ext.cli", "api", "--workers", "0"],
        env=subprocess_env(CELERY_EXT_CONFIG=str(c.config_path)),
        cwd=c.tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "--workers: must be at least 1, got 0" in r.stderr, r.stderr
