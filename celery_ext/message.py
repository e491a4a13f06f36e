"""The one place that defines what celery_ext adds to a Celery message.

A celery_ext message is a plain Celery (protocol 2) message: ``kwargs`` is the task's payload and
``args`` its positional arguments (a chain passes the previous step's result there).  What
celery_ext needs besides travels in one message header, ``celery_ext``::

    {"v": 1, "token": "<dispatch token>", "attempt": 1, "run": 1, "max_retries": 3,
     "queued_at": "<ISO 8601>", "idempotency_key": "<key>" | null}

It says "a record exists; claim it with this token".  A message without it (``send_task`` from a
plain Celery producer, ``celery call``, ``.delay()``, a canvas step) is recorded on receipt.
Every producer builds the header with ``ExtHeader.to_header`` and the worker reads it with
``ExtHeader.parse``, which refuses anything malformed with a message naming the field.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

HEADER = "celery_ext"
VERSION = 1


class MalformedMessageError(ValueError):
    """A message whose celery_ext header, arguments or limits cannot be used."""


@dataclass(frozen=True, slots=True)
class ExtHeader:
    token: str
    attempt: int
    run: int = 1
    max_retries: int = 0
    queued_at: datetime | None = None
    idempotency_key: str | None = None

    def to_header(self) -> dict[str, Any]:
        return {
            HEADER: {
                "v": VERSION,
                "token": self.token,
                "attempt": self.attempt,
                "run": self.run,
                "max_retries": self.max_retries,
                "queued_at": self.queued_at.isoformat() if self.queued_at else None,
                "idempotency_key": self.idempotency_key,
            }
        }

    @classmethod
    def parse(cls, headers: Mapping[str, Any] | None) -> ExtHeader | None:
        """The header of a message (``None`` when it has none: a plain Celery message)."""
        raw = (headers or {}).get(HEADER)
        if raw is None:
            return None
        if not isinstance(raw, Mapping):
            raise MalformedMessageError(f"header {HEADER}: expected an object (got {type(raw).__name__})")
        problems = []
        if raw.get("v") != VERSION:
            problems.append(f"v: expected {VERSION} (got {raw.get('v')!r})")
        token = raw.get("token")
        if not isinstance(token, str) or not token:
            problems.append(f"token: expected a non-empty string (got {type(token).__name__})")
        for name, low in (("attempt", 1), ("run", 1), ("max_retries", 0)):
            value = raw.get(name, low)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                problems.append(f"{name}: expected an integer >= {low} (got {value!r})")
        queued_at = None
        if raw.get("queued_at") is not None:
            try:
                queued_at = datetime.fromisoformat(raw["queued_at"])
                if queued_at.tzinfo is None:
                    raise ValueError("no time zone")
            except (TypeError, ValueError) as exc:
                problems.append(f"queued_at: expected an ISO 8601 time with zone ({exc})")
        idem = raw.get("idempotency_key")
        if idem is not None and not isinstance(idem, str):
            problems.append(f"idempotency_key: expected a string (got {type(idem).__name__})")
        if problems or not isinstance(token, str):
            raise MalformedMessageError(f"header {HEADER}: " + "; ".join(problems))
        return cls(token, raw.get("attempt", 1), raw.get("run", 1), raw.get("max_retries", 0), queued_at, idem)


def check_call(args: Any, kwargs: Any) -> tuple[list[Any], dict[str, Any]]:
    """A message's positional and keyword arguments as celery_ext records them."""
    if not isinstance(kwargs, Mapping):
        raise MalformedMessageError(f"kwargs: expected an object (got {type(kwargs).__name__})")
    if not isinstance(args, list | tuple):
        raise MalformedMessageError(f"args: expected a list (got {type(args).__name__})")
    return list(args), dict(kwargs)


def soft_limit(timelimit: Any) -> float | None:
    """The soft time limit from Celery's ``timelimit`` header, ``(hard, soft)``, if it is sane."""
    if not isinstance(timelimit, list | tuple) or len(timelimit) != 2:
        return None
    hard, soft = timelimit
    for value in (soft, hard):
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
            return float(value)
    return None


def new_incarnation() -> str:
    """A name for this worker process, unique across restarts under the same worker name."""
    return f"{socket.gethostname()}:{os.getpid()}:{int(time.time() * 1000)}"


def plain_token(incarnation: str, task_id: str) -> str:
    """The dispatch token of a plain Celery message's run (one without the header) on the worker
    process ``incarnation``: a redelivery to another worker process is another run."""
    return f"{incarnation}:{task_id}"
