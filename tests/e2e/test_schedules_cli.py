"""``celery-ext schedules ...`` in subprocesses against PostgreSQL and Redis: add, list, pause,
resume, remove, errors and exit codes, and ``import-beat`` of a real Celery app module."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_ext.schedules import from_beat, load_app
from tests.conftest import cluster_data
from tests.e2e.test_cli import cli
from tests.support.services import create_database, drop_database, unique
from tests.support.workers import write_config

pytestmark = pytest.mark.timeout(180)

BEAT_APP = """
from datetime import timedelta

from celery import Celery
from celery.schedules import crontab, schedule

app = Celery("beatapp", broker="memory://")
app.conf.timezone = "Europe/Berlin"
app.conf.beat_schedule = {
    "nightly report": {"task": "echo", "schedule": crontab(minute=30, hour=2), "kwargs": {"report": "daily"}},
    "weekdays": {"task": "echo", "schedule": crontab(minute=0, hour=[9, 17], day_of_week="mon-fri")},
    "every-10s": {"task": "echo", "schedule": 10.0, "args": (), "options": {"priority": 7}},
    "every-5m": {"task": "echo", "schedule": timedelta(minutes=5)},
    "beat-interval": {"task": "echo", "schedule": schedule(run_every=timedelta(hours=1))},
    "positional": {"task": "echo", "schedule": 60, "args": (1, 2)},
    "words": {"task": "echo", "schedule": "hourly"},
}
"""


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    url = create_database("postgresql")
    tmp = tmp_path_factory.mktemp("schedules-cli")
    storage = {"type": "postgresql", "config": {"url": url}}
    yield write_config(tmp, cluster_data(unique("ce"), "redis://127.0.0.1:6379/0", storage, {}))
    drop_database("postgresql", url)


def ok_json(config: Path, *args: str) -> object:
    done = cli(config, "schedules", *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_add_then_list_pause_resume_remove(config_path: Path) -> None:
    [added] = ok_json(
        config_path, "add", "nightly", "echo", '{"a": 1}', "--cron", "30 2 * * *", "--timezone", "Europe/Berlin"
    )  # type: ignore[misc]
    assert (added["name"], added["cron"], added["timezone"], added["payload"], added["source"]) == (
        "nightly",
        "30 2 * * *",
        "Europe/Berlin",
        {"a": 1},
        "api",
    )
    assert added["next_fire_at"] and added["paused"] is False
    ok_json(config_path, "add", "often", "echo", "--every", "5m", "--catch-up", "once", "--priority", "4")

    listed = ok_json(config_path, "list")  # another process: read from the store
    assert [(s["name"], s["every"], s["catch_up"]) for s in listed] == [  # type: ignore[union-attr]
        ("nightly", None, "skip"),
        ("often", 300.0, "once"),
    ]
    assert listed[0]["next_fire_at"] == added["next_fire_at"]  # type: ignore[index]
    table = cli(config_path, "schedules", "list")
    assert table.returncode == 0 and "cron 30 2 * * * Europe/Berlin" in table.stdout and "every 300s" in table.stdout

    assert ok_json(config_path, "pause", "often")[0]["paused"] is True  # type: ignore[index]
    assert ok_json(config_path, "resume", "often")[0]["paused"] is False  # type: ignore[index]
    assert ok_json(config_path, "remove", "often") == {"removed": "often"}
    assert [s["name"] for s in ok_json(config_path, "list")] == ["nightly"]  # type: ignore[union-attr]


def test_errors_name_the_field_and_exit_2(config_path: Path) -> None:
    bad_cron = cli(config_path, "schedules", "add", "x", "echo", "--cron", "61 * * * *")
    assert bad_cron.returncode == 2 and "invalid schedule: cron: not a valid cron expression" in bad_cron.stderr
    bad_tz = cli(config_path, "schedules", "add", "x", "echo", "--cron", "0 * * * *", "--timezone", "Berlin")
    assert bad_tz.returncode == 2 and "invalid schedule: timezone:" in bad_tz.stderr
    both = cli(config_path, "schedules", "add", "x", "echo", "--cron", "0 * * * *", "--every", "5")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    bad_every = cli(config_path, "schedules", "add", "x", "echo", "--every", "0s")
    assert bad_every.returncode == 2 and "argument --every: must be > 0" in bad_every.stderr
    bad_name = cli(config_path, "schedules", "add", "a b", "echo", "--every", "5")
    assert bad_name.returncode == 2 and "invalid schedule: name:" in bad_name.stderr
    unknown_type = cli(config_path, "schedules", "add", "x", "no_such_type", "--every", "5")
    assert unknown_type.returncode == 2 and "unknown task type 'no_such_type'" in unknown_type.stderr
    missing = cli(config_path, "schedules", "pause", "no-such-schedule")
    assert missing.returncode == 2 and "no schedule named 'no-such-schedule'" in missing.stderr


def test_import_beat(config_path: Path) -> None:
    module = unique("beatapp_")
    (config_path.parent / f"{module}.py").write_text(BEAT_APP)
    dry = cli(config_path, "schedules", "import-beat", f"{module}:app", "--dry-run", "--json")
    assert dry.returncode == 2  # two entries refused
    assert json.loads(dry.stdout)["dry_run"] is True
    assert "every-10s" not in [s["name"] for s in ok_json(config_path, "list")]  # type: ignore[union-attr]

    done = cli(config_path, "schedules", "import-beat", module, "--json")
    assert done.returncode == 2, done.stderr
    out = json.loads(done.stdout)
    got = {s["name"]: (s["cron"], s["every"], s["timezone"], s["payload"], s["priority"]) for s in out["imported"]}
    assert got == {
        "nightly-report": ("30 2 * * *", None, "Europe/Berlin", {"report": "daily"}, 0),
        "weekdays": ("0 9,17 * * mon-fri", None, "Europe/Berlin", {}, 0),
        "every-10s": (None, 10.0, "Europe/Berlin", {}, 7),
        "every-5m": (None, 300.0, "Europe/Berlin", {}, 0),
        "beat-interval": (None, 3600.0, "Europe/Berlin", {}, 0),
    }
    refused = "\n".join(out["refused"])
    assert "beat entry 'positional': invalid schedule: args: positional args [1, 2] cannot be carried" in refused
    assert "beat entry 'words': invalid schedule: schedule: str is not a crontab, an interval" in refused
    listed = {s["name"] for s in ok_json(config_path, "list")}  # type: ignore[union-attr]
    assert set(got) <= listed


def test_from_beat_in_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = unique("beatapp_")
    (tmp_path / f"{module}.py").write_text(BEAT_APP)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = from_beat(load_app(module))
    assert len(result.schedules) == 5 and len(result.refused) == 2
    weekdays = next(s for s in result.schedules if s.name == "weekdays")
    assert (weekdays.cron, weekdays.task_type, weekdays.source) == ("0 9,17 * * mon-fri", "echo", "api")
    with pytest.raises(Exception, match="names no Celery app"):
        load_app(f"{module}:nothing")
