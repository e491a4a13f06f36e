"""The dashboard under /ui: a real ``celery-ext api`` process, a real worker, a real browser
(Debian's chromium driven by Playwright).  Skipped on a laptop without chromium or playwright;
fails under CI=true (tests/support/flower.py: ``require_chromium``)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import TEST_TASKS, Cluster
from tests.integration.test_api import ApiProcess, wait_done
from tests.support.flower import require_chromium
from tests.support.scrape import poll
from tests.support.services import REDIS_HOST, REDIS_PORT

pytestmark = pytest.mark.timeout(240)
TOKEN = "dash-token-7"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def require_playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        message = "playwright is not installed: pip install celery-ext[test]"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI must install it)")
        pytest.skip(message)
    return sync_playwright


@pytest.fixture
def dash(make_cluster: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Cluster, ApiProcess, httpx.Client]]:
    monkeypatch.setenv("API_TOKEN", TOKEN)
    c = make_cluster(executors=TEST_TASKS, api={"token": "${API_TOKEN}"})
    c.worker()
    server = ApiProcess(c)
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as client:
        yield c, server, client
    server.stop()


@pytest.fixture
def browser() -> Iterator[Any]:
    binary = require_chromium()
    sync_playwright = require_playwright()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=binary, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def test_the_session_cookie_opens_the_ui_only(dash: tuple[Cluster, ApiProcess, httpx.Client]) -> None:
    _, server, client = dash
    anonymous = httpx.get(f"{server.url}/ui/tasks?status=failed")
    assert anonymous.status_code == 303
    assert anonymous.headers["location"] == "/ui/login?next=%2Fui%2Ftasks%3Fstatus%3Dfailed"
    assert httpx.get(f"{server.url}/ui/static/htmx.min.js").status_code == 200  # no session needed
    wrong = httpx.post(f"{server.url}/ui/login", data={"token": "nope"})
    assert wrong.status_code == 401 and "not the API token" in wrong.text
    assert "celery_ext_ui" not in wrong.headers.get("set-cookie", "")  # no session for a wrong token
    good = httpx.post(f"{server.url}/ui/login", data={"token": TOKEN, "next": "https://evil.example/"})
    assert good.status_code == 303 and good.headers["location"] == "/ui/tasks"  # never off-site
    cookie = good.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict") and "Path=/ui" in cookie
    assert TOKEN not in cookie
    session = {"celery_ext_ui": good.cookies["celery_ext_ui"]}
    assert httpx.get(f"{server.url}/ui/tasks", cookies=session).status_code == 200
    # The cookie is not a credential for the JSON API.
    assert httpx.get(f"{server.url}/tasks", cookies=session).status_code == 401
    assert client.get("/ui/tasks").status_code == 200  # the bearer header works on /ui too
    # A POST without the CSRF token is refused, shown as a message, and changes nothing.
    task = client.post("/tasks", json={"task_type": "echo", "delay": 60}).json()
    client.post(f"/tasks/{task['task_id']}/cancel")
    refused = httpx.post(f"{server.url}/ui/tasks/{task['task_id']}/retry", cookies=session)
    assert refused.status_code == 200 and "CSRF" in refused.text
    assert client.get(f"/tasks/{task['task_id']}").json()["status"] == "cancelled"
    # Bad filters and unknown ids are pages, not 500s.
    bad = client.get("/ui/tasks", params={"status": "bogus", "from": "yesterday"})
    assert bad.status_code == 200 and "unknown status bogus" in bad.text and "not a date" in bad.text
    assert "not_found" not in client.get("/ui/tasks/nope").text and client.get("/ui/tasks/nope").status_code == 404
    assert client.get("/ui/tasks", params={"cursor": "garbage"}).status_code == 200
    assert "/ui" not in str(httpx.get(f"{server.url}/openapi.json").json()["paths"])


def test_the_task_page_shows_reported_progress(dash: tuple[Cluster, ApiProcess, httpx.Client]) -> None:
    """A running task's ``update_state(state="PROGRESS", meta=...)`` is on its page (and the live
    part the page refreshes), and goes once the task has ended."""
    _, _, client = dash
    key = f"progress:{uuid.uuid4().hex}"
    task = client.post("/tasks", json={"task_type": "report_progress", "payload": {"key": key, "steps": 2}}).json()
    live = f"/ui/tasks/{task['task_id']}/live"
    poll(lambda: 'id="progress"' in client.get(live).text, 30, "the progress on the task page")
    page = client.get(f"/ui/tasks/{task['task_id']}").text
    assert "PROGRESS" in page and "&#34;done&#34;: 2" in page.replace("&quot;", "&#34;"), page[-2000:]
    redis.Redis(host=REDIS_HOST, port=REDIS_PORT).set(key, 1, ex=60)
    assert wait_done(client, task["task_id"])["status"] == "succeeded"
    assert 'id="progress"' not in client.get(f"/ui/tasks/{task['task_id']}").text


def test_dashboard_in_a_real_browser(
    dash: tuple[Cluster, ApiProcess, httpx.Client], browser: Any, tmp_path: Path
) -> None:
    c, server, client = dash
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.accept()))

    # Log in: the first page sends us to the form, the form back to the page we asked for.
    page.goto(f"{server.url}/ui/tasks")
    assert "/ui/login" in page.url
    page.fill("input[name=token]", "wrong")
    page.click("button[type=submit]")
    assert "not the API token" in page.inner_text("#login-problem")
    page.fill("input[name=token]", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(f"{server.url}/ui/tasks")
    cookie = next(k for k in page.context.cookies() if k["name"] == "celery_ext_ui")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] != TOKEN

    # A slow task, watched from queued/running to succeeded without reloading the page.
    hostile = "<img src=x onerror=alert(1)>"
    slow = client.post("/tasks", json={"task_type": "sleep", "payload": {"seconds": 4, "note": hostile}}).json()
    page.goto(f"{server.url}/ui/tasks/{slow['task_id']}")
    page.evaluate("window.__notReloaded = true")
    first = page.inner_text("#status")
    assert first in ("pending", "queued", "running"), first
    page.wait_for_function("document.querySelector('#status').textContent === 'running'", timeout=20_000)
    assert page.is_visible("#cancel") and page.is_visible("#terminate") and not page.is_visible("#retry")
    page.wait_for_function("document.querySelector('#status').textContent === 'succeeded'", timeout=30_000)
    assert page.evaluate("window.__notReloaded") is True  # htmx swapped it in place
    assert not page.is_visible("#cancel") and not page.is_visible("#retry")  # succeeded: nothing allowed
    assert '"slept": 4.0' in page.inner_text("#result")
    assert hostile in page.inner_text("#payload") and not dialogs  # escaped, never run
    assert "sleeping 4.000s" in page.inner_text("#logs")
    worker = client.get(f"/tasks/{slow['task_id']}").json()["worker_id"]
    assert worker in page.inner_text("#attempts")
    page.screenshot(path=str(tmp_path / "task-succeeded.png"), full_page=True)

    # A failed task: its error with the reason, its logs grouped by attempt; retry it.
    key = f"dash-{uuid.uuid4().hex}"
    failing = client.post(
        "/tasks", json={"task_type": "flaky", "payload": {"key": key, "fail_times": 10}, "max_retries": 1}
    ).json()
    assert wait_done(client, failing["task_id"])["status"] == "failed"
    page.goto(f"{server.url}/ui/tasks?status=failed")
    page.click(f"a[href='/ui/tasks/{failing['task_id']}']")
    page.wait_for_url(f"**/ui/tasks/{failing['task_id']}")
    assert page.inner_text("#status") == "failed" and page.inner_text("#run") == "run 1"
    assert "planned failure 2" in page.inner_text("#error")
    logs = page.inner_text("#logs")
    assert "flaky run 1 of key" in logs and "flaky run 2 of key" in logs
    groups = page.eval_on_selector_all(".log-group", "els => els.map(e => [e.dataset.run, e.dataset.attempt])")
    assert groups == [["1", "1"], ["1", "2"]]
    page.evaluate("window.__notReloaded = true")
    page.click("#retry")
    page.wait_for_function("document.querySelector('#run').textContent === 'run 2'", timeout=20_000)
    page.wait_for_function(
        "document.querySelector('#status').textContent === 'failed' && "
        "document.querySelectorAll('.log-group[data-run=\"2\"]').length > 0",
        timeout=30_000,
    )
    assert page.evaluate("window.__notReloaded") is True
    assert "flaky run 3 of key" in page.inner_text("#logs")
    page.screenshot(path=str(tmp_path / "task-failed-retried.png"), full_page=True)

    # A stale button: the page (not live: the task is cancelled) offers Retry, but the task was
    # retried elsewhere and succeeded meanwhile; the refusal is shown, not a 500.
    later = client.post("/tasks", json={"task_type": "echo", "delay": 60}).json()
    client.post(f"/tasks/{later['task_id']}/cancel")
    page.goto(f"{server.url}/ui/tasks/{later['task_id']}")
    assert page.is_visible("#retry")
    client.post(f"/tasks/{later['task_id']}/retry")
    assert wait_done(client, later["task_id"])["status"] == "succeeded"
    page.click("#retry")
    page.wait_for_selector("#flash")
    assert "retry refused" in page.inner_text("#flash") and page.inner_text("#status") == "succeeded"
    assert not page.is_visible("#retry")

    # The list: filters, the chart, live rows.
    page.goto(f"{server.url}/ui/tasks")
    # An expensive count (a loaded machine) is shared for stats.MAX_AGE (10 s), and the chart
    # refreshes every 10 s: the tasks above show up within about 20 s.
    page.wait_for_selector("#chart svg rect", timeout=45_000)
    fresh = client.post("/tasks", json={"task_type": "echo", "payload": {"n": 1}}).json()
    page.wait_for_selector(f"a[href='/ui/tasks/{fresh['task_id']}']", timeout=15_000)  # appears without reload
    page.screenshot(path=str(tmp_path / "task-list.png"), full_page=True)
    page.goto(f"{server.url}/ui/tasks?type=flaky")
    assert page.locator("table.tasks tbody tr").count() == 1

    # Workers from the registry.
    page.goto(f"{server.url}/ui/workers")
    text = page.inner_text("#workers")
    assert worker in text and "healthy" in text and "sleep" in text
    page.screenshot(path=str(tmp_path / "workers.png"), full_page=True)
    page.goto(f"{server.url}/ui/stats?window=1h&by=type")
    assert {"sleep", "flaky", "echo"} <= set(page.inner_text(".legend").replace("\n", " ").split())
    page.screenshot(path=str(tmp_path / "stats.png"), full_page=True)

    # Log out: the cookie goes, the pages ask for the token again.
    page.click("header button.link")
    page.wait_for_url("**/ui/login")
    page.goto(f"{server.url}/ui/tasks")
    assert "/ui/login" in page.url
    print(f"screenshots in {tmp_path}")  # noqa: T201 - where to look
    _ = c
