"""The ``http`` executor: task types ``http_request`` and ``send_webhook``.

Config keys: those of ``executors/httpclient.py`` (endpoints, allow_hosts, allow_networks,
max_redirects, max_body_bytes, request_timeout, max_connections, verify, headers) plus
``timeout`` and ``max_retries``.

Payload: ``method`` (default GET; POST for send_webhook), ``url`` or ``endpoint`` + ``path``,
``headers``, ``params``, ``json`` or ``body``, ``timeout`` (seconds), ``expected_status``
(a code or a list; default any 2xx).

Result: ``status``, ``headers``, ``body`` (text, capped at ``max_body_bytes``), ``truncated``,
``json`` (for a complete JSON body), ``elapsed`` (seconds), ``url`` (after redirects).

Reason codes besides the client's: ``http_server_error`` (5xx) and ``http_throttled``
(408, 429) are retried; ``http_status`` (any other unexpected status) is not.  A failed
task's result holds the response that made it fail.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from celery_ext.config import Model
from celery_ext.errors import PermanentError, TransientError
from celery_ext.executors.base import Executor, ExecutorSettings
from celery_ext.executors.httpclient import HttpClient, HttpClientSettings, HttpResponse, parse_payload
from celery_ext.model import Task, TaskResult

Method = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
Scalar = str | int | float | bool
THROTTLED = frozenset({408, 429})


class HttpPayload(Model):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    method: Method = "GET"
    url: str | None = None
    endpoint: str | None = None
    path: str = ""
    headers: dict[str, str] = Field(default_factory=dict)
    params: dict[str, Scalar | list[Scalar]] = Field(default_factory=dict)
    json_body: Any = Field(None, alias="json")
    body: str | None = None
    timeout: float | None = Field(None, gt=0)
    expected_status: int | list[int] | None = None

    @model_validator(mode="before")
    @classmethod
    def _upper_method(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("method"), str):
            return {**data, "method": data["method"].upper()}
        return data

    @model_validator(mode="after")
    def _one_target(self) -> HttpPayload:
        if (self.url is None) == (self.endpoint is None):
            raise ValueError("give exactly one of url or endpoint")
        if self.url is not None and self.path:
            raise ValueError("path goes with endpoint, not url")
        if self.json_body is not None and self.body is not None:
            raise ValueError("give json or body, not both")
        return self

    def accepts(self, status: int) -> bool:
        if self.expected_status is None:
            return 200 <= status < 300
        expected = self.expected_status if isinstance(self.expected_status, list) else [self.expected_status]
        return status in expected


class WebhookPayload(HttpPayload):
    method: Method = "POST"


class HttpSettings(HttpClientSettings):
    pass


def check_status(resp: HttpResponse, accepted: bool, what: str) -> None:
    """Raise the error an unaccepted status means (shared with the rpc executor)."""
    if accepted:
        return
    data = resp.to_result()
    if resp.status >= 500:
        raise TransientError("http_server_error", f"{what}: HTTP {resp.status}", data=data)
    if resp.status in THROTTLED:
        raise TransientError("http_throttled", f"{what}: HTTP {resp.status}", data=data)
    raise PermanentError("http_status", f"{what}: unexpected HTTP {resp.status}", data=data)


def request_timeout(asked: float | None, client: HttpClient, task: Task) -> float:
    """The payload's timeout, else the configured one; never beyond the task's own time limit."""
    timeout = asked or client.settings.request_timeout
    return min(timeout, task.timeout) if task.timeout else timeout


class HttpExecutor(Executor):
    type = "http"
    settings_model = HttpSettings

    def __init__(self, settings: ExecutorSettings | None = None) -> None:
        super().__init__(settings)
        self.client: HttpClient | None = None

    @property
    def supported_task_types(self) -> list[str]:
        return ["http_request", "send_webhook"]

    def initialize(self, config: ExecutorSettings) -> None:
        assert isinstance(config, HttpSettings)
        self.client = HttpClient(config)

    def execute(self, task: Task) -> TaskResult:
        model = WebhookPayload if task.task_type == "send_webhook" else HttpPayload
        p: HttpPayload = parse_payload(model, task.payload)
        client = self.client
        assert client is not None, "initialize() was not called"
        url = p.url if p.url is not None else client.url_for(p.endpoint or "", p.path)
        if p.params:
            url = client.merge_params(url, p.params)
        kwargs: dict[str, Any] = {"headers": p.headers}
        if p.json_body is not None:
            kwargs["json"] = p.json_body
        elif p.body is not None:
            kwargs["content"] = p.body.encode()
        resp = client.request(p.method, url, timeout=request_timeout(p.timeout, client, task), **kwargs)
        check_status(resp, p.accepts(resp.status), f"{p.method} {url}")
        return TaskResult.ok(resp.to_result())

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
