"""The ``schedules`` section of config.yaml (``config_schedules``) and its errors."""

from __future__ import annotations

import pytest

from celery_ext.config import parse_config
from celery_ext.errors import ConfigError
from celery_ext.schedules.admin import config_schedules


def test_config_schedules_section() -> None:
    config = parse_config(
        {
            "schedules": [
                {"name": "hourly", "task_type": "echo", "payload": {"a": 1}, "cron": "0 * * * *"},
                {"name": "often", "task_type": "echo", "every": "5m", "catch_up": "once", "timezone": "Asia/Tokyo"},
            ]
        }
    )
    hourly, often = config_schedules(config)
    assert (hourly.cron, hourly.payload, hourly.timezone, hourly.catch_up, hourly.source) == (
        "0 * * * *",
        {"a": 1},
        "UTC",
        "skip",
        "config",
    )
    assert (often.every, often.catch_up, often.timezone) == (300.0, "once", "Asia/Tokyo")
    assert parse_config({}).schedules == []


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"cron": "0 25 * * *"}, "schedules[0].cron: not a valid cron expression"),
        ({"cron": "0 * * * *", "timezone": "Nowhere"}, "schedules[0].timezone: not a known IANA time zone"),
        ({"cron": "0 * * * *", "every": 5}, "schedules[0]: give exactly one of cron and every (got both)"),
        ({}, "schedules[0]: give exactly one of cron and every (got neither)"),
        ({"every": "0s"}, "schedules[0].every: must be > 0"),
        ({"every": 5, "name": "bad name"}, "schedules[0].name: must be 1..128 letters"),
        ({"every": 5, "catch_up": "all"}, "schedules[0].catch_up:"),
        ({"every": 5, "catchup": "once"}, "schedules[0].catchup: unknown key; did you mean 'catch_up'?"),
    ],
)
def test_config_errors_name_the_yaml_path(entry: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"schedules": [{"name": "s", "task_type": "echo", **entry}]})
    assert str(err.value).startswith(message), str(err.value)


def test_config_schedule_names_are_unique() -> None:
    entries = [{"name": "s", "task_type": "echo", "every": 5}, {"name": "s", "task_type": "echo", "every": 6}]
    with pytest.raises(ConfigError, match=r"^schedules: schedule names must be unique \(got s more than once\)$"):
        parse_config({"schedules": entries})
