"""Importing a Celery beat schedule (``app.conf.beat_schedule``) as celery_ext schedules.

Each entry becomes a schedule named after its key (characters a name cannot hold become ``-``):
``crontab`` -> ``cron`` (evaluated in the app's ``timezone``, as beat does); a number of seconds,
a ``timedelta`` or ``celery.schedules.schedule`` -> ``every``; ``task`` -> ``task_type``;
``kwargs`` -> ``payload``; ``options["priority"]`` -> ``priority``.  A payload holds keyword
arguments only, so an entry with positional ``args`` is refused (unless they are empty), as is a
``solar`` schedule; other options (queue, expires, ...) are not carried over.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from celery_ext.errors import InvalidScheduleError
from celery_ext.schedules.model import Schedule

_CRONTAB_FIELDS = ("_orig_minute", "_orig_hour", "_orig_day_of_month", "_orig_month_of_year", "_orig_day_of_week")


@dataclass(frozen=True, slots=True)
class BeatImport:
    schedules: list[Schedule] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # one line per entry: its key and why


def load_app(spec: str) -> Any:
    """The Celery app named by ``module:attribute``, or by ``module`` alone (its ``app`` or
    ``celery``, else the first Celery instance it defines)."""
    from celery import Celery

    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidScheduleError(f"cannot import {module_name!r}: {exc}", field="beat") from exc
    if attr:
        app = getattr(module, attr, None)
    else:
        candidates = [getattr(module, "app", None), getattr(module, "celery", None), *vars(module).values()]
        app = next((c for c in candidates if isinstance(c, Celery)), None)
    if not isinstance(app, Celery):
        raise InvalidScheduleError(f"{spec!r} names no Celery app (give module:attribute)", field="beat")
    return app


def from_beat(app: Any) -> BeatImport:
    """Convert ``app.conf.beat_schedule``; entries that cannot be converted are in ``refused``."""
    timezone = str(app.conf.timezone or "UTC")
    result = BeatImport()
    names: dict[str, str] = {}
    for key, entry in (app.conf.beat_schedule or {}).items():
        try:
            schedule = convert(str(key), entry, timezone)
            if schedule.name in names:
                raise InvalidScheduleError(f"its name {schedule.name!r} is also {names[schedule.name]!r}'s")
        except InvalidScheduleError as exc:
            result.refused.append(f"beat entry {key!r}: {exc}")
            continue
        names[schedule.name] = str(key)
        result.schedules.append(schedule)
    return result


def convert(key: str, entry: Mapping[str, Any], timezone: str) -> Schedule:
    """One beat entry as a schedule (source ``api``), checked."""
    args = entry.get("args") or ()
    if args:
        raise InvalidScheduleError(
            f"positional args {list(args)!r} cannot be carried: a celery_ext payload holds keyword arguments; "
            "give them as kwargs",
            field="args",
        )
    task = entry.get("task")
    if not isinstance(task, str) or not task:
        raise InvalidScheduleError(f"must name the task (got {task!r})", field="task")
    kwargs = entry.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise InvalidScheduleError(f"must be a mapping (got {type(kwargs).__name__})", field="kwargs")
    options = entry.get("options") or {}
    return Schedule(
        name=re.sub(r"[^A-Za-z0-9_.-]+", "-", key).strip("-_.")[:128],
        task_type=task,
        payload=dict(kwargs),
        timezone=timezone,
        priority=options.get("priority", 0),
        **_timing(entry.get("schedule")),
    ).check()


def _timing(value: Any) -> dict[str, Any]:
    from celery.schedules import crontab, schedule

    if isinstance(value, crontab):
        return {"cron": " ".join(_cron_field(getattr(value, name)) for name in _CRONTAB_FIELDS)}
    if isinstance(value, schedule):
        value = value.run_every  # type: ignore[attr-defined]  # celery-types lacks it
    if isinstance(value, timedelta):
        return {"every": value.total_seconds()}
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {"every": float(value)}
    raise InvalidScheduleError(
        f"{type(value).__name__} is not a crontab, an interval or a number of seconds", field="schedule"
    )


def _cron_field(value: Any) -> str:
    if isinstance(value, Iterable) and not isinstance(value, str):
        return ",".join(str(v) for v in sorted(value))
    return str(value)
