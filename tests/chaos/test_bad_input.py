"""Every poison message and bad input of issue 12 (items 1-2) at one worker, between ledger
tasks: the worker stays alive and keeps taking tasks at full capacity, every accepted task
succeeds, the bad input is refused at the edge (nothing created) or dead-lettered."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from celery_ext.errors import InvalidPayloadError
from celery_ext.model import TaskFilter
from tests.chaos.harness import Chaos
from tests.integration.test_api import ApiProcess
from tests.integration.test_poison import (
    DEEP,
    assert_full_capacity,
    celery_headers,
    cli,
    publish_raw,
    wait_dead_letters,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

OK_BODY = '[[], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'
RAW: list[tuple[str, Any]] = [  # (body, header changes) pushed straight onto the queue
    (OK_BODY, {"timelimit": ["abc", "def"]}),
    (OK_BODY, {"timelimit": [1e300, None]}),
    ('[[], {"x": NaN}, {}]', {}),
    ("this is not json", {}),
    *[("[1]", {}) for _ in range(4)],
]
BAD_SUBMITS: list[dict[str, Any]] = [
    {"timeout": math.inf},
    {"timeout": math.nan},
    {"timeout": 1e300},
    {"delay": math.inf},
    {"delay": math.nan},
    {"delay": 1e300},
    {"payload": DEEP},
]
BAD_CLI = [
    ["--timeout", "inf"],
    ["--timeout", "nan"],
    ["--timeout", "1e300"],
    ["--delay", "nan"],
    ["--delay", "1e300"],
]
BAD_API = [
    '{"task_type": "echo", "timeout": NaN}',
    '{"task_type": "echo", "timeout": Infinity}',
    '{"task_type": "echo", "delay": 1e300}',
    '{"task_type": "echo", "delay": NaN}',
]


def test_poison_messages_and_bad_input(chaos: Callable[..., Chaos]) -> None:
    c = chaos("poison messages and bad input")
    w = c.worker()
    c.scheduler()
    cluster, m = c.cluster, c.cluster.manager
    app, queue = cluster.runtime.celery, f"{cluster.data['app']['name']}.echo"
    c.submit(10, 0.5)
    c.fault(lambda: None, set())  # the fault: what follows
    # Messages no submit would write, from plain Celery producers and raw pushes.
    app.send_task("echo", kwargs=DEEP, queue=queue)
    app.send_task("echo", args=[DEEP], queue=queue)
    app.send_task("echo", kwargs={}, queue=queue, headers={"extra": DEEP})
    for i, (body, changes) in enumerate(RAW):
        publish_raw(cluster, queue, body, celery_headers(f"poison-{i}", **changes))
    c.submit(10, 0.5)
    # Bad input at the edge: the manager, the CLI, the REST API.
    for spec in BAD_SUBMITS:
        spec = {"payload": {}, **spec}
        with pytest.raises(InvalidPayloadError):
            m.submit("echo", spec.pop("payload"), **spec)
    for args in BAD_CLI:
        done = cli(cluster.config_path, "submit", "echo", "{}", *args)
        assert done.returncode == 2 and "Traceback" not in done.stderr, (args, done.stderr[-500:])
    api = ApiProcess(cluster)
    try:
        for body in BAD_API:
            r = httpx.post(
                f"{api.url}/tasks", content=body.encode(), headers={"Content-Type": "application/json"}, timeout=30
            )
            assert r.status_code == 400, (body, r.status_code, r.text[:300])
    finally:
        api.stop()
    c.submit(10, 0.5)
    poisoned = 3 + len(RAW)
    wait_dead_letters(cluster, poisoned)
    assert c.settle(120), c.figures().line()
    c.extra["dead_lettered"] = poisoned
    c.extra["refused_at_the_edge"] = len(BAD_SUBMITS) + len(BAD_CLI) + len(BAD_API)
    f = c.record()
    c.check(f)
    # Nothing but the accepted tasks and the failed records of the poison messages was created.
    others = [t for t in m.list(TaskFilter(limit=1000)).items if t.task_id not in set(c.accepted)]
    assert all(t.error is not None and t.error.reason == "malformed_message" for t in others), others
    assert "Unrecoverable error" not in w.log()
    assert_full_capacity(cluster, w)
