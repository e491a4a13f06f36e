"""The exception tree of celery_ext.

CeleryExtError
├── ConfigError                 invalid config.yaml or unknown extension name
├── TaskError                   something about one task
│   ├── UnknownTaskTypeError    submit of a type no executor supports
│   ├── InvalidPayloadError     payload not a JSON object, too large, or failing a schema
│   ├── TaskNotFoundError       no record with that id
│   └── InvalidTransitionError  cancel/retry of a task in a state that forbids it
├── ScheduleError               something about one periodic schedule
│   ├── InvalidScheduleError    a bad field (cron, time zone, name, ...), named
│   └── ScheduleNotFoundError   no schedule of that name
├── StorageError                the task store cannot be reached or refused a write
├── PublishError                the record was written but the broker refused the message
├── TaskWaitTimeoutError        wait() gave up before a terminal status
└── ExecutorError               raised by executors; carries a reason code
    ├── PermanentError          never retried (4xx, guard refusal, bad payload)
    └── TransientError          retried with backoff (timeouts, 5xx, connection refused)

TaskFailed                      how a failed task ends in Celery (FAILURE), and what
                                ``AsyncResult.get()`` raises: "reason: message"
"""

from __future__ import annotations


class CeleryExtError(Exception):
    """Root of every error celery_ext raises on purpose."""


class ConfigError(CeleryExtError):
    """Invalid configuration; ``errors`` holds one ``path: message`` line per problem."""

    def __init__(self, errors: list[str] | str) -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))


class TaskError(CeleryExtError):
    """A problem with one task."""


class UnknownTaskTypeError(TaskError):
    def __init__(self, task_type: str, known: list[str]) -> None:
        self.task_type = task_type
        self.known = sorted(known)
        super().__init__(f"unknown task type {task_type!r}; known types: {', '.join(self.known) or '(none)'}")


class InvalidPayloadError(TaskError):
    def __init__(self, message: str, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"invalid payload: {field + ': ' if field else ''}{message}")


class TaskNotFoundError(TaskError):
    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(f"no task with id {task_id!r}")


class InvalidTransitionError(TaskError):
    def __init__(self, task_id: str, status: str, action: str) -> None:
        self.task_id = task_id
        self.status = status
        self.action = action
        super().__init__(f"cannot {action} task {task_id}: it is {status}")


class ScheduleError(CeleryExtError):
    """A problem with one periodic schedule."""


class InvalidScheduleError(ScheduleError):
    def __init__(self, message: str, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"invalid schedule: {field + ': ' if field else ''}{message}")


class ScheduleNotFoundError(ScheduleError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no schedule named {name!r}")


class StorageError(CeleryExtError):
    """The task store failed; the message says which store (password redacted)."""


class PublishError(CeleryExtError):
    def __init__(self, task_id: str, cause: BaseException) -> None:
        self.task_id = task_id
        super().__init__(f"task {task_id} is recorded as pending but could not be published: {cause}")


class TaskWaitTimeoutError(CeleryExtError):
    def __init__(self, task_id: str, timeout: float, status: str) -> None:
        self.task_id = task_id
        self.status = status
        super().__init__(f"task {task_id} still {status} after {timeout:g}s")


class ExecutorError(CeleryExtError):
    """An executor's failure with a machine-readable ``reason`` code."""

    retryable = True

    def __init__(self, reason: str, message: str, *, data: object = None) -> None:
        self.reason = reason
        self.data = data
        super().__init__(message)


class PermanentError(ExecutorError):
    retryable = False


class TransientError(ExecutorError):
    retryable = True


class TaskFailed(Exception):  # noqa: N818 - named for what Celery users read in Flower
    """A celery_ext task ended failed or dead; ``str()`` is ``"<reason>: <message>"``.

    Its only argument is that string, so Celery's JSON exception encoding carries it whole.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        reason, sep, message = text.partition(": ")
        self.reason = reason if sep else "exception"
        self.message = message if sep else text

    @classmethod
    def of(cls, reason: str, message: str) -> TaskFailed:
        return cls(f"{reason}: {message}")
