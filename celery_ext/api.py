"""The REST API: ``celery-ext api`` serves ``TaskManager`` over HTTP (``pip install celery-ext[api]``).

Binds ``api.host`` (default 127.0.0.1) and ``api.port`` (8808).  With ``api.token`` set (write
``"${API_TOKEN}"``), every route but ``/health`` needs ``Authorization: Bearer <token>``.

  POST /tasks                      {"task_type", "payload", "priority", "delay", "max_retries",
                                   "timeout", "idempotency_key"} -> 201 the record (200 when the
                                   idempotency key returned an existing task)
  GET  /tasks/{id}                 the record
  GET  /tasks?status=&type=&worker=&limit=&cursor=
                                   {"items": [...], "next_cursor": ...}, newest first
  GET  /tasks/{id}/logs?run=&attempt=   {"items": [...]}
  POST /tasks/{id}/cancel          the record (409 when it already finished)
  POST /tasks/{id}/retry           the record (409 unless it failed, was cancelled or is dead)
  GET  /workers                    the worker registry
  GET  /health                     {"status": "ok"} or 503 naming what is down

Records are the same JSON as ``celery-ext ... --json`` (statuses lowercase, ISO 8601 UTC times).
Errors are ``{"error": {"code", "message"}}``: 400 invalid input (``unknown_task_type`` lists the
known types), 401, 404, 409, 413 a body over ``api.max_body_bytes``, 503 a store or broker away.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from celery_ext.errors import (
    InvalidPayloadError,
    InvalidTransitionError,
    PublishError,
    StorageError,
    TaskNotFoundError,
    UnknownTaskTypeError,
)
from celery_ext.model import TaskStatus

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from celery_ext.factory import Runtime

logger = logging.getLogger("celery_ext.api")
SUBMIT_KEYS = {"task_type", "payload", "priority", "delay", "max_retries", "timeout", "idempotency_key"}


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


def _error(status: int, code: str, message: str, /, **extra: Any) -> Response:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status)


def _translate(exc: Exception) -> Response | None:
    """The response for an error celery_ext raises on purpose; None for anything else."""
    if isinstance(exc, ApiError):
        return _error(exc.status, exc.code, str(exc), **exc.extra)
    for kind, status, code in _ERRORS:
        if isinstance(exc, kind):
            extra: dict[str, Any] = {}
            if isinstance(exc, UnknownTaskTypeError):
                extra["known_types"] = exc.known
            elif isinstance(exc, InvalidPayloadError):
                extra["field"] = exc.field
            elif isinstance(exc, InvalidTransitionError):
                extra["status"] = exc.status
            return _error(status, code, str(exc), **extra)
    return None


class TaskApi:
    """The routes' logic; each handler returns (status, JSON data) or raises."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.manager = rt.manager
        self.settings = rt.config.api
        self.token = self.settings.token.encode() if self.settings.token else None

    def endpoint(self, fn: Handler, *, public: bool = False) -> Callable[[Request], Awaitable[Response]]:
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import JSONResponse

        async def handle(request: Request) -> Response:
            if self.token is not None and not public and not self._authorized(request):
                return _error(401, "unauthorized", "missing or wrong bearer token")
            try:
                body = await _json_body(request, self.settings.max_body_bytes) if request.method == "POST" else None
                status, data = await run_in_threadpool(fn, request, body)
            except Exception as exc:  # noqa: BLE001 - every error becomes a JSON answer
                response = _translate(exc)
                if response is None:
                    logger.exception("%s %s failed", request.method, request.url.path)
                    return _error(500, "internal", f"{exc.__class__.__name__}: {exc}")
                return response
            return JSONResponse(data, status_code=status)

        return handle

    def _authorized(self, request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return given.startswith("Bearer ") and self.token is not None and hmac.compare_digest(
            given[7:].encode(), self.token)

    def submit(self, request: Request, body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_payload", "the body must be a JSON object")
        unknown = sorted(set(body) - SUBMIT_KEYS)
        if unknown:
            raise ApiError(400, "invalid_payload", f"unknown keys {unknown}; expected some of {sorted(SUBMIT_KEYS)}")
        if not isinstance(body.get("task_type"), str):
            raise ApiError(400, "invalid_payload", "task_type: required, a string", field="task_type")
        for name, kinds in _TYPES:
            value = body.get(name)
            if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
                raise ApiError(400, "invalid_payload", f"{name}: expected {' or '.join(k.__name__ for k in kinds)} "
                                                       f"(got {type(value).__name__})", field=name)
        key = body.get("idempotency_key")
        before = self.rt.storage.tasks.get_by_idempotency_key(key) if key else None
        task = self.manager.submit(body["task_type"], body.get("payload"), **{
            k: v for k, v in body.items() if k not in ("task_type", "payload") and v is not None})
        return (200 if before is not None else 201), task.to_dict()

    def get(self, request: Request, _: Any) -> tuple[int, Any]:
        return 200, self.manager.get(request.path_params["task_id"]).to_dict()

    def list_tasks(self, request: Request, _: Any) -> tuple[int, Any]:
        q = request.query_params
        filters: dict[str, Any] = {"limit": _int(q.get("limit", "100"), "limit", 1, 1000)}
        if q.getlist("status"):
            try:
                filters["status"] = tuple(TaskStatus(s) for s in q.getlist("status"))
            except ValueError as exc:
                raise ApiError(400, "invalid_payload", f"status: {exc}; one of "
                                                       f"{', '.join(s.value for s in TaskStatus)}") from exc
        if q.getlist("type"):
            filters["task_type"] = tuple(q.getlist("type"))
        if q.get("worker"):
            filters["worker_id"] = q["worker"]
        if q.get("cursor"):
            filters["cursor"] = q["cursor"]
        try:
            page = self.manager.list(**filters)
        except ValueError as exc:  # a cursor that does not decode
            raise ApiError(400, "invalid_payload", f"cursor: {exc}") from exc
        return 200, {"items": [t.to_dict() for t in page.items], "next_cursor": page.next_cursor}

    def logs(self, request: Request, _: Any) -> tuple[int, Any]:
        attempt = request.query_params.get("attempt")
        run = request.query_params.get("run")
        lines = self.manager.logs(request.path_params["task_id"],
                                  attempt=_int(attempt, "attempt", 0, None) if attempt is not None else None,
                                  run=_int(run, "run", 1, None) if run is not None else None)
        return 200, {"items": [line.to_dict() for line in lines]}

    def cancel(self, request: Request, _: Any) -> tuple[int, Any]:
        return 200, self.manager.cancel(request.path_params["task_id"]).to_dict()

    def retry(self, request: Request, _: Any) -> tuple[int, Any]:
        return 200, self.manager.retry(request.path_params["task_id"]).to_dict()

    def workers(self, request: Request, _: Any) -> tuple[int, Any]:
        from celery_ext.routing.router import router_of

        registry = router_of(self.rt.celery).registry
        return 200, {"items": [] if registry is None else [w.to_dict() for w in registry.all()]}

    def health(self, request: Request, _: Any) -> tuple[int, Any]:
        self.rt.storage.ping()  # a StorageError is answered 503 like on every route
        return 200, {"status": "ok"}


Handler = Callable[["Request", Any], tuple[int, Any]]
_TYPES: list[tuple[str, tuple[type, ...]]] = [
    ("priority", (int,)), ("max_retries", (int,)), ("delay", (int, float)), ("timeout", (int, float)),
    ("idempotency_key", (str,)),
]


def create_api(rt: Runtime) -> Starlette:
    from starlette.applications import Starlette
    from starlette.routing import Route

    api = TaskApi(rt)
    return Starlette(routes=[
        Route("/tasks", api.endpoint(api.submit), methods=["POST"]),
        Route("/tasks", api.endpoint(api.list_tasks), methods=["GET"]),
        Route("/tasks/{task_id}", api.endpoint(api.get), methods=["GET"]),
        Route("/tasks/{task_id}/logs", api.endpoint(api.logs), methods=["GET"]),
        Route("/tasks/{task_id}/cancel", api.endpoint(api.cancel), methods=["POST"]),
        Route("/tasks/{task_id}/retry", api.endpoint(api.retry), methods=["POST"]),
        Route("/workers", api.endpoint(api.workers), methods=["GET"]),
        Route("/health", api.endpoint(api.health, public=True), methods=["GET"]),
    ])


async def _json_body(request: Request, limit: int) -> Any:
    size = int(request.headers.get("content-length") or 0)
    if size > limit:
        raise ApiError(413, "too_large", f"the body is {size} bytes; api.max_body_bytes is {limit}")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise ApiError(413, "too_large", f"the body is over api.max_body_bytes ({limit})")
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, "invalid_json", f"the body is not JSON: {exc}") from exc


def _int(value: str, name: str, low: int, high: int | None) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ApiError(400, "invalid_payload", f"{name}: expected an integer (got {value!r})") from None
    if n < low or (high is not None and n > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise ApiError(400, "invalid_payload", f"{name}: must be {bound} (got {n})")
    return n
