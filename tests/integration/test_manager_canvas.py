"""TaskManager's canvas: submit_group, submit_chain and submit_chord, each step recorded first."""

from __future__ import annotations

import pytest

from celery_ext.errors import InvalidPayloadError
from celery_ext.model import TaskStatus
from tests.conftest import TEST_TASKS


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, database_urls):
    from tests.conftest import module_cluster

    yield from module_cluster(tmp_path_factory, database_urls, "canvas", TEST_TASKS)


def test_chain_records_every_step_and_passes_results_on(cluster) -> None:
    m = cluster.manager
    steps = m.submit_chain(
        [
            {"task_type": "add", "payload": {"x": 2, "y": 2}},
            {"task_type": "add", "payload": {"y": 4}},
            {"task_type": "add", "payload": {"y": 10}},
        ]
    )
    assert [s.status for s in steps] == [TaskStatus.QUEUED, TaskStatus.SCHEDULED, TaskStatus.SCHEDULED]
    last = m.wait(steps[-1].task_id, 30)
    assert last.status is TaskStatus.SUCCEEDED and last.result == 18 and last.args == [8]
    records = [m.get(s.task_id) for s in steps]
    assert [r.result for r in records] == [4, 8, 18]
    assert all(r.root_id == steps[0].task_id for r in records)
    assert [r.parent_id for r in records] == [None, steps[0].task_id, steps[1].task_id]
    assert all(r.queued_at is not None for r in records)
    listed = m.list(root_id=steps[0].task_id).items
    assert {t.task_id for t in listed} == {s.task_id for s in steps}
    # Celery reads the same chain: the last step's AsyncResult
    assert cluster.runtime.celery.AsyncResult(steps[-1].task_id).get(timeout=10) == 18


def test_a_failed_step_fails_the_steps_waiting_for_it(cluster) -> None:
    m = cluster.manager
    steps = m.submit_chain(
        [{"task_type": "reject", "payload": {"reason": "no"}}, {"task_type": "add", "payload": {"y": 4}}]
    )
    waiting = m.wait(steps[1].task_id, 30)
    assert waiting.status is TaskStatus.FAILED and waiting.error.reason == "parent_failed"
    assert steps[0].task_id in waiting.error.message and waiting.started_at is None
    assert m.get(steps[0].task_id).error.reason == "rejected"


def test_group_members_share_a_group_id(cluster) -> None:
    m = cluster.manager
    members = m.submit_group([{"task_type": "add", "payload": {"x": i, "y": i}} for i in range(4)])
    assert len({t.group_id for t in members}) == 1 and members[0].group_id
    assert [m.wait(t.task_id, 30).result for t in members] == [0, 2, 4, 6]
    assert {t.task_id for t in m.list(group_id=members[0].group_id).items} == {t.task_id for t in members}


def test_chord_body_gets_the_list_of_results(cluster) -> None:
    m = cluster.manager
    *header, body = m.submit_chord(
        [{"task_type": "add", "payload": {"x": i, "y": i}} for i in range(3)], {"task_type": "tsum"}
    )
    assert body.status is TaskStatus.SCHEDULED
    done = m.wait(body.task_id, 60)
    assert done.status is TaskStatus.SUCCEEDED and done.result == 6 and done.args == [[0, 2, 4]]


def test_chord_with_a_failed_member_fails_its_body_without_running_it(cluster) -> None:
    m = cluster.manager
    *header, body = m.submit_chord(
        [{"task_type": "reject", "payload": {}}, {"task_type": "add", "payload": {"x": 1, "y": 1}}],
        {"task_type": "tsum"},
    )
    done = m.wait(body.task_id, 60)
    assert done.status is TaskStatus.FAILED and done.error.reason == "parent_failed" and done.started_at is None
    assert "rejected" in done.error.message


def test_delays_and_idempotency_keys_are_refused_inside_a_chain(cluster) -> None:
    with pytest.raises(InvalidPayloadError, match=r"\[0\]: delay cannot be given inside a chain"):
        cluster.manager.submit_chain([{"task_type": "echo", "delay": 5}])
    with pytest.raises(InvalidPayloadError, match="idempotency_key cannot be given"):
        cluster.manager.submit_chord([{"task_type": "echo"}], {"task_type": "echo", "idempotency_key": "k"})
