"""An executor in its own package, registered by entry point (see pyproject.toml).

config.yaml:
    executors:
      - type: greeting
        config: {greeting: "Hello", max_retries: 2}

Task type ``greet``, payload ``{"name": "Ada", "shout": false}``.
"""

from __future__ import annotations

import logging

from pydantic import BaseModel, ConfigDict, ValidationError

from celery_ext import Executor, ExecutorSettings, Task, TaskResult
from celery_ext.errors import PermanentError

logger = logging.getLogger(__name__)


class GreetingSettings(ExecutorSettings):
    """The keys this executor accepts under ``config`` (plus timeout and max_retries)."""

    greeting: str = "Hello"


class GreetPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    shout: bool = False


class GreetingExecutor(Executor):
    type = "greeting"
    settings_model = GreetingSettings

    @property
    def supported_task_types(self) -> list[str]:
        return ["greet"]

    def execute(self, task: Task) -> TaskResult:
        try:
            payload = GreetPayload.model_validate(task.payload)
        except ValidationError as exc:
            field = ".".join(str(p) for p in exc.errors()[0]["loc"])
            raise PermanentError("invalid_payload", f"{field}: {exc.errors()[0]['msg']}") from None
        assert isinstance(self.settings, GreetingSettings)
        text = f"{self.settings.greeting}, {payload.name}!"
        logger.info("greeting %s", payload.name)  # lands in the task's logs
        return TaskResult.ok(text.upper() if payload.shout else text)
