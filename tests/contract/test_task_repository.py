"""TaskRepository contract: the same tests on SQLite, PostgreSQL, MariaDB and MongoDB (real servers)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from celery_ext.errors import CeleryExtError
from celery_ext.model import Task, TaskErrorInfo, TaskFilter, TaskStatus
from celery_ext.storage import Storage
from tests.support.storage import Backend

S = TaskStatus
# Millisecond-aligned times: what every backend (BSON dates included) stores exactly.
T0 = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(milliseconds=int(seconds * 1000))


def make(i: int, **kw: object) -> Task:
    fields: dict[str, object] = {"task_id": f"t{i:05d}", "task_type": "echo", "payload": {"i": i}, "created_at": at(i)}
    fields.update(kw)
    return Task(**fields)  # type: ignore[arg-type]


def test_create_and_get_round_trip_every_field(storage: Storage) -> None:
    task = Task(
        task_id="full",
        task_type="send_email",
        payload={"to": ["a@b.c"], "n": 1.5, "nested": {"ok": True}},
        status=S.RUNNING,
        priority=7,
        attempt=2,
        max_retries=5,
        timeout=12.5,
        run_at=at(1),
        worker_id="w1@h",
        result=[1, "two", None],
        error=TaskErrorInfo("boom", "it broke: é ✓"),
        idempotency_key="idem-1",
        created_at=at(0),
        queued_at=at(2),
        started_at=at(3),
        finished_at=at(4),
        updated_at=at(5),
        dispatch_token="tok",
        lease_until=at(60),
        run=3,
        args=[{"prev": [1, 2]}, "é", 2.5, None, True],
        parent_id="parent-1",
        root_id="root-1",
        group_id="group-1",
    )
    stored, created = storage.tasks.create(task)
    assert created and stored == task
    assert storage.tasks.get("full") == task
    assert storage.tasks.get_by_idempotency_key("idem-1") == task
    assert storage.tasks.get("missing") is None
    assert storage.tasks.get_by_idempotency_key("missing") is None


def test_new_fields_default_and_round_trip_through_create_many_and_update(storage: Storage) -> None:
    plain = make(1)
    assert (plain.run, plain.args, plain.parent_id, plain.root_id, plain.group_id) == (1, None, None, None, None)
    canvas = make(2, run=2, args=[[1, 2], {"a": "b"}], parent_id="t00001", root_id="t00001", group_id="g")
    empty_args = make(3, args=[])
    out = storage.tasks.create_many([plain, canvas, empty_args])
    assert [c for _, c in out] == [True, True, True]
    assert storage.tasks.get("t00001") == plain.replace(updated_at=plain.created_at)
    assert storage.tasks.get("t00002") == canvas.replace(updated_at=canvas.created_at)
    got = storage.tasks.get("t00003")
    assert got is not None and got.args == []
    assert got.to_dict()["args"] == [] and got.to_dict()["run"] == 1 and got.to_dict()["root_id"] is None
    as_json = canvas.to_dict()
    assert {k: as_json[k] for k in ("run", "args", "parent_id", "root_id", "group_id")} == {
        "run": 2,
        "args": [[1, 2], {"a": "b"}],
        "parent_id": "t00001",
        "root_id": "t00001",
        "group_id": "g",
    }

    # A manual retry: a new run whose attempts restart; the update path writes every new field.
    assert storage.tasks.update(
        "t00001",
        [S.PENDING],
        status=S.QUEUED,
        run=2,
        attempt=0,
        args=["x", {"y": 1}],
        parent_id="p",
        root_id="r",
        group_id="g2",
    )
    got = storage.tasks.get("t00001")
    assert got is not None
    assert (got.status, got.run, got.attempt, got.args, got.parent_id, got.root_id, got.group_id) == (
        S.QUEUED,
        2,
        0,
        ["x", {"y": 1}],
        "p",
        "r",
        "g2",
    )
    assert storage.tasks.update("t00001", [S.QUEUED], token=None, args=None, parent_id=None, group_id=None)
    got = storage.tasks.get("t00001")
    assert got is not None and (got.args, got.parent_id, got.root_id, got.group_id) == (None, None, "r", None)
    # The token-checked update (the worker's claim) writes them too.
    storage.tasks.create(make(4, status=S.QUEUED, dispatch_token="tok"))
    assert storage.tasks.update("t00004", [S.QUEUED], token="tok", status=S.RUNNING, run=5, args=[7])
    got = storage.tasks.get("t00004")
    assert got is not None and (got.status, got.run, got.args) == (S.RUNNING, 5, [7])
    assert storage.tasks.update_many(["t00002", "t00004"], [S.PENDING, S.RUNNING], run=9, root_id="rr") == 2
    assert [(t.run, t.root_id) for t in (storage.tasks.get("t00002"), storage.tasks.get("t00004"))] == [  # type: ignore[union-attr]
        (9, "rr"),
        (9, "rr"),
    ]


def test_idempotency_key_is_unique_and_absent_keys_do_not_collide(storage: Storage) -> None:
    first, created = storage.tasks.create(make(1, idempotency_key="k"))
    again, created_again = storage.tasks.create(make(2, idempotency_key="k", payload={"other": 1}))
    assert created and not created_again
    assert again.task_id == first.task_id and again.payload == {"i": 1}
    assert storage.tasks.get("t00002") is None
    # Many tasks without a key coexist.
    for i in range(3, 6):
        assert storage.tasks.create(make(i))[1]
    assert storage.tasks.create(make(1))[1] is False  # same task_id


def test_create_many_inserts_and_reports_duplicates_in_order(storage: Storage) -> None:
    storage.tasks.create(make(1, idempotency_key="dup"))
    batch = [make(10), make(11, idempotency_key="dup"), make(12, idempotency_key="fresh"), make(1)]
    out = storage.tasks.create_many(batch)
    assert [c for _, c in out] == [True, False, True, False]
    assert out[1][0].task_id == "t00001" and out[3][0].task_id == "t00001"
    assert storage.tasks.get("t00011") is None
    assert storage.tasks.get_by_idempotency_key("fresh").task_id == "t00012"  # type: ignore[union-attr]
    assert storage.tasks.create_many([]) == []


def test_update_is_conditional_on_status_and_token(storage: Storage) -> None:
    storage.tasks.create(make(1, status=S.QUEUED, dispatch_token="a"))
    assert not storage.tasks.update("t00001", [S.RUNNING], status=S.SUCCEEDED)
    assert not storage.tasks.update("t00001", [S.QUEUED], token="b", status=S.RUNNING)
    assert not storage.tasks.update("nope", [S.QUEUED], status=S.RUNNING)
    assert storage.tasks.update(
        "t00001",
        [S.PENDING, S.QUEUED],
        token="a",
        status=S.RUNNING,
        worker_id="w",
        error=TaskErrorInfo("r", "m"),
        result={"x": 1},
        started_at=at(9),
    )
    got = storage.tasks.get("t00001")
    assert got is not None
    assert (got.status, got.worker_id, got.error, got.result, got.started_at) == (
        S.RUNNING,
        "w",
        TaskErrorInfo("r", "m"),
        {"x": 1},
        at(9),
    )
    assert got.updated_at is not None and got.updated_at > at(100)
    assert storage.tasks.update("t00001", [S.RUNNING], error=None, worker_id=None)
    got = storage.tasks.get("t00001")
    assert got is not None and got.error is None and got.worker_id is None
    with pytest.raises(ValueError, match="no field"):
        storage.tasks.update("t00001", [S.RUNNING], colour="blue")


def test_an_update_is_committed_at_once(backend: Backend, storage: Storage) -> None:
    """What a worker records is what every other process reads next: no transaction left open
    on the writer's kept connection."""
    other = backend.open()
    try:
        storage.tasks.create(make(1, status=S.QUEUED, dispatch_token="a"))
        assert storage.tasks.update("t00001", [S.QUEUED], token="a", status=S.RUNNING, worker_id="w")
        got = other.tasks.get("t00001")
        assert got is not None and (got.status, got.worker_id) == (S.RUNNING, "w")
        assert storage.tasks.update("t00001", [S.RUNNING], token="a", status=S.SUCCEEDED, result=[1, "x"])
        got = other.tasks.get("t00001")
        assert got is not None and (got.status, got.result) == (S.SUCCEEDED, [1, "x"])
    finally:
        other.close()


def test_update_many_changes_only_expected_statuses(storage: Storage) -> None:
    storage.tasks.create_many([make(1), make(2), make(3, status=S.RUNNING), make(4)])
    n = storage.tasks.update_many(["t00001", "t00002", "t00003", "nope"], [S.PENDING], status=S.QUEUED)
    assert n == 2
    assert [storage.tasks.get(f"t0000{i}").status for i in range(1, 5)] == [  # type: ignore[union-attr]
        S.QUEUED,
        S.QUEUED,
        S.RUNNING,
        S.PENDING,
    ]
    assert storage.tasks.update_many([], [S.PENDING], status=S.QUEUED) == 0


def test_update_many_with_tokens_changes_only_records_holding_one(storage: Storage) -> None:
    """A failed publish puts its records back, each only while it holds the token the message
    carried (``Lifecycle.publish_failed``)."""
    storage.tasks.create_many([make(i, status=S.QUEUED, dispatch_token=f"k{i}", queued_at=at(i)) for i in range(1, 5)])
    assert storage.tasks.update("t00002", [S.QUEUED], token="k2", dispatch_token="fresh")  # republished meanwhile
    n = storage.tasks.update_many(
        ["t00001", "t00002", "t00003"], [S.QUEUED], tokens=["k1", "k2", "k3"], status=S.PENDING, queued_at=None
    )
    assert n == 2
    got = [storage.tasks.get(f"t0000{i}") for i in range(1, 5)]
    assert [(t.status, t.queued_at) for t in got if t is not None] == [
        (S.PENDING, None),
        (S.QUEUED, at(2)),
        (S.PENDING, None),
        (S.QUEUED, at(4)),  # not among the ids
    ]
    assert storage.tasks.update_many(["t00004"], [S.QUEUED], tokens=[], status=S.PENDING) == 0


def test_delete_removes_the_task_and_its_logs(storage: Storage) -> None:
    from celery_ext.model import TaskLog

    storage.tasks.create_many([make(1), make(2)])
    storage.logs.append([TaskLog("t00001", 1, at(1), "INFO", "x"), TaskLog("t00002", 1, at(1), "INFO", "y")])
    assert storage.tasks.delete("t00001")
    assert not storage.tasks.delete("t00001")
    assert storage.tasks.get("t00001") is None and storage.logs.list("t00001") == []
    assert [l.message for l in storage.logs.list("t00002")] == ["y"]


# --- list: every filter and their combinations ----------------------------------------------

STATUSES = [S.PENDING, S.QUEUED, S.RUNNING, S.SUCCEEDED, S.FAILED]
TYPES = ["a", "b", "c"]
WORKERS = [None, "w1", "w2"]
ROOTS = [None, "r1", "r2", "r1"]
GROUPS = [None, "g1", "g2"]
PARENTS = [None, "p1", "p2", "p3", "p1"]


def dataset() -> list[Task]:
    tasks = []
    for i in range(60):
        # Pairs share a created_at, so ordering must fall back to task_id.
        tasks.append(
            make(
                i,
                task_type=TYPES[i % 3],
                status=STATUSES[i % 5],
                worker_id=WORKERS[(i // 2) % 3],
                created_at=at(i // 2),
                root_id=ROOTS[i % 4],
                group_id=GROUPS[(i // 3) % 3],
                parent_id=PARENTS[(i // 4) % 5],
            )
        )
    return tasks


def expected(tasks: list[Task], flt: TaskFilter) -> list[str]:
    keep = [
        t
        for t in tasks
        if (not flt.status or t.status in flt.status)
        and (not flt.task_type or t.task_type in flt.task_type)
        and (flt.worker_id is None or t.worker_id == flt.worker_id)
        and (flt.root_id is None or t.root_id == flt.root_id)
        and (flt.parent_id is None or t.parent_id == flt.parent_id)
        and (flt.group_id is None or t.group_id == flt.group_id)
        and (flt.created_after is None or t.created_at >= flt.created_after)
        and (flt.created_before is None or t.created_at < flt.created_before)
    ]
    keep.sort(key=lambda t: (t.created_at, t.task_id), reverse=True)
    return [t.task_id for t in keep]


FILTERS: dict[str, dict[str, object]] = {
    "status": {"status": (S.RUNNING, S.FAILED)},
    "type": {"task_type": ("b",)},
    "types": {"task_type": ("a", "c")},
    "worker": {"worker_id": "w1"},
    "after": {"created_after": at(10)},
    "before": {"created_before": at(20)},
}
COMBOS = [()] + [(k,) for k in FILTERS] + list(itertools.combinations(FILTERS, 2)) + [tuple(FILTERS)]


CANVAS_FILTERS: dict[str, dict[str, object]] = {
    "root": {"root_id": "r1"},
    "parent": {"parent_id": "p1"},
    "group": {"group_id": "g2"},
}
# Each canvas filter alone, together, and with the other filters (kept short: every backend runs them).
CANVAS_COMBOS = (
    [(k,) for k in CANVAS_FILTERS]
    + list(itertools.combinations(CANVAS_FILTERS, 2))
    + [tuple(CANVAS_FILTERS), ("root", "status"), ("group", "type"), ("parent", "worker"), ("root", "after", "before")]
)


def _check_filter(storage: Storage, keys: tuple[str, ...]) -> list[str]:
    tasks = dataset()
    storage.tasks.create_many(tasks)
    kwargs: dict[str, object] = {}
    for key in keys:
        kwargs.update(FILTERS[key] if key in FILTERS else CANVAS_FILTERS[key])
    flt = TaskFilter(limit=1000, **kwargs)  # type: ignore[arg-type]
    page = storage.tasks.list(flt)
    want = expected(tasks, flt)
    assert [t.task_id for t in page.items] == want
    assert page.next_cursor is None
    return want


@pytest.mark.parametrize("keys", COMBOS, ids=lambda k: "+".join(k) or "none")
def test_list_filters_and_combinations(storage: Storage, keys: tuple[str, ...]) -> None:
    _check_filter(storage, keys)


@pytest.mark.parametrize("keys", CANVAS_COMBOS, ids=lambda k: "+".join(k))
def test_list_filters_by_root_parent_and_group(storage: Storage, keys: tuple[str, ...]) -> None:
    assert _check_filter(storage, keys)  # the data set has matches for each of these, and non-matches


def test_list_by_root_pages_with_a_cursor(storage: Storage) -> None:
    tasks = dataset()
    storage.tasks.create_many(tasks)
    want = expected(tasks, TaskFilter(root_id="r1"))
    got, cursor = [], None
    while True:
        page = storage.tasks.list(TaskFilter(root_id="r1", limit=4, cursor=cursor))
        assert all(t.root_id == "r1" for t in page.items)
        got += [t.task_id for t in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert got == want and len(want) == 30
    assert storage.tasks.list(TaskFilter(root_id="nope")).items == []


def test_offset_and_cursor_pages_cover_everything_once(storage: Storage) -> None:
    tasks = dataset()
    storage.tasks.create_many(tasks)
    want = expected(tasks, TaskFilter())
    by_offset = []
    for offset in range(0, 60, 7):
        by_offset += [t.task_id for t in storage.tasks.list(TaskFilter(limit=7, offset=offset)).items]
    assert by_offset == want
    got, cursor = [], None
    while True:
        page = storage.tasks.list(TaskFilter(limit=7, cursor=cursor))
        got += [t.task_id for t in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert got == want
    flt = TaskFilter(task_type=("a",), limit=4)
    page1 = storage.tasks.list(flt)
    page2 = storage.tasks.list(TaskFilter(task_type=("a",), limit=4, cursor=page1.next_cursor))
    assert [t.task_id for t in page1.items + page2.items] == expected(tasks, TaskFilter(task_type=("a",)))[:8]


def test_cursor_is_stable_while_records_are_inserted(storage: Storage) -> None:
    storage.tasks.create_many([make(i) for i in range(30)])
    page = storage.tasks.list(TaskFilter(limit=10))
    seen = [t.task_id for t in page.items]
    cursor = page.next_cursor
    n = 1000
    while cursor:
        # Newer records arrive between pages (and one older than everything seen so far).
        storage.tasks.create_many([make(n, created_at=at(500 + n)), make(n + 1, created_at=at(-1))])
        n += 2
        page = storage.tasks.list(TaskFilter(limit=10, cursor=cursor))
        seen += [t.task_id for t in page.items]
        cursor = page.next_cursor
    originals = [f"t{i:05d}" for i in reversed(range(30))]
    assert seen[:30] == originals
    assert len(seen) == len(set(seen))
    assert all(s.startswith("t01") for s in seen[30:])  # only the older inserts, after the originals


def test_invalid_cursor_is_a_clear_error(storage: Storage) -> None:
    with pytest.raises(CeleryExtError, match="invalid cursor"):
        storage.tasks.list(TaskFilter(cursor="not-a-cursor!"))


def test_scan_finds_due_expired_and_stale_records_oldest_first(storage: Storage) -> None:
    now = at(1000)
    storage.tasks.create_many(
        [
            make(1, status=S.SCHEDULED, run_at=now - timedelta(seconds=5)),
            make(2, status=S.SCHEDULED, run_at=now + timedelta(seconds=5)),
            make(3, status=S.RETRYING, run_at=now - timedelta(seconds=1)),
            make(4, status=S.RUNNING, lease_until=now - timedelta(seconds=1)),
            make(5, status=S.RUNNING, lease_until=now + timedelta(seconds=60)),
            make(6, status=S.PENDING, updated_at=now - timedelta(seconds=30)),
            make(7, status=S.PENDING, updated_at=now),
            make(0, status=S.SCHEDULED, run_at=None),
        ]
    )
    ids = lambda ts: [t.task_id for t in ts]  # noqa: E731
    assert ids(storage.tasks.scan([S.SCHEDULED, S.RETRYING], due_before=now)) == ["t00001", "t00003"]
    assert ids(storage.tasks.scan([S.SCHEDULED, S.RETRYING], due_before=now, limit=1)) == ["t00001"]
    assert ids(storage.tasks.scan([S.RUNNING], lease_expired_before=now)) == ["t00004"]
    assert ids(storage.tasks.scan([S.PENDING], updated_before=now - timedelta(seconds=10))) == ["t00006"]
    assert ids(storage.tasks.scan([S.PENDING])) == ["t00006", "t00007"]


def test_count_by_status_and_schema_version(storage: Storage) -> None:
    storage.tasks.create_many([make(1), make(2), make(3, status=S.FAILED)])
    assert storage.tasks.count_by_status() == {"pending": 2, "failed": 1}
    version, latest = storage.schema_version()
    assert version == latest and latest >= 1
    storage.migrate()  # again: a no-op that keeps the data
    assert storage.tasks.get("t00003") is not None
