"""Groups saved by Celery's ``GroupResult.save()`` (the result backend's ``_save_group``), on every
backend (SQLite, PostgreSQL, MariaDB, MongoDB): saved, replaced, read back, deleted, purged."""

from __future__ import annotations

import threading
from datetime import timedelta

from celery_ext.config import RetentionConfig
from celery_ext.model import utcnow
from celery_ext.storage import Storage
from celery_ext.storage.base import GroupRepository
from celery_ext.storage.retention import purge

# ``GroupResult.as_tuple()`` as JSON: ((id, parent), [member tuples]), a member with a parent.
GROUP = [["g1", None], [[["m1", None], None], [["m2", [["p2", None], None]], None]]]


def groups_of(storage: Storage) -> GroupRepository:
    assert storage.groups is not None, f"{storage.description} keeps no saved groups"
    return storage.groups


def test_save_get_replace_delete(storage: Storage) -> None:
    groups = groups_of(storage)
    assert groups.get("g1") is None
    before = utcnow()
    groups.save("g1", GROUP)
    saved = groups.get("g1")
    assert saved is not None and saved.group_id == "g1" and saved.result == GROUP
    assert before - timedelta(seconds=1) <= saved.saved_at <= utcnow() + timedelta(seconds=1)
    assert saved.saved_at.tzinfo is not None

    other = [["g1", None], [[["m3", None], None]]]
    groups.save("g1", other)  # Celery's save of the same id replaces it
    assert groups.get("g1").result == other  # type: ignore[union-attr]
    assert groups.get("g2") is None

    assert groups.delete("g1") is True
    assert groups.get("g1") is None
    assert groups.delete("g1") is False


def test_concurrent_saves_of_one_id_leave_one_group(storage: Storage) -> None:
    groups = groups_of(storage)
    errors: list[BaseException] = []

    def save(n: int) -> None:
        try:
            groups.save("race", [["race", None], [[[f"m{n}", None], None]]])
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    saved = groups.get("race")
    assert saved is not None and saved.result[1][0][0][0] in {"m0", "m1", "m2", "m3"}


def test_retention_purges_saved_groups_by_age(storage: Storage) -> None:
    groups = groups_of(storage)
    for i in range(5):
        groups.save(f"old{i}", [[f"old{i}", None], []])
    later = utcnow() + timedelta(hours=2)  # as if two hours had passed
    groups.save("kept", [["kept", None], []])

    assert groups.purge(utcnow() - timedelta(hours=1)) == 0
    report = purge(storage, RetentionConfig(groups=3600.0, batch_size=2), now=later)
    assert report.groups == 6  # the five old ones and "kept": all saved more than an hour before
    assert report.tasks == {} and report.logs == 0

    groups.save("fresh", [["fresh", None], []])
    assert purge(storage, RetentionConfig(groups=3600.0)).groups == 0
    assert groups.get("fresh") is not None
