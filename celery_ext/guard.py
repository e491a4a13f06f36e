"""No message can stop or wedge a worker: the guard in front of Celery's task handling.

Celery parses a task message in the worker's *main process* (``celery.worker.strategy`` builds a
``Request`` from its headers and body) and billiard pickles the request to hand it to a pool
process.  A message that breaks either step used to break the worker:

- a payload nested ~600 levels deep: ``RecursionError`` while pickling, "Unrecoverable error", the
  message restored, every restarted worker on that queue dying again;
- ``headers.timelimit = ["abc", "def"]``: ``ValueError`` in the pool's timer, the same loop;
- a body of ``[1]``: ``ValueError`` while unpacking it, after kombu had counted the message as
  delivered: it is never acknowledged, and a few of them take every prefetch slot (the worker
  looks alive and never takes another task).

``GuardedConsumer`` (the app's ``worker_consumer``) checks every task message before Celery
sees it (``problem_of``): headers, body, Celery's fields (``id``, ``task``, ``timelimit``,
``eta``, ``expires``, ``retries``, canvas ids), celery_ext's header, and the arguments by the
limits of ``celery_ext/validation.py``.  Anything that still raises while Celery handles the
message, or while the pool takes the request, is caught too.  A message that cannot be run is

1. **acknowledged** (never redelivered),
2. **dead-lettered**: pushed, with the reason, onto the Redis list ``<app.name>.dead_letter`` (the
   newest ``DEAD_LETTER_MAX`` are kept) on the worker registry's Redis (``scheduler.registry_url``,
   else a Redis broker); each entry is a JSON object ``{"reason", "worker", "time", "queue",
   "task", "id", "message": {"headers", "properties", "content-type", "content-encoding", "body",
   "body_encoding"}}`` holding the raw message (its body as received: text, or base64 when it is
   not UTF-8; cut at ``DEAD_LETTER_BODY``, 1 MiB, with ``"truncated": true``),
3. **recorded** when its id can be a record's: a celery_ext task type's record ends ``failed`` with
   reason ``malformed_message`` (a submitted task whose message carries a valid celery_ext header
   claims its record first; a plain message gets a record, its payload kept only if valid),
4. **counted** (``celery_ext_messages_rejected{reason="malformed"}``) and **logged** with the
   reason (``malformed message <id> for <task> dead-lettered to <list>: <reason>``),

and the worker goes on at full capacity.
"""

from __future__ import annotations

import base64
import json
import logging
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

from celery.utils.saferepr import saferepr
from celery.utils.time import maybe_iso8601, maybe_make_aware
from celery.worker.consumer import Consumer
from celery.worker.state import task_ready

from celery_ext.message import ExtHeader, MalformedMessageError, plain_token
from celery_ext.model import STARTABLE, Task, TaskErrorInfo, utcnow
from celery_ext.runtime import Runtime, runtime_of
from celery_ext.task import ExecutorTask
from celery_ext.validation import (
    MAX_ID_LENGTH,
    MAX_RETRIES,
    MAX_TIMEOUT,
    MESSAGE_DEPTH,
    ValueProblem,
    check_json,
    depth_within,
    storable_id,
    text_problem,
)

logger = logging.getLogger("celery_ext.guard")

#: The dead-letter list keeps the newest entries, each with at most ``DEAD_LETTER_BODY`` bytes of
#: the message's body (``"truncated": true`` beyond), so a flood of poison cannot fill Redis.
DEAD_LETTER_MAX = 1000
DEAD_LETTER_BODY = 1024 * 1024
#: A time limit in a message header may be at most this (the soft limit's bound, plus a hard
#: limit's grace).
MAX_TIME_LIMIT = 2 * MAX_TIMEOUT
REASON = "malformed_message"


def dead_letter_list(app_name: str) -> str:
    return f"{app_name}.dead_letter"


class Malformed(Exception):
    """Why a message cannot be run; ``header`` and ``kwargs``/``args`` are what was usable."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Reading:
    """What the guard read of one message."""

    __slots__ = ("name", "task_id", "header", "header_problem", "kwargs", "args", "fields", "ours")

    def __init__(self) -> None:
        self.name: str | None = None
        self.task_id: str | None = None
        self.header: ExtHeader | None = None
        self.header_problem: str | None = None
        self.kwargs: dict[str, Any] | None = None  # only once they passed the payload checks
        self.args: list[Any] | None = None
        self.fields: Mapping[str, Any] = {}
        self.ours = False  # a celery_ext task type (recorded)


def problem_of(message: Any, tasks: Mapping[str, Any], payload_depth: int, seen: Reading) -> str | None:
    """Why ``message`` cannot be run, or None; fills ``seen`` with what it could read."""
    try:
        _inspect(message, tasks, payload_depth, seen)
    except Malformed as exc:
        return exc.reason
    return None


def _inspect(message: Any, tasks: Mapping[str, Any], payload_depth: int, seen: Reading) -> None:
    headers = message.headers
    if not isinstance(headers, Mapping):
        raise Malformed(f"headers: expected an object (got {type(headers).__name__})")
    _name_and_id(headers, tasks, seen)  # known early: a message whose body is bad is still recorded
    if not depth_within(headers, MESSAGE_DEPTH):
        raise Malformed(f"headers: nested deeper than {MESSAGE_DEPTH} levels")
    fields, args, kwargs, embed = _parts(message, headers)
    seen.fields = fields
    _fields(fields, tasks, seen)
    if seen.header_problem is not None:
        raise Malformed(seen.header_problem)
    _embed(embed)
    if not isinstance(args, list | tuple):
        raise Malformed(f"args: expected a list (got {type(args).__name__})")
    if not isinstance(kwargs, Mapping):
        raise Malformed(f"kwargs: expected an object (got {type(kwargs).__name__})")
    if not seen.ours:  # not recorded: only what Celery itself needs
        if not depth_within(args, MESSAGE_DEPTH) or not depth_within(kwargs, MESSAGE_DEPTH):
            raise Malformed(f"arguments: nested deeper than {MESSAGE_DEPTH} levels")
        return
    # The arguments of a celery_ext task become its record: the limits of a submitted payload.
    try:
        check_json(kwargs, "kwargs", payload_depth)
        seen.kwargs = dict(kwargs)
        for i, arg in enumerate(args):
            check_json(arg, f"args[{i}]", payload_depth)
        seen.args = list(args)
    except ValueProblem as exc:
        raise Malformed(str(exc)) from None


def _parts(message: Any, headers: Mapping[str, Any]) -> tuple[Mapping[str, Any], Any, Any, Any]:
    """Celery's fields, args, kwargs and embed of a message, by protocol."""
    try:
        body = message.decode()  # kombu keeps it: Celery's Request reads the same object
    except Exception as exc:  # noqa: BLE001 - DecodeError, ContentDisallowed, anything a codec raises
        raise Malformed(f"body: cannot be decoded ({exc.__class__.__name__}: {_short(exc)})") from None
    if "task" in headers and not (isinstance(body, Mapping) and "args" in body):
        # Protocol 2: Celery's fields in the headers, [args, kwargs, embed] the body.
        if not isinstance(body, list | tuple) or len(body) != 3:
            raise Malformed(f"body: expected [args, kwargs, embed] (got {_short(body)})")
        return headers, body[0], body[1], body[2]
    # Protocol 1 (or Celery's "hybrid"): the fields and arguments in a body object.
    if not isinstance(body, Mapping):
        raise Malformed(f"body: expected [args, kwargs, embed] or an object (got {_short(body)})")
    if not depth_within(body, MESSAGE_DEPTH):
        raise Malformed(f"body: nested deeper than {MESSAGE_DEPTH} levels")
    return {**body, **headers}, body.get("args", ()), body.get("kwargs", {}), None


def _name_and_id(headers: Mapping[str, Any], tasks: Mapping[str, Any], seen: Reading) -> None:
    name, task_id = headers.get("task"), headers.get("id")
    if isinstance(name, str) and not text_problem(name):
        seen.name = name
        seen.ours = isinstance(tasks.get(name), ExecutorTask)
        if storable_id(task_id, MAX_ID_LENGTH if seen.ours else 255):
            seen.task_id = task_id
    # Parsed once: a valid celery_ext header also names the record to fail.
    try:
        seen.header = ExtHeader.parse(headers)
    except MalformedMessageError as exc:
        seen.header_problem = str(exc)


def _fields(fields: Mapping[str, Any], tasks: Mapping[str, Any], seen: Reading) -> None:
    """Celery's own fields: what Celery parses in the worker's main process."""
    name = fields.get("task")
    if not isinstance(name, str) or not name or text_problem(name):
        raise Malformed(f"task: expected a task name (got {_short(name)})")
    seen.name = name
    seen.ours = isinstance(tasks.get(name), ExecutorTask)
    id_length = MAX_ID_LENGTH if seen.ours else 255  # a celery_ext task id is its record's key
    task_id = fields.get("id")
    if not storable_id(task_id, id_length):
        raise Malformed(f"id: expected a string of 1..{id_length} characters without NUL (got {_short(task_id)})")
    seen.task_id = task_id
    for key in ("root_id", "parent_id", "group"):
        value = fields.get(key)
        if value is not None and not storable_id(value, id_length):
            raise Malformed(f"{key}: expected null or a string of 1..{id_length} characters (got {_short(value)})")
    retries = fields.get("retries")
    if retries is not None and (
        not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries <= MAX_RETRIES
    ):
        raise Malformed(f"retries: expected an integer 0..{MAX_RETRIES} (got {_short(retries)})")
    _time_limits(fields.get("timelimit"))
    for key in ("eta", "expires"):
        _time(key, fields.get(key))


def _embed(embed: Any) -> None:
    if embed is None:
        return
    if not isinstance(embed, Mapping):
        raise Malformed(f"embed: expected an object or null (got {type(embed).__name__})")
    if not depth_within(embed, MESSAGE_DEPTH):
        raise Malformed(f"embed: nested deeper than {MESSAGE_DEPTH} levels")
    for key in ("callbacks", "errbacks", "chain"):
        value = embed.get(key)
        if value is not None and not isinstance(value, list | tuple):
            raise Malformed(f"embed.{key}: expected a list or null (got {type(value).__name__})")
    chord = embed.get("chord")
    if chord is not None and not isinstance(chord, Mapping):
        raise Malformed(f"embed.chord: expected an object or null (got {type(chord).__name__})")


def _time_limits(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise Malformed(f"timelimit: expected [hard, soft] (got {_short(value)})")
    for limit in value:
        if limit is None:
            continue
        if not isinstance(limit, int | float) or isinstance(limit, bool) or not 0 <= limit <= MAX_TIME_LIMIT:
            raise Malformed(
                f"timelimit: expected null or a number of seconds 0..{MAX_TIME_LIMIT:.0f} (got {_short(value)})"
            )


def _time(key: str, value: Any) -> None:
    if value is None:
        return
    try:
        parsed = maybe_iso8601(value)
        if parsed is not None:
            maybe_make_aware(parsed).timestamp()
    except Exception:  # noqa: BLE001 - ValueError, TypeError, OverflowError, OSError...
        raise Malformed(f"{key}: expected an ISO 8601 time (got {_short(value)})") from None


def _short(value: Any) -> str:
    return saferepr(value, maxlen=80)


class MessageGuard:
    """Dead-letters, acknowledges, records and counts the messages a worker cannot run."""

    def __init__(self, app: Any, hostname: str) -> None:
        self.app = app
        self.rt: Runtime = runtime_of(app)
        self.hostname = hostname
        self.list_name = dead_letter_list(self.rt.config.app.name)
        self.payload_depth = self.rt.config.app.max_payload_depth
        self._records: queue.Queue[Callable[[], None]] = queue.Queue(maxsize=1000)
        self._writer: threading.Thread | None = None

    def check(self, message: Any) -> tuple[str | None, Reading]:
        seen = Reading()
        return problem_of(message, self.app.tasks, self.payload_depth, seen), seen

    def reject(self, message: Any, reason: str, seen: Reading, ack: Callable[[], None] | None = None) -> None:
        """Dead-letter ``message``, acknowledge it, record and count it; never raises."""
        name = seen.name or "?"
        logger.error(
            "malformed message %s for %s dead-lettered to %s: %s",
            seen.task_id or "(no id)",
            name,
            self.list_name,
            reason,
        )
        self._dead_letter(message, reason, seen)
        try:
            if ack is not None:
                ack()
            elif not message.acknowledged:
                message.ack()
        except Exception:  # noqa: BLE001 - a lost connection: the broker redelivers it, and we refuse it again
            logger.exception("could not acknowledge malformed message %s", seen.task_id)
        try:
            self.rt.metrics.message_rejected(name, "malformed")
        except Exception:  # noqa: BLE001
            logger.exception("could not count malformed message %s", seen.task_id)
        if seen.ours and seen.task_id is not None:
            self._record_later(seen, reason)

    # --- the dead-letter list --------------------------------------------------------------

    def _dead_letter(self, message: Any, reason: str, seen: Reading) -> None:
        try:
            client = self._client()
            if client is None:
                logger.warning(
                    "no Redis for the dead-letter list (set scheduler.registry_url); "
                    "malformed message %s is only logged: %s",
                    seen.task_id,
                    _raw(message)[:2000],
                )
                return
            entry = json.dumps(
                {
                    "reason": reason,
                    "worker": self.hostname,
                    "time": utcnow().isoformat(),
                    "queue": (getattr(message, "delivery_info", None) or {}).get("routing_key"),
                    "task": seen.name,
                    "id": seen.task_id,
                    "message": _envelope(message),
                }
            )
            pipe = client.pipeline()
            pipe.lpush(self.list_name, entry)
            pipe.ltrim(self.list_name, 0, DEAD_LETTER_MAX - 1)
            pipe.execute()
        except Exception:  # noqa: BLE001 - the log line above is what is left
            logger.exception("could not dead-letter malformed message %s: %s", seen.task_id, _raw(message)[:2000])

    def _client(self) -> Any:
        """The worker registry's Redis, where the dead-letter list lives (None: no registry)."""
        return self.rt.registry.client if self.rt.registry is not None else None

    # --- the record --------------------------------------------------------------------------

    def _record_later(self, seen: Reading, reason: str) -> None:
        """Writes happen on a thread of their own: the event loop must not wait for the store."""
        if self._writer is None or not self._writer.is_alive():
            self._writer = threading.Thread(target=self._write_loop, name="celery_ext-dead-letter", daemon=True)
            self._writer.start()
        try:
            self._records.put_nowait(lambda: self._record(seen, reason))
        except queue.Full:
            logger.error(
                "too many malformed messages at once: task %s is not recorded (it is dead-lettered)", seen.task_id
            )

    def _write_loop(self) -> None:
        while True:
            write = self._records.get()
            try:
                write()
            except Exception:  # noqa: BLE001 - the message is dead-lettered; the record is a courtesy
                logger.exception("could not record a malformed message")

    def _record(self, seen: Reading, reason: str) -> None:
        rt, task_id, name = self.rt, seen.task_id or "", seen.name or ""
        error = TaskErrorInfo(REASON, reason[:2000])
        record = rt.storage.tasks.get(task_id)
        h = seen.header
        if h is not None:
            # A submitted task: fail its record, if this message is the one it waits for.
            if record is None or record.status not in STARTABLE:
                return
            running = rt.lifecycle.claim(
                record.replace(attempt=h.attempt), h.token, self.hostname, rt.runner.lease(record), h.queued_at
            )
        else:
            if record is not None:
                return  # a redelivery of a plain message already recorded: leave that record be
            parent, root, group = (
                value if storable_id(value) else None
                for value in (seen.fields.get("parent_id"), seen.fields.get("root_id"), seen.fields.get("group"))
            )
            task = Task(
                task_id=task_id,
                task_type=name,
                payload=seen.kwargs or {},
                args=seen.args or None,
                attempt=1,
                worker_id=self.hostname,
                created_at=utcnow(),
                dispatch_token=plain_token(rt.runner.incarnation, task_id),
                parent_id=parent if parent != task_id else None,
                root_id=root,
                group_id=group,
            )
            running = rt.lifecycle.received(task, rt.runner.lease(task))
        if running is not None:
            rt.lifecycle.fail(running, error)


def _envelope(message: Any) -> dict[str, Any]:
    body = message.body
    raw = body if isinstance(body, bytes) else str(body).encode("utf-8", "surrogatepass")
    truncated = len(raw) > DEAD_LETTER_BODY
    raw = raw[:DEAD_LETTER_BODY]
    try:
        text, encoding = raw.decode("utf-8"), None
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(raw).decode(), "base64"
    headers = message.headers
    try:
        # Strict JSON; deep or odd headers are kept as their (bounded) repr.
        json.dumps(headers, allow_nan=False)
        shown: Any = headers
    except Exception:  # noqa: BLE001 - RecursionError, ValueError, TypeError
        shown = {"repr": saferepr(headers, maxlen=20000)}
    return {
        "headers": shown,
        "properties": _plain(getattr(message, "properties", None)),
        "content-type": message.content_type,
        "content-encoding": message.content_encoding,
        "body": text,
        "body_encoding": encoding,
        **({"truncated": True} if truncated else {}),
    }


def _plain(value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=False)
        return value
    except Exception:  # noqa: BLE001
        return saferepr(value, maxlen=2000)


def _raw(message: Any) -> str:
    try:
        return f"headers={saferepr(message.headers, maxlen=1000)} body={saferepr(message.body, maxlen=1000)}"
    except Exception:  # noqa: BLE001
        return "(unreadable)"


class GuardedConsumer(Consumer):
    """Celery's consumer, with every task message checked before Celery handles it and every
    failure to hand a request to the pool caught (see the module's doc)."""

    def __init__(self, on_task_request: Any, **kwargs: Any) -> None:
        super().__init__(on_task_request, **kwargs)
        self.guard = MessageGuard(self.app, self.hostname)
        controller = kwargs.get("controller")
        if controller is not None and hasattr(controller, "_process_task"):
            self._guard_pool_handoff(controller)

    def _guard_pool_handoff(self, worker: Any) -> None:
        """The pool takes a request in ``worker._process_task``: at once, or later from the
        semaphore's release when every pool process is busy (then an error there would surface in
        another task's completion).  Catch it there and give back the slot it held."""
        original = worker._process_task
        uses_semaphore = (
            getattr(worker, "semaphore", None) is not None
            and getattr(worker.process_task, "__name__", "") == "_process_task_sem"
        )

        def process_task(req: Any) -> None:
            try:
                original(req)
            except Exception as exc:  # noqa: BLE001 - TaskRevokedError is handled inside original
                self._handoff_failed(worker, req, exc, uses_semaphore)

        worker._process_task = process_task

    def _handoff_failed(self, worker: Any, req: Any, exc: Exception, release: bool) -> None:
        try:
            cache = getattr(getattr(worker.pool, "_pool", None), "_cache", None) or {}
            for job, result in list(cache.items()):
                if getattr(result, "correlation_id", None) == req.id and not getattr(result, "_accepted", True):
                    cache.pop(job, None)  # never sent to a process: it must not wait for one
            task_ready(req)
        except Exception:  # noqa: BLE001
            logger.exception("could not clean up after request %s", getattr(req, "id", "?"))
        seen = Reading()
        problem_of(req.message, self.app.tasks, self.guard.payload_depth, seen)
        seen.task_id, seen.name = getattr(req, "id", None), getattr(req, "name", None)
        self.guard.reject(
            req.message,
            f"the pool could not take it: {exc.__class__.__name__}: {_short(exc)}",
            seen,
            ack=req.acknowledge,
        )
        if release:
            worker._quick_release()

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        handle = super().create_task_handler(*args, **kwargs)
        guard = self.guard
        recoverable = tuple(getattr(self, "connection_errors", ())) + tuple(getattr(self, "channel_errors", ()))

        def on_task_received(message: Any) -> Any:
            try:
                reason, seen = guard.check(message)
            except Exception as exc:  # noqa: BLE001 - the check itself must not be what breaks
                reason, seen = f"{exc.__class__.__name__}: {_short(exc)}", Reading()
            if reason is not None:
                guard.reject(message, reason, seen)
                return None
            try:
                return handle(message)
            except recoverable:
                raise  # the broker connection: Celery's consumer reconnects
            except Exception as exc:  # noqa: BLE001 - anything else would leave it unacknowledged
                logger.exception("task message %s could not be handled", seen.task_id)
                guard.reject(message, f"{exc.__class__.__name__}: {_short(exc)}", seen)
                return None

        return on_task_received
