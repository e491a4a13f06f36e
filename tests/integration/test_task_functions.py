"""``@task_type`` functions used as Celery tasks against a real worker: ``.delay()``,
``.apply_async()`` and canvas of ``.s()`` / ``.si()`` signatures.  Their messages are plain Celery
messages, recorded by the worker on receipt; results come from the records (``celery_ext://``).

The cluster has a Redis database of its own (the claim protocol of test_celery_native.py): a
chord's ``celery.chord_unlock`` goes to Celery's default queue ``celery``, which every celery_ext
worker on a broker consumes, and a worker of another test (another task store) must not take it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from celery import chain, chord, group
from celery._state import _set_current_app, get_current_app

from celery_ext.errors import TaskFailed
from celery_ext.model import Task, TaskStatus
from celery_ext.task import ExecutorTask
from tests.conftest import TEST_TASKS, Cluster, cluster_data, storage_section
from tests.integration.test_celery_native import claim_db, redis_url, release_db
from tests.support.services import unique
from tests.support.tasks import add, tsum

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, database_urls: dict[str, str]) -> Iterator[Cluster]:
    db = claim_db()
    data = cluster_data(
        unique("ce"), redis_url(db), storage_section("sqlite", database_urls), {"executors": TEST_TASKS}
    )
    c = Cluster(tmp_path_factory.mktemp("functions"), data)
    try:
        c.worker()
        yield c
    finally:
        c.close()
        release_db(db)


@pytest.fixture(autouse=True)
def in_use(cluster: Cluster) -> Iterator[None]:
    """The cluster's app is the celery_ext app in use (``app.set_current()``), whatever other apps
    this pytest process built since."""
    previous = get_current_app()
    cluster.runtime.celery.set_current()
    yield
    _set_current_app(previous)
    if any(not w.alive() for w in cluster.workers):
        pytest.fail("the worker died")


def records(c: Cluster, **flt: str) -> dict[str, Task]:
    return {t.task_id: t for t in c.manager.list(limit=500, **flt).items}


def test_delay_runs_in_the_worker_and_is_recorded(cluster: Cluster) -> None:
    assert isinstance(add.task, ExecutorTask) and add.app is cluster.runtime.celery
    res = add.delay(2, 3)
    assert res.get(timeout=30) == 5 and res.state == "SUCCESS"
    task = cluster.manager.get(res.id)
    assert (task.task_type, task.status, task.args, task.payload, task.result) == (
        "add",
        TaskStatus.SUCCEEDED,
        [2, 3],
        {},
        5,
    )
    assert task.worker_id and res.id in records(cluster, task_type="add")

    kw = add.apply_async(kwargs={"x": 1, "y": 2}, priority=5)
    assert kw.get(timeout=30) == 3
    assert cluster.manager.get(kw.id).payload == {"x": 1, "y": 2}


def test_a_call_that_does_not_fit_the_function_fails_as_invalid_payload(cluster: Cluster) -> None:
    res = add.delay(1)  # type: ignore[call-arg]
    with pytest.raises(TaskFailed, match=r"^invalid_payload: add: missing a required argument: 'y'$"):
        res.get(timeout=30)
    task = cluster.manager.get(res.id)
    assert task.status is TaskStatus.FAILED and task.error is not None
    assert task.error.reason == "invalid_payload" and task.attempt == 1


def test_chain_of_mutable_signatures(cluster: Cluster) -> None:
    res = (add.s(2, 2) | add.s(4)).apply_async()
    assert res.get(timeout=30) == 8
    second, first = res, res.parent
    found = records(cluster, root_id=first.id)
    assert set(found) == {first.id, second.id}  # each step has a record, found by the root id
    steps = [found[first.id], found[second.id]]
    assert [t.status for t in steps] == [TaskStatus.SUCCEEDED] * 2
    assert [t.args for t in steps] == [[2, 2], [4, 4]] and [t.result for t in steps] == [4, 8]
    assert [t.parent_id for t in steps] == [None, first.id] and {t.root_id for t in steps} == {first.id}

    # An immutable step ignores the previous result; chain() spells the same thing.
    assert chain(add.s(1, 1), add.si(10, 10), add.s(1)).apply_async().get(timeout=30) == 21


def test_group_and_chord_of_functions(cluster: Cluster) -> None:
    grouped = group(add.s(i, i) for i in range(3)).apply_async()
    assert grouped.get(timeout=30) == [0, 2, 4]
    members = records(cluster, group_id=grouped.id)
    assert set(members) == {r.id for r in grouped.results}
    assert all(t.task_type == "add" and t.status is TaskStatus.SUCCEEDED for t in members.values())

    res = chord([add.s(i, 1) for i in range(4)], tsum.s()).apply_async()
    assert res.get(timeout=60) == 10
    header = res.parent
    found = records(cluster, group_id=header.id)
    assert {r.id for r in header.results} < set(found)
    body = cluster.manager.get(res.id)
    assert body.task_type == "tsum" and body.args == [[1, 2, 3, 4]] and body.result == 10
