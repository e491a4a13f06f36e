"""Counts of tasks per status and per type over time, and the inline SVG chart drawn from them.

With SQL storage the counts are one ``GROUP BY`` over a ``CASE`` that numbers the time buckets
(portable to SQLite, PostgreSQL and MySQL; it reads only the index on (created_at, status,
task_type), schema version 6).  Other stores are counted from ``TaskRepository.list`` pages, up
to ``SCAN_CAP`` records (the chart says when it stopped there).

A count still reads one index entry per record in the window: a million records created in a day
take a second or more of PostgreSQL.  ``Recent`` keeps the last counts of each window; an
expensive one is recounted in the background once it is ``MAX_AGE`` old, so no page waits for it
but the very first, and any number of viewers cost one count per window every ``MAX_AGE``
seconds.  A cheap count (a small store) is made for every request, as before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from celery_ext.model import TaskFilter, TaskStatus, utcnow
from celery_ext.storage.base import Storage
from celery_ext.storage.sql import SqlStorage
from celery_ext.storage.sql_schema import tasks

WINDOWS: dict[str, timedelta] = {"1h": timedelta(hours=1), "24h": timedelta(hours=24), "7d": timedelta(days=7)}
BUCKETS = 24
SCAN_CAP = 20_000
MAX_AGE = 10.0  # seconds an expensive count is served; the stats page polls every 10 s
CHEAP = 0.05  # seconds: a count that took less is made for every request

logger = logging.getLogger("celery_ext.ui")

# One colour per status (the same in the list's badges, ui.css).
STATUS_COLOURS = {
    "pending": "#9e9e9e",
    "scheduled": "#8d6e63",
    "queued": "#42a5f5",
    "running": "#ffa726",
    "retrying": "#ab47bc",
    "succeeded": "#66bb6a",
    "failed": "#ef5350",
    "cancelled": "#78909c",
    "dead": "#5d4037",
}
TYPE_COLOURS = ["#1e88e5", "#43a047", "#fb8c00", "#8e24aa", "#00acc1", "#e53935", "#6d4c41", "#3949ab"]
OTHER = "(other)"


@dataclass
class Counts:
    start: datetime
    step: timedelta
    # (bucket index, status, task type) -> records created in that bucket
    cells: Counter[tuple[int, str, str]] = field(default_factory=Counter)
    truncated: bool = False

    def edges(self) -> list[datetime]:
        return [self.start + self.step * i for i in range(BUCKETS + 1)]

    @property
    def end(self) -> datetime:
        """When the records were counted (the chart's right edge)."""
        return self.start + self.step * BUCKETS


def count(storage: Storage, window: timedelta, now: datetime | None = None) -> Counts:
    now = now or utcnow()
    step = window / BUCKETS
    counts = Counts(now - window, step)

    if isinstance(storage, SqlStorage):
        _count_sql(storage, counts)
    else:
        _count_scan(storage, counts, now)
    return counts


class Recent:
    """The last counts of each window, shared by every request.

    A count that took less than ``cheap`` seconds is simply made again for every request (a small
    store: always live).  An expensive one is served for ``max_age`` seconds; after that, requests
    get the previous counts at once, told that they are stale, while one background thread per
    window recounts (the chart asks again shortly).  Only a window never counted yet is counted in
    the request (and a failure there is raised to it); a failed recount is logged and tried again
    by the next request."""

    def __init__(self, storage: Storage, max_age: float = MAX_AGE, cheap: float = CHEAP) -> None:
        self.storage = storage
        self.max_age = max_age
        self.cheap = cheap
        self._lock = threading.Lock()
        self._counts: dict[timedelta, tuple[float, float, Counts]] = {}  # (counted at, took, counts)
        self._recounting: set[timedelta] = set()

    def get(self, window: timedelta) -> tuple[Counts, bool]:
        """The counts, and whether they are stale (a recount is running)."""
        with self._lock:
            cached = self._counts.get(window)
            if cached is None or cached[1] < self.cheap:
                cached = None
            elif time.monotonic() - cached[0] < self.max_age:
                return cached[2], False
            start = cached is not None and window not in self._recounting
            if start:
                self._recounting.add(window)
        if cached is None:
            return self._recount(window), False
        if start:
            threading.Thread(target=self._background, args=(window,), name="chart-recount", daemon=True).start()
        return cached[2], True

    def _recount(self, window: timedelta) -> Counts:
        at = time.monotonic()
        counts = count(self.storage, window)
        with self._lock:
            if window not in self._counts or self._counts[window][0] < at:
                self._counts[window] = (at, time.monotonic() - at, counts)
        return counts

    def _background(self, window: timedelta) -> None:
        try:
            self._recount(window)
        except Exception as exc:  # noqa: BLE001 - the previous counts stay; the next request retries
            logger.warning("recounting tasks for the chart failed: %s", exc)
        finally:
            with self._lock:
                self._recounting.discard(window)


def _count_sql(storage: Any, counts: Counts) -> None:
    from sqlalchemy import case, func, select

    edges = counts.edges()
    bucket = case(*[(tasks.c.created_at < edge, i) for i, edge in enumerate(edges[1:])], else_=BUCKETS - 1)
    stmt = (
        select(bucket.label("b"), tasks.c.status, tasks.c.task_type, func.count())
        .where(tasks.c.created_at >= edges[0])
        .group_by("b", tasks.c.status, tasks.c.task_type)
    )
    with storage.begin() as conn:
        for b, status, task_type, n in conn.execute(stmt):
            counts.cells[(min(int(b), BUCKETS - 1), str(status), str(task_type))] += int(n)


def _count_scan(storage: Storage, counts: Counts, now: datetime) -> None:
    cursor: str | None = None
    seen = 0
    while True:
        page = storage.tasks.list(TaskFilter(created_after=counts.start, limit=1000, cursor=cursor))
        for task in page.items:
            b = min(int((task.created_at - counts.start) / counts.step), BUCKETS - 1)
            counts.cells[(max(b, 0), task.status.value, task.task_type)] += 1
        seen += len(page.items)
        cursor = page.next_cursor
        if cursor is None:
            return
        if seen >= SCAN_CAP:
            counts.truncated = True
            return


@dataclass
class Chart:
    """What the template draws: stacked bars, one series per status or type."""

    width: int
    height: int
    bars: list[dict[str, Any]]  # {"x", "y", "w", "h", "colour", "title"}
    legend: list[tuple[str, str, int]]  # (name, colour, total)
    ticks: list[tuple[float, str]]  # (x, label)
    peak: int
    total: int


def chart(counts: Counts, by: str, width: int = 720, height: int = 160) -> Chart:
    """Stacked bars per bucket, ``by`` "status" or "type" (the 7 busiest types, then "(other)")."""
    totals: Counter[str] = Counter()
    for (_, status, task_type), n in counts.cells.items():
        totals[status if by == "status" else task_type] += n
    if by == "status":
        order = [s.value for s in TaskStatus if totals[s.value]]
        colour = {name: STATUS_COLOURS.get(name, "#999") for name in order}
    else:
        busiest = [name for name, _ in totals.most_common(len(TYPE_COLOURS) - 1)]
        order = busiest + ([OTHER] if len(totals) > len(busiest) else [])
        colour = {name: TYPE_COLOURS[i % len(TYPE_COLOURS)] for i, name in enumerate(order)}
        if OTHER in colour:
            colour[OTHER] = "#bdbdbd"
            totals[OTHER] = sum(n for name, n in totals.items() if name not in busiest and name != OTHER)
    per: dict[int, Counter[str]] = {i: Counter() for i in range(BUCKETS)}
    for (b, status, task_type), n in counts.cells.items():
        key = status if by == "status" else task_type
        per[b][key if key in colour else OTHER] += n
    peak = max((sum(c.values()) for c in per.values()), default=0)
    left, bottom = 36, 18
    plot_w, plot_h = width - left - 4, height - bottom - 4
    slot = plot_w / BUCKETS
    bars: list[dict[str, Any]] = []
    edges = counts.edges()
    for b in range(BUCKETS):
        y = float(plot_h + 4)
        for name in order:
            n = per[b][name]
            if not n:
                continue
            h = plot_h * n / peak
            y -= h
            bars.append(
                {
                    "x": round(left + b * slot + 1, 1),
                    "y": round(y, 1),
                    "w": round(max(slot - 2, 1), 1),
                    "h": round(h, 1),
                    "colour": colour[name],
                    "title": f"{name}: {n} ({_label(edges[b], counts.step)}–{_label(edges[b + 1], counts.step)})",
                }
            )
    ticks = [(round(left + b * slot, 1), _label(edges[b], counts.step)) for b in range(0, BUCKETS, 6)]
    return Chart(
        width,
        height,
        bars,
        [(name, colour[name], totals[name]) for name in order],
        ticks,
        peak,
        sum(totals[name] for name in order if name != OTHER) + (totals[OTHER] if OTHER in order else 0),
    )


def _label(moment: datetime, step: timedelta) -> str:
    return moment.strftime("%H:%M" if step < timedelta(hours=1) else "%m-%d %H:%M")
