"""The ``rpc`` executor: JSON-RPC 2.0 over HTTP(S), task type ``rpc_call``.

Config keys: those of ``executors/httpclient.py`` (``endpoints`` is where calls go; the guard
keys apply as for ``http``) plus ``timeout``, ``max_retries`` and
  retry_server_errors: retry RPC errors -32603 (internal error) and -32000..-32099 (server
                       errors); default true.  Every other RPC error fails the task at once.

Payload: ``endpoint`` (a name from ``endpoints``), ``method``, ``params`` (list or object,
optional), ``headers``, ``timeout`` (seconds).  Each attempt sends a fresh request id.

Result: ``result`` (the call's result), ``request_id``, ``elapsed``.
Reason codes: ``rpc_error`` (the error object's code, message and data are the task's
result), ``invalid_response`` (not a JSON-RPC 2.0 answer to our request), ``response_too_large``,
plus the http executor's ``http_server_error``/``http_throttled``/``http_status`` and the
client's codes.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import Field

from celery_ext.config import Model
from celery_ext.errors import PermanentError, TransientError
from celery_ext.executors.base import Executor, ExecutorSettings
from celery_ext.executors.http import check_status, request_timeout
from celery_ext.executors.httpclient import HttpClient, HttpClientSettings, HttpResponse, parse_payload
from celery_ext.model import Task, TaskResult


class RpcSettings(HttpClientSettings):
    retry_server_errors: bool = True


class RpcPayload(Model):
    endpoint: str
    method: str = Field(min_length=1)
    params: list[Any] | dict[str, Any] | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    timeout: float | None = Field(None, gt=0)


def is_server_error(code: int) -> bool:
    return code == -32603 or -32099 <= code <= -32000


class RpcExecutor(Executor):
    type = "rpc"
    settings_model = RpcSettings

    def __init__(self, settings: ExecutorSettings | None = None) -> None:
        super().__init__(settings)
        self.client: HttpClient | None = None

    @property
    def supported_task_types(self) -> list[str]:
        return ["rpc_call"]

    def initialize(self, config: ExecutorSettings) -> None:
        assert isinstance(config, RpcSettings)
        self.client = HttpClient(config)

    def execute(self, task: Task) -> TaskResult:
        p: RpcPayload = parse_payload(RpcPayload, task.payload)
        client = self.client
        assert client is not None, "initialize() was not called"
        url = client.url_for(p.endpoint)
        request_id = uuid.uuid4().hex
        call: dict[str, Any] = {"jsonrpc": "2.0", "method": p.method, "id": request_id}
        if p.params is not None:
            call["params"] = p.params
        what = f"rpc {p.endpoint}.{p.method}"
        resp = client.request(
            "POST", url, json=call, headers=p.headers, timeout=request_timeout(p.timeout, client, task)
        )
        answer = self._answer(resp, request_id, what)
        if "error" in answer:
            raise self._rpc_error(answer["error"], what)
        return TaskResult.ok(
            {"result": answer.get("result"), "request_id": request_id, "elapsed": round(resp.elapsed, 6)}
        )

    def _answer(self, resp: HttpResponse, request_id: str, what: str) -> dict[str, Any]:
        if resp.truncated:
            raise PermanentError(
                "response_too_large", f"{what}: response larger than max_body_bytes", data=resp.to_result()
            )
        answer = resp.json()
        # Servers often send an error object with a 500: the error object says more than the status.
        if not (isinstance(answer, dict) and answer.get("jsonrpc") == "2.0"):
            check_status(resp, 200 <= resp.status < 300, what)
            raise PermanentError("invalid_response", f"{what}: not a JSON-RPC 2.0 response", data=resp.to_result())
        if answer.get("id") != request_id and not ("error" in answer and answer.get("id") is None):
            raise PermanentError(
                "invalid_response", f"{what}: response id {answer.get('id')!r} is not request id {request_id!r}"
            )
        if ("result" in answer) == ("error" in answer):
            raise PermanentError("invalid_response", f"{what}: response must hold exactly one of result and error")
        return answer

    def _rpc_error(self, error: Any, what: str) -> PermanentError | TransientError:
        if not (isinstance(error, dict) and isinstance(error.get("code"), int)):
            return PermanentError("invalid_response", f"{what}: malformed error object {error!r}")
        code, message = error["code"], str(error.get("message", ""))
        data = {"code": code, "message": message, "data": error.get("data")}
        text = f"{what}: RPC error {code}: {message}"
        assert isinstance(self.settings, RpcSettings)
        if self.settings.retry_server_errors and is_server_error(code):
            return TransientError("rpc_error", text, data=data)
        return PermanentError("rpc_error", text, data=data)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
