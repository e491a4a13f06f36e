"""The ``Schedule`` record: its checks and its fire times.

A schedule fires a task of ``task_type`` with ``payload`` on a 5-field ``cron`` expression
(minute hour day-of-month month day-of-week, read by croniter in the schedule's ``timezone``) or
``every`` N seconds.  Fire times are aware UTC datetimes.  Across DST changes a cron schedule keeps
its wall-clock time: a time the clock skips (spring forward) fires when the clock jumps past it, a
time the clock repeats (fall back) fires once, and an expression whose hour field is ``*``
(``*/15 * * * *``) fires by real time through both (as Vixie cron does).  ``every`` keeps its
phase: it fires at ``first + k * every``.

``catch_up`` says what happens to fire times missed while no scheduler ran (a fire time more than
one period and more than ``GRACE`` late): ``skip`` fires none of them and waits for the next
future time, ``once`` fires the latest of them once.  Either way the schedule then continues at
its next future time.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

from celery_ext.errors import InvalidScheduleError
from celery_ext.validation import MAX_DELAY

CATCH_UP = ("skip", "once")
SOURCES = ("config", "api")
#: A fire time this late is still on time even when the one after it has come too: the jitter
#: of the scheduler's rounds, which would otherwise skip fires of short ``every`` intervals.
GRACE = 10.0
TIME_FIELDS = ("next_fire_at", "last_fire_at", "updated_at")
_NOT_DEFINED = frozenset({"source", "last_task_id", *TIME_FIELDS})  # where it comes from, where it stands
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_CRON_FIELDS = "minute hour day-of-month month day-of-week"


@dataclass(frozen=True, slots=True)
class Schedule:
    """One periodic schedule and where it stands (``next_fire_at``, the last fire and its task)."""

    name: str
    task_type: str
    payload: dict[str, Any] = field(default_factory=dict)
    cron: str | None = None
    every: float | None = None
    timezone: str = "UTC"
    catch_up: str = "skip"
    paused: bool = False
    priority: int = 0
    max_retries: int | None = None
    timeout: float | None = None
    source: str = "api"
    next_fire_at: datetime | None = None
    # The last fire decided, and the task it created (None while that task is not created yet).
    last_fire_at: datetime | None = None
    last_task_id: str | None = None
    updated_at: datetime | None = None

    def replace(self, **changes: Any) -> Schedule:
        return replace(self, **changes)

    def definition(self) -> dict[str, Any]:
        """What a user defines (``TaskManager.add_schedule``'s arguments): no source, no state."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_DEFINED}

    def same_timing(self, other: Schedule) -> bool:
        return (self.cron, self.every, self.timezone) == (other.cron, other.every, other.timezone)

    def succeeding(self, stored: Schedule) -> Schedule:
        """This definition saved over ``stored``: the last fire and its task are kept, and so is
        the next fire time while the timing (cron, every, timezone) is the same."""
        keep = stored.next_fire_at is not None and self.same_timing(stored)
        return replace(
            self,
            next_fire_at=stored.next_fire_at if keep else self.next_fire_at,
            last_fire_at=stored.last_fire_at,
            last_task_id=stored.last_task_id,
        )

    def record(self) -> dict[str, Any]:
        """The stored form, every field by name; backends encode ``TIME_FIELDS`` as they need."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], time: Callable[[Any], datetime | None] = lambda v: v) -> Schedule:
        """The inverse of ``record`` (other keys of ``record`` ignored); ``time`` decodes a time."""
        values: dict[str, Any] = {f.name: record.get(f.name) for f in fields(cls)}
        for name in TIME_FIELDS:
            values[name] = time(values[name])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in self.record().items()}

    def check(self) -> Schedule:
        """``InvalidScheduleError`` naming the first bad field of the schedule's own fields (the
        task's type, payload and options are checked as a submit's are); returns ``self``."""
        problem = _first_problem(self)
        if problem is not None:
            raise InvalidScheduleError(problem[1], field=problem[0])
        return self

    # --- fire times -----------------------------------------------------------------------

    def starting(self, now: datetime) -> Schedule:
        """This schedule with its first fire time after ``now`` (``every``: one interval on)."""
        return replace(self, next_fire_at=replace(self, next_fire_at=None).next_after(now))

    def next_after(self, after: datetime) -> datetime:
        """The first fire time strictly after ``after``."""
        if self.cron is not None:
            return self._cron_step(after, backwards=False)
        period, anchor = self._period(), self.next_fire_at
        if anchor is None:
            return after + period
        return anchor + ((after - anchor) // period + 1) * period

    def latest_at_or_before(self, now: datetime) -> datetime:
        """The last fire time at or before ``now``."""
        if self.cron is not None:
            return self._cron_step(now + timedelta(microseconds=1), backwards=True)
        anchor = self.next_fire_at if self.next_fire_at is not None else now
        return anchor + ((now - anchor) // self._period()) * self._period()

    def plan(self, now: datetime, grace: float = GRACE) -> tuple[datetime | None, datetime]:
        """For a due schedule (``next_fire_at <= now``): the fire time to fire now (None: the
        missed ones are skipped) and the next fire time, after ``now``."""
        due = self.next_fire_at
        if due is None:
            raise ValueError(f"schedule {self.name!r} has no next fire time")
        upcoming = self.next_after(now)
        if self.next_after(due) > now or now - due <= timedelta(seconds=grace):
            return due, upcoming
        return (self.latest_at_or_before(now) if self.catch_up == "once" else None), upcoming

    def _period(self) -> timedelta:
        return timedelta(seconds=float(self.every or 0))

    def _cron_step(self, start: datetime, *, backwards: bool) -> datetime:
        tz = ZoneInfo(self.timezone)
        times = croniter(self.cron, start.astimezone(tz))
        every_hour = times.expanded[1] == ["*"]
        while True:
            found: datetime = times.get_prev(datetime) if backwards else times.get_next(datetime)
            if every_hour or not _repeated(found.astimezone(UTC).astimezone(tz)):
                return found.astimezone(UTC)


def _repeated(local: datetime) -> bool:
    """Whether ``local`` is the second pass of a wall-clock time the clock repeats (fall back)."""
    return local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()


def fire_key(name: str, fire_at: datetime) -> str:
    """The idempotency key of one fire: two leaders firing the same time create one task."""
    return f"schedule:{name}:{fire_at.astimezone(UTC).isoformat()}"


# --- checks --------------------------------------------------------------------------------


def name_problem(name: Any) -> str | None:
    if isinstance(name, str) and _NAME.match(name):
        return None
    return f"must be 1..128 letters, digits, '_', '.' or '-', starting with a letter or digit (got {name!r})"


def cron_problem(expr: Any) -> str | None:
    """Why ``expr`` is not a 5-field cron expression croniter accepts, or None."""
    if not isinstance(expr, str):
        return f"must be a string (got {type(expr).__name__})"
    if len(expr.split()) != 5:
        return f"must have 5 fields, {_CRON_FIELDS} (got {expr!r})"
    try:
        croniter(expr, datetime(2000, 1, 1, tzinfo=UTC)).get_next(datetime)
    except CroniterBadDateError:
        return f"matches no date (got {expr!r})"
    except ValueError as exc:  # croniter's CroniterError is one
        return f"not a valid cron expression: {exc} (got {expr!r})"
    return None


def timezone_problem(name: Any) -> str | None:
    """Why ``name`` is not an IANA time zone known to this machine (zoneinfo), or None."""
    if not isinstance(name, str):
        return f"must be a string (got {type(name).__name__})"
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return f"not a known IANA time zone such as UTC or Europe/Berlin (got {name!r})"
    return None


def timing_problem(cron: str | None, every: float | None) -> str | None:
    if (cron is None) == (every is None):
        return f"give exactly one of cron and every (got {'both' if cron is not None else 'neither'})"
    return None


def every_problem(every: Any) -> str | None:
    if isinstance(every, bool) or not isinstance(every, int | float) or not math.isfinite(every):
        return f"must be a number of seconds (got {every!r})"
    if not 0 < every <= MAX_DELAY:
        return f"must be > 0 and <= {MAX_DELAY:g} seconds (got {every!r})"
    return None


def _first_problem(s: Schedule) -> tuple[str | None, str] | None:
    checks: list[tuple[str | None, str | None]] = [("name", name_problem(s.name))]
    timing = timing_problem(s.cron, s.every)
    if timing:
        checks.append((None, timing))
    elif s.cron is not None:
        checks.append(("cron", cron_problem(s.cron)))
    else:
        checks.append(("every", every_problem(s.every)))
    checks.append(("timezone", timezone_problem(s.timezone)))
    checks.append(("catch_up", None if s.catch_up in CATCH_UP else f"must be skip or once (got {s.catch_up!r})"))
    checks.append(("source", None if s.source in SOURCES else f"must be config or api (got {s.source!r})"))
    if not isinstance(s.payload, dict):
        checks.append(("payload", f"must be a JSON object (got {type(s.payload).__name__})"))
    else:
        try:
            json.dumps(s.payload, allow_nan=False)
        except (TypeError, ValueError) as exc:
            checks.append(("payload", f"not JSON-serializable: {exc}"))
    return next(((name, problem) for name, problem in checks if problem is not None), None)
