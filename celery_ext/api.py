"""The REST API: ``celery-ext api`` serves ``TaskManager`` over HTTP (``pip install celery-ext[api]``).

FastAPI on Starlette: the pydantic models below validate every request, and FastAPI derives the
OpenAPI 3.1 document served at ``/openapi.json`` from the very same models, so the document cannot
drift from what the server accepts.  Binds ``api.host`` (default 127.0.0.1) and ``api.port``
(8808).  With ``api.token`` set (write ``"${API_TOKEN}"``), every route but the probes and the
document needs ``Authorization: Bearer <token>`` (the scheme in any case).

  POST /tasks                      SubmitRequest -> 201 the record (200 when the idempotency key
                                   returned an existing task)
  POST /tasks:batch                {"tasks": [SubmitRequest, ...]} -> 201 {"items": [...]}, one
                                   insert and one producer (TaskManager.submit_many)
  GET  /tasks/{id}                 the record
  GET  /tasks?status=&type=&worker=&limit=&cursor=
                                   {"items": [...], "next_cursor": ...}, newest first
  GET  /tasks/{id}/logs?run=&attempt=   {"items": [...]}
  POST /tasks/{id}/cancel?terminate=    the record (409 when it already finished)
  POST /tasks/{id}/retry           the record (409 unless it failed, was cancelled or is dead)
  GET  /workers                    the worker registry
  GET  /healthz                    alive: {"status": "ok", "config_version", "app_version"}, no I/O
  GET  /readyz                     storage and broker reachable, or 503 naming what is down
  GET  /health                     storage reachable (kept for existing monitors)
  GET  /openapi.json               the OpenAPI 3.1 document
  GET  /ui                         the dashboard (celery_ext/ui; login with the token, session cookie)

Records are the same JSON as ``celery-ext ... --json`` (statuses lowercase, ISO 8601 UTC times).
Every error, an unknown route and a wrong method included, is ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Path, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from celery_ext import __version__
from celery_ext.config import ERROR_MESSAGES, config_version
from celery_ext.cursor import decode_cursor
from celery_ext.dispatch import MAX_PRIORITY
from celery_ext.errors import (
    InvalidPayloadError,
    InvalidTransitionError,
    PublishError,
    StorageError,
    TaskError,
    TaskNotFoundError,
    UnknownTaskTypeError,
)
from celery_ext.factory import create_app
from celery_ext.model import TaskStatus
from celery_ext.runtime import Runtime, runtime_of
from celery_ext.ui import auth as ui_auth
from celery_ext.ui import mount_ui

logger = logging.getLogger("celery_ext.api")

# Routes anyone may call: the probes and the document (it describes the API, it holds no data).
PUBLIC_PATHS = frozenset({"/health", "/healthz", "/readyz", "/openapi.json"})

# Bounds of the API's inputs.  Beyond them a value cannot be stored (32-bit columns, a run_at
# past year 9999) or is surely a mistake; the document states each one.
INT32 = 2**31 - 1
MAX_BATCH = 1000
MAX_DELAY = 366 * 86400.0 * 10  # ten years
MAX_TIMEOUT = 366 * 86400.0  # a year
MAX_RETRIES = 10_000
KEY = r"^[^\x00]*$"  # no NUL: PostgreSQL text cannot hold one


# --- the models: they validate requests, and the OpenAPI document is made from them ----------


class SubmitRequest(BaseModel):
    """One task to submit: ``TaskManager.submit``'s arguments."""

    model_config = ConfigDict(extra="forbid", strict=True)

    task_type: str = Field(
        min_length=1, max_length=128, pattern=KEY, description="a type the config declares or a live worker advertises"
    )
    payload: dict[str, Any] | None = Field(
        None, description="the task's input, a JSON object of at most app.max_payload_bytes (default {})"
    )
    priority: int = Field(0, ge=0, le=MAX_PRIORITY, description="higher runs first")
    delay: float | None = Field(None, ge=0, le=MAX_DELAY, description="seconds before it may start")
    max_retries: int | None = Field(
        None,
        ge=0,
        le=MAX_RETRIES,
        description="automatic retries (default: the executor's, else worker.default_max_retries)",
    )
    timeout: float | None = Field(None, gt=0, le=MAX_TIMEOUT, description="soft time limit in seconds")
    idempotency_key: str | None = Field(
        None,
        min_length=1,
        max_length=255,
        pattern=KEY,
        description="a second submit with the same key returns the first task",
    )

    def spec(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class BatchRequest(BaseModel):
    """Tasks submitted together: all are validated before any is written."""

    model_config = ConfigDict(extra="forbid", strict=True)

    tasks: list[SubmitRequest] = Field(min_length=1, max_length=MAX_BATCH)


DateTime = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


class ErrorInfo(BaseModel):
    reason: str = Field(description="a stable code, e.g. timeout, invalid_payload, worker_lost")
    message: str


class TaskRecord(BaseModel):
    """A task record, as ``celery-ext get ID --json`` prints it."""

    model_config = ConfigDict(extra="allow")

    task_id: str
    task_type: str
    payload: dict[str, Any]
    status: TaskStatus
    priority: int
    attempt: int = Field(description="attempts within this run")
    max_retries: int
    timeout: float | None
    run_at: DateTime | None
    worker_id: str | None
    result: Any = Field(description="what the task returned (any JSON), once succeeded")
    error: ErrorInfo | None
    idempotency_key: str | None
    created_at: DateTime
    queued_at: DateTime | None
    started_at: DateTime | None
    finished_at: DateTime | None
    updated_at: DateTime | None
    lease_until: DateTime | None
    run: int = Field(description="1, plus one per manual retry")
    args: list[Any] | None = Field(description="the message's positional arguments (a chain's previous result)")
    parent_id: str | None
    root_id: str | None
    group_id: str | None
    progress: dict[str, Any] | None = Field(
        description="the last custom state a running attempt reported with Celery's update_state: "
        "state, meta, attempt, run, at"
    )


class TaskList(BaseModel):
    items: list[TaskRecord]


class TaskPage(BaseModel):
    items: list[TaskRecord]
    next_cursor: str | None = Field(description="pass as cursor for the next page; null on the last")


class LogLine(BaseModel):
    model_config = ConfigDict(extra="allow")

    task_id: str
    run: int
    attempt: int
    time: DateTime
    level: str
    message: str


class LogList(BaseModel):
    items: list[LogLine]


class WorkerRecord(BaseModel):
    """One worker of the registry (as ``celery-ext workers --json``)."""

    model_config = ConfigDict(extra="allow")

    id: str
    queue: str
    hostname: str
    weight: int
    capacity: int
    supported_types: list[str]
    in_flight: int
    config_version: str
    heartbeat_at: float
    ttl: float
    pid: int
    online: bool
    healthy: bool = Field(True, description="false while its consumer takes nothing though work waits")
    problem: str = Field("", description="why it is unhealthy")


class WorkerList(BaseModel):
    items: list[WorkerRecord]


class Health(BaseModel):
    status: Literal["ok"]
    config_version: str | None = Field(
        None, description="the config this API process runs (`celery-ext config status`)"
    )
    app_version: str | None = Field(None, description="`app.version` of that config")
    checks: dict[str, str] | None = Field(None, description="each dependency checked: ok")


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: str = Field(
        description="invalid_payload, invalid_json, unknown_task_type, unauthorized, not_found, "
        "method_not_allowed, invalid_transition, too_large, unavailable, internal"
    )
    message: str
    field: str | None = Field(None, description="the input at fault (invalid_payload)")
    known_types: list[str] | None = Field(None, description="the task types there are (unknown_task_type)")
    status: str | None = Field(None, description="the task's status (invalid_transition)")


class ErrorBody(BaseModel):
    error: ErrorDetail


Responses = dict[int | str, dict[str, Any]]


def _err(status: int, description: str) -> Responses:
    return {status: {"model": ErrorBody, "description": description}}


BAD = _err(400, "invalid input: invalid_payload (with field), invalid_json or unknown_task_type (with known_types)")
DOWN = _err(503, "unavailable: the task store or the broker is down; nothing is half-written")
MISSING = _err(404, "not_found: there is no such task")
CONFLICT = _err(409, "invalid_transition: the task's status does not allow it (with status)")
TOO_LARGE = _err(413, "too_large: the body is over api.max_body_bytes")
UNAUTHORIZED = _err(401, "unauthorized: the bearer token is missing or wrong")


# --- errors ----------------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.extra = status, code, extra


_ERRORS: list[tuple[type[Exception], int, str]] = [
    (UnknownTaskTypeError, 400, "unknown_task_type"),
    (InvalidPayloadError, 400, "invalid_payload"),
    (TaskNotFoundError, 404, "not_found"),
    (InvalidTransitionError, 409, "invalid_transition"),
    (StorageError, 503, "unavailable"),
    (PublishError, 503, "unavailable"),
]


def _error(
    status: int, code: str, message: str, /, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status, headers=headers)


def _translate(exc: Exception) -> JSONResponse | None:
    """The response for an error celery_ext raises on purpose; None for anything else."""
    if isinstance(exc, ApiError):
        return _error(exc.status, exc.code, str(exc), **exc.extra)
    for kind, status, code in _ERRORS:
        if isinstance(exc, kind):
            extra: dict[str, Any] = {}
            if isinstance(exc, UnknownTaskTypeError):
                extra["known_types"] = exc.known
            elif isinstance(exc, InvalidPayloadError) and exc.field:
                extra["field"] = exc.field
            elif isinstance(exc, InvalidTransitionError):
                extra["status"] = exc.status
            return _error(status, code, str(exc), **extra)
    return None


_MESSAGES = {
    **ERROR_MESSAGES,
    "string_too_short": "must have at least {min_length} character(s)",
    "string_too_long": "must have at most {max_length} characters",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} items",
    "string_pattern_mismatch": "must not contain NUL characters",
    "enum": "must be one of {expected}",
}


def _field(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_response(exc: RequestValidationError) -> JSONResponse:
    """A request that does not fit the models: 400, naming the field (never FastAPI's 422)."""
    errors: list[dict[str, Any]] = [dict(e) for e in exc.errors()]
    if errors and errors[0]["type"] == "json_invalid":
        ctx = errors[0].get("ctx") or {}
        return _error(400, "invalid_json", f"the body is not JSON: {ctx.get('error', errors[0]['msg'])}")
    lines, fields = [], []
    for err in errors:
        loc = tuple(err.get("loc", ()))
        where, path = (loc[0], loc[1:]) if loc and loc[0] in ("body", "query", "path") else ("", loc)
        name = _field(path[:-1] if err["type"] == "enum" and path and isinstance(path[-1], int) else path)
        if where == "body" and not name:
            got = err.get("input")
            lines.append(
                "the body must be a JSON object"
                + (
                    ""
                    if err["type"] == "missing"
                    else " sent as Content-Type: application/json"
                    if isinstance(got, bytes)
                    else f" (got {type(got).__name__})"
                )
            )
            fields.append("")
            continue
        template = _MESSAGES.get(err["type"])
        message = template.format(**(err.get("ctx") or {})) if template else str(err["msg"])
        if err["type"] not in ("missing", "extra_forbidden"):
            message += f" (got {_short(err.get('input'))})"
        lines.append(f"{name}: {message}")
        fields.append(name)
    extra: dict[str, Any] = {"field": fields[0]} if fields[0] else {}
    return _error(400, "invalid_payload", "; ".join(lines), **extra)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --- the gate: token and body size, before anything is parsed ---------------------------------


class Gate:
    """Pure ASGI middleware: checks the bearer token (scheme in any case, constant-time compare)
    and caps the body at ``api.max_body_bytes`` before a route reads or parses anything."""

    def __init__(self, app: ASGIApp, *, token: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.token is not None and scope["path"] not in PUBLIC_PATHS and not self.authorized(headers):
            # The dashboard (celery_ext/ui) also accepts its session cookie, on /ui paths only.
            refused = (
                ui_auth.refusal(scope, headers, self.token)
                if ui_auth.is_ui(scope["path"])
                else _error(
                    401, "unauthorized", "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
                )
            )
            if refused is not None:
                await refused(scope, receive, send)
                return
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            await self.too_large(
                scope, receive, send, f"the body is {declared} bytes; api.max_body_bytes is {self.limit}"
            )
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await self.too_large(scope, receive, send, f"the body is over api.max_body_bytes ({self.limit})")
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def authorized(self, headers: Mapping[str, str]) -> bool:
        scheme, _, given = headers.get("authorization", "").partition(" ")
        return (
            scheme.lower() == "bearer"
            and self.token is not None
            and hmac.compare_digest(given.strip().encode(), self.token)
        )

    async def too_large(self, scope: Scope, receive: Receive, send: Send, message: str) -> None:
        await _error(413, "too_large", message, headers={"Connection": "close"})(scope, receive, send)


class ErrorRoute(APIRoute):
    """Turns celery_ext's errors into their JSON answers, and anything unexpected into a JSON
    500 (logged with its traceback) instead of a bare text page."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except (RequestValidationError, StarletteHTTPException):
                raise
            except Exception as exc:  # noqa: BLE001 - every error becomes a JSON answer
                response = _translate(exc)
                if response is None:
                    logger.exception("%s %s failed", request.method, request.url.path)
                    return _error(500, "internal", f"{exc.__class__.__name__}: {exc}")
                return response

        return handle


# --- the app -------------------------------------------------------------------------------


def create_api(rt: Runtime) -> FastAPI:
    """The API over ``rt``; the app owns it: its shutdown closes ``rt`` (``Runtime.close``), so the
    events of the last requests are sent before the process exits."""
    settings = rt.config.api

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(rt.close)

    app = FastAPI(
        lifespan=lifespan,
        title="celery_ext",
        version=__version__,
        openapi_url="/openapi.json",
        docs_url=None,
        redoc_url=None,
        description="Durable task records over Celery: submit, inspect, cancel and retry tasks. "
        'Every error is {"error": {"code", "message"}}.',
    )
    app.add_middleware(Gate, token=settings.token, max_body_bytes=settings.max_body_bytes)
    app.add_exception_handler(RequestValidationError, _on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _on_http)  # type: ignore[arg-type]

    # The bearer scheme is in the document (and enforced by Gate) only when a token is set.
    bearer = HTTPBearer(auto_error=False, description="api.token")
    guarded = [Security(bearer)] if settings.token else []
    auth = UNAUTHORIZED if settings.token else {}
    tasks = APIRouter(route_class=ErrorRoute, dependencies=guarded, responses={**auth, **DOWN})
    probes = APIRouter(route_class=ErrorRoute)
    _task_routes(tasks, rt)
    _worker_routes(tasks, rt)
    _probe_routes(probes, rt)
    app.include_router(tasks)
    app.include_router(probes)
    app.state.methods = [
        (r.path_regex, r.methods or set())
        for router in (tasks, probes)
        for r in router.routes
        if isinstance(r, APIRoute)
    ]
    _document(app, rt.manager.executors.task_types)
    mount_ui(app, rt)
    return app


def from_environment() -> FastAPI:
    """The API over a runtime of its own, from ``$CELERY_EXT_CONFIG`` (else ``./config.yaml``):
    the app factory each process of ``celery-ext api --workers N`` calls, after it started."""
    return create_api(runtime_of(create_app()))


TaskId = Annotated[str, Path(min_length=1, max_length=255, pattern=KEY, description="the task's id")]


def _task_routes(tasks: APIRouter, rt: Runtime) -> None:
    manager = rt.manager

    @tasks.post(
        "/tasks",
        status_code=201,
        response_model=TaskRecord,
        summary="Submit a task",
        responses={
            200: {"model": TaskRecord, "description": "the idempotency key was used before: the first task"},
            **BAD,
            **TOO_LARGE,
        },
    )
    def submit(body: SubmitRequest, response: Response) -> dict[str, Any]:
        spec = body.spec()
        key = spec.get("idempotency_key")
        before = rt.storage.tasks.get_by_idempotency_key(key) if key else None
        task = manager.submit(spec.pop("task_type"), spec.pop("payload", None), **spec)
        if before is not None:
            response.status_code = 200
        return task.to_dict()

    @tasks.post(
        "/tasks:batch",
        status_code=201,
        response_model=TaskList,
        summary="Submit tasks together",
        description="All are validated before any is written; then one insert and one producer. "
        "A task whose idempotency key was used before is the first task.",
        responses={**BAD, **TOO_LARGE},
    )
    def submit_batch(body: BatchRequest) -> dict[str, Any]:
        specs = [item.spec() for item in body.tasks]
        try:
            created = manager.submit_many(specs)
        except TaskError as exc:
            raise _batch_error(manager, specs, exc) from exc
        return {"items": [t.to_dict() for t in created]}

    _list_route(tasks, rt)

    @tasks.get("/tasks/{task_id}", response_model=TaskRecord, summary="One task", responses={**BAD, **MISSING})
    def get(task_id: TaskId) -> dict[str, Any]:
        return manager.get(task_id).to_dict()

    @tasks.get(
        "/tasks/{task_id}/logs",
        response_model=LogList,
        summary="A task's log lines, in order",
        responses={**BAD, **MISSING},
    )
    def logs(
        task_id: TaskId,
        run: Annotated[int | None, Query(ge=1, le=INT32, description="only this run")] = None,
        attempt: Annotated[int | None, Query(ge=0, le=INT32, description="only this attempt")] = None,
    ) -> dict[str, Any]:
        return {"items": [line.to_dict() for line in manager.logs(task_id, run=run, attempt=attempt)]}

    @tasks.post(
        "/tasks/{task_id}/cancel",
        response_model=TaskRecord,
        summary="Cancel a task",
        responses={**BAD, **MISSING, **CONFLICT, **TOO_LARGE},
    )
    def cancel(
        task_id: TaskId,
        terminate: Annotated[bool, Query(description="also kill the pool process running it (SIGTERM)")] = False,
    ) -> dict[str, Any]:
        return manager.cancel(task_id, terminate=terminate).to_dict()

    @tasks.post(
        "/tasks/{task_id}/retry",
        response_model=TaskRecord,
        summary="Run a finished task again",
        description="A failed, dead or cancelled task starts a new run.",
        responses={**BAD, **MISSING, **CONFLICT, **TOO_LARGE},
    )
    def retry(task_id: TaskId) -> dict[str, Any]:
        return manager.retry(task_id).to_dict()


def _list_route(tasks: APIRouter, rt: Runtime) -> None:
    manager = rt.manager

    @tasks.get("/tasks", response_model=TaskPage, summary="List tasks, newest first", responses=BAD)
    def list_tasks(
        # Not nullable: a query parameter is absent or a string, and the document says just that.
        status: Annotated[list[TaskStatus], Query(default_factory=list, description="any of these (repeat)")],
        task_type: Annotated[
            list[Annotated[str, Field(max_length=128, pattern=KEY)]],
            Query(default_factory=list, alias="type", description="any of these (repeat)"),
        ],
        worker: Annotated[str, Query(max_length=255, pattern=KEY, description="the worker that ran it")] = "",
        parent_id: Annotated[
            str, Query(max_length=255, pattern=KEY, description="tasks sent by this one (Celery's parent_id)")
        ] = "",
        root_id: Annotated[
            str, Query(max_length=255, pattern=KEY, description="the tasks of the workflow this one started")
        ] = "",
        group_id: Annotated[str, Query(max_length=255, pattern=KEY, description="the members of this group")] = "",
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        cursor: Annotated[
            str, Query(max_length=1024, pattern=KEY, description="next_cursor of the previous page")
        ] = "",
    ) -> dict[str, Any]:
        filters: dict[str, Any] = {"limit": limit, "status": tuple(status), "task_type": tuple(task_type)}
        for key, value in (
            ("worker_id", worker),
            ("parent_id", parent_id),
            ("root_id", root_id),
            ("group_id", group_id),
        ):
            if value:
                filters[key] = value
        if cursor:
            try:
                decode_cursor(cursor)
            except Exception:  # noqa: BLE001 - anything that does not decode
                raise ApiError(
                    400, "invalid_payload", "cursor: not a next_cursor this API returned", field="cursor"
                ) from None
            filters["cursor"] = cursor
        try:
            page = manager.list(**filters)
        except ValueError as exc:  # a cursor that does not decode
            raise ApiError(400, "invalid_payload", f"cursor: {exc}", field="cursor") from exc
        return {"items": [t.to_dict() for t in page.items], "next_cursor": page.next_cursor}


def _worker_routes(tasks: APIRouter, rt: Runtime) -> None:
    @tasks.get("/workers", response_model=WorkerList, summary="The worker registry")
    def workers() -> dict[str, Any]:
        registry = rt.registry
        try:
            found = [] if registry is None else [w.to_dict() for w in registry.all()]
        except Exception as exc:  # noqa: BLE001 - any client error means the registry is unreachable
            raise ApiError(503, "unavailable", f"worker registry unreachable: {exc}") from exc
        return {"items": found}


def _probe_routes(probes: APIRouter, rt: Runtime) -> None:
    running_version = config_version(rt.config)

    @probes.get("/healthz", response_model=Health, response_model_exclude_none=True, summary="Alive (no I/O)")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "config_version": running_version, "app_version": rt.config.app.version}

    @probes.get(
        "/readyz",
        response_model=Health,
        response_model_exclude_none=True,
        summary="Ready: the task store and the broker answer",
        responses=DOWN,
    )
    def readyz() -> dict[str, Any]:
        checks, down = {}, []
        for name, ping in (("storage", rt.storage.ping), ("broker", lambda: ping_broker(rt))):
            try:
                ping()
                checks[name] = "ok"
            except Exception as exc:  # noqa: BLE001 - any failure means not ready
                checks[name] = f"{exc.__class__.__name__}: {exc}"
                down.append(name)
        if down:
            raise ApiError(503, "unavailable", f"{' and '.join(down)} unreachable", checks=checks)
        return {"status": "ok", "checks": checks}

    @probes.get(
        "/health",
        response_model=Health,
        response_model_exclude_none=True,
        summary="The task store answers",
        responses=DOWN,
    )
    def health() -> dict[str, Any]:
        rt.storage.ping()  # a StorageError is answered 503 like on every route
        return {"status": "ok"}


def ping_broker(rt: Runtime, timeout: int = 3) -> None:
    """Open a fresh broker connection (a Redis channel PINGs on connect) and close it."""
    conn = rt.celery.connection_for_write()
    try:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=timeout)
    finally:
        conn.release()


def _batch_error(manager: Any, specs: list[dict[str, Any]], exc: TaskError) -> Exception:
    """``submit_many`` stops at the first bad spec; find which one, to name it."""
    for i, spec in enumerate(specs):
        try:
            manager.build_specs([spec])
        except TaskError as found:
            prefix = f"tasks[{i}]"
            if isinstance(found, UnknownTaskTypeError):
                return ApiError(
                    400, "unknown_task_type", f"{prefix}: {found}", known_types=found.known, field=f"{prefix}.task_type"
                )
            if isinstance(found, InvalidPayloadError):
                return ApiError(
                    400, "invalid_payload", f"{prefix}: {found}", field=f"{prefix}.{found.field or 'payload'}"
                )
            return found
    return exc


async def _on_validation(request: Request, exc: RequestValidationError) -> Response:
    return validation_response(exc)


async def _on_http(request: Request, exc: StarletteHTTPException) -> Response:
    if exc.status_code == 404:
        code, message = "not_found", f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        code, message = "method_not_allowed", f"{request.method} is not allowed on {request.url.path}"
        # Starlette names only the first route of the path; the answer names every method.
        return _error(405, code, message, headers={"Allow": ", ".join(_allowed(request))})
    else:
        code, message = "http_error", str(exc.detail)
    return _error(exc.status_code, code, message, headers=exc.headers)


def _allowed(request: Request) -> list[str]:
    methods: set[str] = set()
    for regex, allowed in request.app.state.methods:
        if regex.match(request.url.path):
            methods |= allowed
    return sorted(methods)


def _document(app: FastAPI, known_types: list[str]) -> None:
    """The document FastAPI makes, less its 422 answers (this API answers 400 with ErrorBody)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for item in schema.get("paths", {}).values():
                for operation in item.values():
                    operation.get("responses", {}).pop("422", None)
            models = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                models.pop(name, None)
            if known_types:  # this process's own types, as examples (live workers may add more)
                models["SubmitRequest"]["properties"]["task_type"]["examples"] = known_types
            app.openapi_schema = json.loads(json.dumps(schema))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
