"""The dashboard's routes: pages, the htmx fragments they poll, and the cancel/retry actions.

Every handler is a plain ``def`` (FastAPI runs it in its thread pool: storage calls block).  A
full page is ``/ui/...``; the part it refreshes is the same path plus ``/rows`` or ``/live``.
Errors a user can cause (a bad filter, an unknown id, a refused transition) are shown on the page,
never answered with a 500.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode

import jinja2
from fastapi import APIRouter, FastAPI, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from celery_ext import __version__
from celery_ext.errors import InvalidTransitionError, TaskError, TaskNotFoundError
from celery_ext.model import TERMINAL, Task, TaskLog, TaskStatus, utcnow
from celery_ext.ui import auth, stats
from celery_ext.validation import renderable

if TYPE_CHECKING:
    from celery_ext.runtime import Runtime

logger = logging.getLogger("celery_ext.ui")

HERE = Path(__file__).parent
SINCE = {"15m": timedelta(minutes=15), "1h": timedelta(hours=1), "24h": timedelta(hours=24), "7d": timedelta(days=7)}
RETRYABLE = frozenset({TaskStatus.FAILED, TaskStatus.DEAD, TaskStatus.CANCELLED})
PAGE_SIZE = 50
MAX_LOG_LINES = 5000


def _ts(value: datetime | None) -> str:
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _seconds(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return "—"
    s = (end - start).total_seconds()
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s" if s < 120 else f"{s / 60:.1f} min"


def _json(value: Any) -> str:
    return json.dumps(renderable(value), indent=2, ensure_ascii=False, sort_keys=True, default=str)


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(ts=_ts, json=_json)
    env.globals.update(seconds=_seconds, version=__version__, colours=stats.STATUS_COLOURS)
    return env


class Ui:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.manager = rt.manager
        self.token = rt.config.api.token
        self.csrf_key = auth.csrf_key(self.token)
        self.env = environment()
        self.counts = stats.Recent(rt.storage)

    # --- rendering ------------------------------------------------------------------------

    def page(self, request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
        """A full page; sets the CSRF seed cookie on the first visit."""
        seed = request.cookies.get(auth.CSRF_COOKIE)
        fresh = not seed
        if not seed:
            seed = auth.new_seed()
        html = self.env.get_template(name).render(
            csrf=auth.csrf_token(self.csrf_key, seed), logged_in=bool(self.token), **context
        )
        response = HTMLResponse(html, status_code=status_code)
        if fresh:
            response.set_cookie(
                auth.CSRF_COOKIE,
                seed,
                httponly=True,
                samesite="strict",
                path=auth.PREFIX,
                secure=request.url.scheme == "https",
            )
        return response

    def fragment(self, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        return HTMLResponse(self.env.get_template(name).render(**context), status_code=status_code)

    # --- the task list --------------------------------------------------------------------

    def known_types(self) -> list[str]:
        types = set(self.manager.executors.task_types)
        try:
            types |= self.rt.router.advertised()
        except Exception:  # noqa: BLE001, S110 - the datalist is a convenience
            pass
        return sorted(types)

    def task_list(self, params: Mapping[str, Any], getlist: Callable[[str], list[str]]) -> dict[str, Any]:
        """The filters as given, the page of records, and any problem with the filters."""
        problems: list[str] = []
        statuses = [s for s in getlist("status") if s]
        bad = [s for s in statuses if s not in TaskStatus.__members__.values()]
        if bad:
            problems.append(f"unknown status {', '.join(bad)}")
        types = [t.strip() for raw in getlist("type") for t in raw.split(",") if t.strip()]
        worker = str(params.get("worker") or "").strip()
        since = str(params.get("since") or "")
        after, before = None, None
        if since in SINCE:
            after = utcnow() - SINCE[since]
        for key in ("from", "to"):
            raw = str(params.get(key) or "").strip()
            if not raw:
                continue
            try:
                moment = datetime.fromisoformat(raw)
            except ValueError:
                problems.append(f"{key}: not a date and time ({raw!r})")
                continue
            moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
            if key == "from":
                after = max(after, moment) if after else moment
            else:
                before = moment
        try:
            limit = min(max(int(params.get("limit") or PAGE_SIZE), 1), 500)
        except ValueError:
            limit = PAGE_SIZE
            problems.append("limit: not a number")
        cursor = str(params.get("cursor") or "")
        filters = {
            "status": statuses,
            "type": types,
            "worker": worker,
            "since": since,
            "from": str(params.get("from") or ""),
            "to": str(params.get("to") or ""),
            "limit": limit,
        }
        query = {k: v for k, v in filters.items() if v and k != "limit"}
        if limit != PAGE_SIZE:
            query["limit"] = limit
        tasks: list[Task] = []
        next_cursor = None
        if not problems:
            try:
                page = self.manager.list(
                    status=tuple(statuses),
                    task_type=tuple(types),
                    worker_id=worker or None,
                    created_after=after,
                    created_before=before,
                    limit=limit,
                    cursor=cursor or None,
                )
                tasks, next_cursor = page.items, page.next_cursor
            except (TaskError, ValueError) as exc:
                problems.append(f"cursor: {exc}" if cursor and isinstance(exc, ValueError) else str(exc))
        qs = urlencode(query, doseq=True)
        return {
            "filters": filters,
            "tasks": tasks,
            "problems": problems,
            "cursor": cursor,
            "next_cursor": next_cursor,
            "query": qs,
            "rows_query": urlencode({**query, **({"cursor": cursor} if cursor else {})}, doseq=True),
            "statuses": [s.value for s in TaskStatus],
        }

    # --- one task -------------------------------------------------------------------------

    def task_view(self, task_id: str, flash: str = "", flash_kind: str = "info") -> dict[str, Any]:
        task = self.manager.get(task_id)
        lines = self.manager.logs(task_id, limit=MAX_LOG_LINES)
        return {
            "task": task,
            "record": task.to_dict(),
            "attempts": attempts(task, lines),
            "groups": log_groups(lines),
            "log_count": len(lines),
            "log_cap": MAX_LOG_LINES,
            "live": task.status not in TERMINAL,
            "can_cancel": task.status not in TERMINAL,
            "can_terminate": task.status is TaskStatus.RUNNING,
            "can_retry": task.status in RETRYABLE,
            "flash": flash,
            "flash_kind": flash_kind,
        }

    # --- workers --------------------------------------------------------------------------

    def workers(self) -> dict[str, Any]:
        registry = self.rt.registry
        if registry is None:
            return {
                "workers": [],
                "problem": "no worker registry: the broker is not Redis and scheduler.registry_url is not set",
            }
        try:
            found = registry.all()
        except Exception as exc:  # noqa: BLE001 - any client error means the registry is unreachable
            return {"workers": [], "problem": f"worker registry unreachable: {exc}"}
        now = datetime.now(UTC).timestamp()
        rows = []
        for w in found:
            age = max(0.0, now - w.heartbeat_at) if w.heartbeat_at else None
            health = (
                "offline"
                if not w.online
                else "stalled"
                if not w.healthy
                else "late"
                if age is not None and w.ttl and age > w.ttl / 2
                else "healthy"
            )
            rows.append(
                {
                    "w": w,
                    "age": "—" if age is None else f"{age:.1f} s",
                    "health": health,
                    "load": min(100, round(100 * w.in_flight / w.capacity)) if w.capacity else 0,
                }
            )
        return {"workers": rows, "problem": "", "strategy": self.rt.config.scheduler.load_balance_strategy}

    # --- counts over time -----------------------------------------------------------------

    def chart(self, window: str, by: str) -> dict[str, Any]:
        window = window if window in stats.WINDOWS else "24h"
        by = by if by in ("status", "type") else "status"
        try:
            counts, recounting = self.counts.get(stats.WINDOWS[window])
        except Exception as exc:  # noqa: BLE001 - a chart must not break the page
            logger.warning("counting tasks for the chart failed: %s", exc)
            return {"window": window, "by": by, "chart": None, "problem": str(exc), "truncated": False}
        return {
            "window": window,
            "by": by,
            "chart": stats.chart(counts, by),
            "problem": "",
            "truncated": counts.truncated,
            "counted_at": counts.end,
            "recounting": recounting,
            "windows": list(stats.WINDOWS),
        }


def attempts(task: Task, lines: list[TaskLog]) -> list[dict[str, Any]]:
    """One row per (run, attempt) seen in the logs, plus the record's latest attempt: the record
    keeps the worker and timings of that one only; earlier ones show their log lines' times."""
    seen: dict[tuple[int, int], dict[str, Any]] = {}
    for line in lines:
        row = seen.setdefault(
            (line.run, line.attempt),
            {
                "run": line.run,
                "attempt": line.attempt,
                "first": line.time,
                "last": line.time,
                "lines": 0,
                "warnings": 0,
                "current": False,
            },
        )
        row["last"] = line.time
        row["lines"] += 1
        row["warnings"] += line.level in ("WARNING", "ERROR", "CRITICAL")
    if task.attempt:
        for n in range(1, task.attempt + 1):  # attempts of this run that logged nothing
            seen.setdefault(
                (task.run, n),
                {
                    "run": task.run,
                    "attempt": n,
                    "first": None,
                    "last": None,
                    "lines": 0,
                    "warnings": 0,
                    "current": False,
                },
            )
        latest = seen[(task.run, task.attempt)]
        latest.update(
            current=True,
            worker=task.worker_id,
            started=task.started_at,
            finished=task.finished_at,
            status=task.status.value,
        )
    return [seen[k] for k in sorted(seen)]


def log_groups(lines: list[TaskLog]) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    for line in lines:
        if not groups or (groups[-1]["run"], groups[-1]["attempt"]) != (line.run, line.attempt):
            groups.append({"run": line.run, "attempt": line.attempt, "lines": []})
        groups[-1]["lines"].append(line)
    return groups


def mount(app: FastAPI, rt: Runtime) -> None:
    ui = Ui(rt)
    router = APIRouter(prefix="/ui", include_in_schema=False)
    _pages(router, ui)
    _task_pages(router, ui)
    _login(router, ui)
    _actions(router, ui)
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")


def _pages(router: APIRouter, ui: Ui) -> None:
    @router.get("")
    @router.get("/")
    def home() -> Response:
        return RedirectResponse("/ui/tasks", status_code=303)

    @router.get("/login")
    def login_form(request: Request) -> Response:
        if not ui.token:
            return RedirectResponse("/ui/tasks", status_code=303)
        return ui.page(request, "login.html", next=auth.safe_next(request.query_params.get("next")), problem="")

    @router.get("/workers")
    def workers(request: Request) -> Response:
        return ui.page(request, "workers.html", nav="workers", **ui.workers())

    @router.get("/workers/rows")
    def worker_rows() -> Response:
        return ui.fragment("worker_rows.html", **ui.workers())

    @router.get("/stats")
    def stats_page(request: Request) -> Response:
        view = ui.chart(request.query_params.get("window", "24h"), request.query_params.get("by", "status"))
        return ui.page(request, "stats.html", nav="stats", **view)

    @router.get("/chart")
    def chart(request: Request) -> Response:
        view = ui.chart(request.query_params.get("window", "24h"), request.query_params.get("by", "status"))
        return ui.fragment("chart.html", **view)


def _task_pages(router: APIRouter, ui: Ui) -> None:
    @router.get("/tasks")
    def task_list(request: Request) -> Response:
        view = ui.task_list(request.query_params, request.query_params.getlist)
        return ui.page(request, "tasks.html", nav="tasks", known_types=ui.known_types(), **view)

    @router.get("/tasks/rows")
    def task_rows(request: Request) -> Response:
        return ui.fragment("task_rows.html", **ui.task_list(request.query_params, request.query_params.getlist))

    @router.get("/tasks/{task_id}")
    def task_page(request: Request, task_id: str) -> Response:
        try:
            view = ui.task_view(task_id)
        except TaskNotFoundError:
            return ui.page(request, "missing.html", status_code=404, nav="tasks", task_id=task_id)
        return ui.page(request, "task.html", nav="tasks", **view)

    @router.get("/tasks/{task_id}/live")
    def task_live(task_id: str) -> Response:
        try:
            return ui.fragment("task_live.html", **ui.task_view(task_id))
        except TaskNotFoundError:
            return ui.fragment("flash.html", flash=f"task {task_id} no longer exists", flash_kind="error")


def _login(router: APIRouter, ui: Ui) -> None:
    @router.post("/login")
    async def login(request: Request) -> Response:
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode("utf-8", "replace")).items()}
        target = auth.safe_next(form.get("next"))
        if not ui.token:
            return RedirectResponse(target, status_code=303)
        import hmac

        if not hmac.compare_digest(form.get("token", "").strip().encode(), ui.token.encode()):
            return ui.page(request, "login.html", status_code=401, next=target, problem="That is not the API token.")
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            auth.SESSION_COOKIE,
            auth.session_value(ui.token.encode()),
            httponly=True,
            samesite="strict",
            path=auth.PREFIX,
            secure=request.url.scheme == "https",
        )
        return response

    @router.post("/logout")
    def logout(request: Request) -> Response:
        if not auth.csrf_ok(ui.csrf_key, request.headers):
            return ui.fragment("flash.html", flash="Refused: this page is out of date; reload it.", flash_kind="error")
        response = Response(status_code=204, headers={"HX-Redirect": "/ui/login"})
        response.delete_cookie(auth.SESSION_COOKIE, path=auth.PREFIX)
        return response


def _actions(router: APIRouter, ui: Ui) -> None:
    def act(request: Request, task_id: str, action: str, do: Callable[[], Task]) -> Response:
        if not auth.csrf_ok(ui.csrf_key, request.headers):
            flash, kind = "Refused: this page is out of date (CSRF check failed); reload it.", "error"
        else:
            try:
                task = do()
                flash, kind = f"{action}: the task is now {task.status.value}", "info"
            except InvalidTransitionError as exc:
                flash, kind = f"{action} refused: {exc}", "error"
            except TaskNotFoundError:
                return ui.fragment("flash.html", flash=f"task {task_id} no longer exists", flash_kind="error")
            except TaskError as exc:
                flash, kind = f"{action} failed: {exc}", "error"
        # 200 even when refused: htmx swaps the fragment, refusal included, into the page.
        return ui.fragment("task_live.html", **ui.task_view(task_id, flash, kind))

    @router.post("/tasks/{task_id}/cancel")
    def cancel(request: Request, task_id: str) -> Response:
        terminate = request.query_params.get("terminate") in ("1", "true")
        return act(
            request,
            task_id,
            "terminate" if terminate else "cancel",
            lambda: ui.manager.cancel(task_id, terminate=terminate),
        )

    @router.post("/tasks/{task_id}/retry")
    def retry(request: Request, task_id: str) -> Response:
        return act(request, task_id, "retry", lambda: ui.manager.retry(task_id))
