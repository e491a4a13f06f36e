"""Schedules without a store: fire times (croniter, time zones, DST), catch-up, fire keys, checks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from celery_ext.errors import InvalidScheduleError
from celery_ext.schedules import Schedule, fire_key

BERLIN = ZoneInfo("Europe/Berlin")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def berlin(*args: int, fold: int = 0) -> datetime:
    return datetime(*args, tzinfo=BERLIN, fold=fold)  # type: ignore[misc]


def fires(schedule: Schedule, start: datetime, n: int) -> list[datetime]:
    out = []
    for _ in range(n):
        start = schedule.next_after(start)
        out.append(start)
    return out


def test_cron_in_utc_fires_strictly_after() -> None:
    s = Schedule("s", "echo", cron="*/15 * * * *")
    assert s.next_after(utc(2026, 1, 1, 12, 0)) == utc(2026, 1, 1, 12, 15)
    assert s.next_after(utc(2026, 1, 1, 12, 0, 0) + timedelta(microseconds=1)) == utc(2026, 1, 1, 12, 15)
    assert s.next_after(utc(2026, 1, 1, 11, 59, 59)) == utc(2026, 1, 1, 12, 0)
    assert s.next_after(utc(2026, 1, 1, 12, 0)).tzinfo is UTC


def test_cron_keeps_its_wall_clock_time_in_its_time_zone() -> None:
    s = Schedule("s", "echo", cron="0 9 * * 1-5", timezone="Europe/Berlin")
    assert s.next_after(utc(2026, 1, 9, 12, 0)) == utc(2026, 1, 12, 8, 0)  # Friday noon -> Monday 9:00 CET
    assert s.next_after(utc(2026, 7, 1, 12, 0)) == utc(2026, 7, 2, 7, 0)  # 9:00 CEST
    assert s.latest_at_or_before(utc(2026, 7, 2, 7, 0)) == utc(2026, 7, 2, 7, 0)
    assert s.latest_at_or_before(utc(2026, 7, 2, 6, 59)) == utc(2026, 7, 1, 7, 0)


def test_dst_spring_forward_fires_the_skipped_time_once_when_the_clock_jumps() -> None:
    s = Schedule("s", "echo", cron="30 2 * * *", timezone="Europe/Berlin")
    # 2026-03-29: 02:00 CET becomes 03:00 CEST; 02:30 does not exist that day.
    assert fires(s, berlin(2026, 3, 28, 12, 0), 3) == [
        berlin(2026, 3, 29, 3, 0).astimezone(UTC),
        berlin(2026, 3, 30, 2, 30).astimezone(UTC),
        berlin(2026, 3, 31, 2, 30).astimezone(UTC),
    ]


def test_dst_fall_back_fires_a_fixed_time_once_and_hourly_wildcards_by_real_time() -> None:
    daily = Schedule("s", "echo", cron="30 2 * * *", timezone="Europe/Berlin")
    # 2026-10-25: 03:00 CEST becomes 02:00 CET; 02:30 happens twice.
    assert fires(daily, berlin(2026, 10, 24, 12, 0), 2) == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]
    assert daily.latest_at_or_before(utc(2026, 10, 25, 1, 45)) == utc(2026, 10, 25, 0, 30)

    half_hourly = Schedule("s", "echo", cron="*/30 * * * *", timezone="Europe/Berlin")
    assert fires(half_hourly, utc(2026, 10, 24, 23, 50), 6) == [
        utc(2026, 10, 25, 0, 0),  # 02:00 CEST
        utc(2026, 10, 25, 0, 30),  # 02:30 CEST
        utc(2026, 10, 25, 1, 0),  # 02:00 CET
        utc(2026, 10, 25, 1, 30),  # 02:30 CET
        utc(2026, 10, 25, 2, 0),
        utc(2026, 10, 25, 2, 30),
    ]


def test_every_keeps_its_phase() -> None:
    s = Schedule("s", "echo", every=90).starting(utc(2026, 1, 1, 0, 0, 0))
    assert s.next_fire_at == utc(2026, 1, 1, 0, 1, 30)
    assert s.next_after(utc(2026, 1, 1, 0, 1, 30)) == utc(2026, 1, 1, 0, 3, 0)
    assert s.next_after(utc(2026, 1, 1, 1, 0, 1)) == utc(2026, 1, 1, 1, 1, 30)  # 0:01:30 + 40 * 90s
    assert s.latest_at_or_before(utc(2026, 1, 1, 1, 0, 1)) == utc(2026, 1, 1, 1, 0, 0)


def test_plan_fires_an_on_time_or_late_fire_time() -> None:
    s = Schedule("s", "echo", cron="0 * * * *", next_fire_at=utc(2026, 1, 1, 12, 0))
    assert s.plan(utc(2026, 1, 1, 12, 0, 1)) == (utc(2026, 1, 1, 12, 0), utc(2026, 1, 1, 13, 0))
    # Late by 59 minutes (a scheduler away): less than one period, still fired.
    assert s.plan(utc(2026, 1, 1, 12, 59)) == (utc(2026, 1, 1, 12, 0), utc(2026, 1, 1, 13, 0))


def test_plan_after_downtime_skip_fires_nothing_and_once_fires_the_latest_missed_time() -> None:
    due, now = utc(2026, 1, 1, 12, 0), utc(2026, 1, 1, 17, 20)
    skip = Schedule("s", "echo", cron="0 * * * *", next_fire_at=due)
    assert skip.plan(now) == (None, utc(2026, 1, 1, 18, 0))
    once = skip.replace(catch_up="once")
    assert once.plan(now) == (utc(2026, 1, 1, 17, 0), utc(2026, 1, 1, 18, 0))

    every = Schedule("s", "echo", every=60, catch_up="once", next_fire_at=due)
    assert every.plan(now + timedelta(seconds=5)) == (now, now + timedelta(seconds=60))
    assert every.replace(catch_up="skip").plan(now) == (None, now + timedelta(seconds=60))


def test_plan_grace_keeps_short_intervals_from_skipping_on_round_jitter() -> None:
    s = Schedule("s", "echo", every=1, next_fire_at=utc(2026, 1, 1, 12, 0, 0))
    now = utc(2026, 1, 1, 12, 0, 1) + timedelta(milliseconds=300)  # the next time has come too
    assert s.plan(now) == (utc(2026, 1, 1, 12, 0, 0), utc(2026, 1, 1, 12, 0, 2))
    assert s.plan(now, grace=0) == (None, utc(2026, 1, 1, 12, 0, 2))


def test_fire_key_is_the_same_for_the_same_fire_time_in_any_zone() -> None:
    at = utc(2026, 1, 1, 12, 0)
    assert fire_key("nightly", at) == "schedule:nightly:2026-01-01T12:00:00+00:00"
    assert fire_key("nightly", at.astimezone(BERLIN)) == fire_key("nightly", at)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"cron": "61 * * * *"}, "invalid schedule: cron: not a valid cron expression"),
        ({"cron": "* * * *"}, "invalid schedule: cron: must have 5 fields"),
        ({"cron": "* * * * * *"}, "invalid schedule: cron: must have 5 fields"),
        ({"cron": "0 0 30 2 *"}, "invalid schedule: cron: matches no date"),
        ({"timezone": "Mars/Olympus"}, "invalid schedule: timezone: not a known IANA time zone"),
        ({"every": 5}, "invalid schedule: give exactly one of cron and every (got both)"),
        ({"cron": None}, "invalid schedule: give exactly one of cron and every (got neither)"),
        ({"name": "has space"}, "invalid schedule: name: must be 1..128 letters"),
        ({"name": "a:b"}, "invalid schedule: name:"),
        ({"cron": None, "every": 0}, "invalid schedule: every: must be > 0"),
        ({"cron": None, "every": float("inf")}, "invalid schedule: every: must be a number of seconds"),
        ({"catch_up": "all"}, "invalid schedule: catch_up: must be skip or once"),
        ({"payload": {"at": datetime(2026, 1, 1)}}, "invalid schedule: payload: not JSON-serializable"),
    ],
)
def test_check_names_the_bad_field(changes: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidScheduleError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        Schedule("ok", "echo", cron="0 * * * *").replace(**changes).check()
