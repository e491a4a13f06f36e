"""Limits on what celery_ext accepts, and the checks that enforce them.

Used at the edge (``TaskManager`` before anything is written, so the CLI and the REST API answer a
client's mistake with exit 2 / 400 naming the field) and by the worker's message guard
(``celery_ext/guard.py``) for messages that never went through the edge (a plain Celery producer,
a tampered or truncated message).  The limits:

- a payload (and each positional argument of a message) is JSON: objects, arrays, strings, finite
  numbers, integers within the signed 64-bit range, booleans and null, nested at most
  ``app.max_payload_depth`` levels (default 32; ``{}`` is one level), at most
  ``app.max_payload_bytes`` encoded;
- strings (values and keys, task types, idempotency keys, ids) hold no NUL character and no lone
  UTF-16 surrogate (neither can be stored: PostgreSQL refuses NUL, UTF-8 has no surrogates);
- ``timeout`` a finite number of seconds > 0 and <= ``MAX_TIMEOUT`` (366 days);
  ``delay`` a finite number >= 0 and <= ``MAX_DELAY`` (3,660 days, about ten years), and a
  ``run_at`` no later than that from now; ``max_retries`` an integer 0..``MAX_RETRIES`` (10,000);
  ``priority`` an integer 0..9; an idempotency key 1..255 characters;
- task ids (and parent, root and group ids) are at most 64 characters (the records' key).

``renderable`` is the other side: a record read back is made JSON-ready whatever it holds (a
record written before these checks existed), so listing tasks never fails on one bad record.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from celery_ext.cursor import decode_cursor
from celery_ext.errors import CeleryExtError, InvalidPayloadError

if TYPE_CHECKING:
    from celery_ext.model import TaskFilter

DEFAULT_MAX_DEPTH = 32
#: The most ``app.max_payload_depth`` may be set to; the rest of a message (headers, canvas
#: signatures) may nest ``MESSAGE_DEPTH``.  Both stay far below the ~1,000 levels at which Python's
#: pickle (the worker's pool) and json give up with RecursionError.
MAX_DEPTH_SETTING = 100
MESSAGE_DEPTH = 200
MAX_TIMEOUT = 366 * 86400.0
MAX_DELAY = 3660 * 86400.0
MAX_RETRIES = 10_000
MAX_KEY_LENGTH = 255
MAX_ID_LENGTH = 64
MAX_CURSOR_LENGTH = 1024
#: Deeper parts of a record are shown as a marker string (``renderable``).
RENDER_DEPTH = 64
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class ValueProblem(ValueError):
    """What is wrong with a JSON value, and where (``path``: ``a.b[2]``)."""

    def __init__(self, path: str, message: str) -> None:
        path = path if len(path) <= 200 else path[:197] + "..."
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored as text, or None."""
    if "\x00" in value:
        return "contains a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"contains a lone surrogate {value[exc.start]!r} at {exc.start}"
    return None


def check_json(value: Any, path: str, max_depth: int) -> None:
    """Raise ``ValueProblem`` naming the first part of ``value`` that is not storable JSON within
    ``max_depth`` levels (``{}`` and ``[]`` are one level; a scalar none).  Types json cannot encode
    at all are left to ``json.dumps`` (the caller's error names them)."""
    if not _fine(value, max_depth):  # the fast pass; the slow one finds and names the problem
        _walk(value, path, max_depth, (path, max_depth))


def encode_within(value: Any, path: str, max_depth: int, max_bytes: int) -> str:
    """``value`` as compact JSON, if it is storable JSON within ``max_depth`` levels and
    ``max_bytes`` encoded (``app.max_payload_depth`` / ``app.max_payload_bytes``); otherwise
    ``ValueProblem`` naming what is wrong, at ``path``."""
    # Depth first: it also stops a self-referencing object before json recurses into it.
    check_json(value, path, max_depth)
    try:
        encoded = json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueProblem(path, f"not JSON-serializable: {exc}") from exc
    size = len(encoded.encode())
    if size > max_bytes:
        raise ValueProblem(path, f"{size} bytes exceeds app.max_payload_bytes ({max_bytes})")
    return encoded


def _fine(value: Any, depth_left: int) -> bool:
    """Whether ``value`` is surely storable JSON within ``depth_left`` levels (False: look closer).
    Dispatches on exact types and makes no call per scalar: the worker runs it on every message."""
    kind = type(value)
    if kind is dict:
        if depth_left <= 0:
            return False
        for key in value:
            if type(key) is not str or "\x00" in key or not key.isascii():
                return False
        items: Any = value.values()
    elif kind is list or kind is tuple:
        if depth_left <= 0:
            return False
        items = value
    else:
        return _scalar_problem(value) is None and not isinstance(value, Mapping | list | tuple)
    return _items_fine(items, depth_left)


def _items_fine(items: Any, depth_left: int) -> bool:
    for item in items:
        kind = type(item)
        if kind is str:
            if "\x00" in item or (not item.isascii() and text_problem(item) is not None):
                return False
        elif kind is int:
            if not INT64_MIN <= item <= INT64_MAX:
                return False
        elif kind is float:
            if item - item != 0.0:  # NaN or an infinity
                return False
        elif kind is bool or item is None:
            continue
        elif not _fine(item, depth_left - 1):
            return False
    return True


def _scalar_problem(value: Any) -> str | None:
    """What is wrong with a JSON scalar (a string, number, boolean or null), or None."""
    kind = type(value)
    if kind is str or (kind is not bool and isinstance(value, str)):
        return text_problem(value)
    if kind is bool or value is None:
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"must be a finite number (got {value!r})"
    if isinstance(value, int):
        return None if INT64_MIN <= value <= INT64_MAX else "integer out of the signed 64-bit range"
    return None


def _walk(value: Any, path: str, depth_left: int, limit: tuple[str, int]) -> None:
    if isinstance(value, Mapping):
        if depth_left <= 0:
            raise ValueProblem(limit[0], f"nested deeper than {limit[1]} levels")
        for key, item in value.items():
            if isinstance(key, str):
                problem = text_problem(key)
                if problem:
                    shown = repr(key) if len(key) <= 60 else repr(key[:57]) + "..."
                    raise ValueProblem(path, f"key {shown} {problem}")
            _walk(item, f"{path}.{key}" if path else str(key), depth_left - 1, limit)
    elif isinstance(value, list | tuple):
        if depth_left <= 0:
            raise ValueProblem(limit[0], f"nested deeper than {limit[1]} levels")
        for i, item in enumerate(value):
            _walk(item, f"{path}[{i}]", depth_left - 1, limit)
    else:
        problem = _scalar_problem(value)
        if problem:
            raise ValueProblem(path, problem)


def depth_within(value: Any, max_depth: int) -> bool:
    """Whether ``value`` nests at most ``max_depth`` levels (nothing else is checked)."""
    kind = type(value)
    if kind is dict:
        items: Any = value.values()
    elif kind is list or kind is tuple:
        items = value
    elif isinstance(value, Mapping):
        items = value.values()
    elif isinstance(value, list | tuple):
        items = value
    else:
        return True
    if max_depth <= 0:
        return False
    for item in items:
        kind = type(item)
        if kind is str or kind is int or kind is float or kind is bool or item is None:
            continue
        if not depth_within(item, max_depth - 1):
            return False
    return True


# --- submit arguments --------------------------------------------------------------------------


def check_number(
    value: Any, field: str, *, low: float, high: float, integer: bool = False, strict_low: bool = False, unit: str = ""
) -> None:
    """A finite number (an integer when ``integer``) within [low, high] ((low, high] when
    ``strict_low``); ``InvalidPayloadError`` naming ``field`` otherwise."""
    noun = "an integer" if integer else "a number"
    bounds = f"{'>' if strict_low else '>='} {_num(low)} and <= {_num(high)}{unit}"
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        raise InvalidPayloadError(f"must be {noun} {bounds} (got {type(value).__name__})", field=field)
    number: float = value
    finite = isinstance(number, int) or math.isfinite(number)  # (a huge int cannot become a float)
    if not finite or number < low or (strict_low and number == low) or number > high:
        got = repr(value)
        raise InvalidPayloadError(
            f"must be {noun} {bounds} (got {got if len(got) <= 40 else got[:37] + '...'})", field=field
        )


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def check_key(value: Any, field: str, max_length: int = MAX_KEY_LENGTH) -> None:
    """A non-empty string of at most ``max_length`` characters that can be stored."""
    if not isinstance(value, str):
        raise InvalidPayloadError(f"must be a string (got {type(value).__name__})", field=field)
    if not 1 <= len(value) <= max_length:
        raise InvalidPayloadError(f"must have 1..{max_length} characters (got {len(value)})", field=field)
    problem = text_problem(value)
    if problem:
        raise InvalidPayloadError(problem, field=field)


def storable_id(value: Any, max_length: int = MAX_ID_LENGTH) -> bool:
    """Whether ``value`` can be a record's id (a task id, parent, root or group id)."""
    return isinstance(value, str) and 1 <= len(value) <= max_length and text_problem(value) is None


def check_filter(flt: TaskFilter) -> None:
    """A ``TaskFilter`` the store can run: strings it can hold, a sane limit and offset, and a
    cursor that is one ``list`` returned (``InvalidPayloadError`` naming the field otherwise)."""
    for task_type in flt.task_type:
        check_key(task_type, "type", 128)
    for name in ("worker_id", "root_id", "parent_id", "group_id"):
        value = getattr(flt, name)
        if value is not None:
            check_key(value, name.removesuffix("_id") if name == "worker_id" else name)
    check_number(flt.limit, "limit", low=1, high=INT64_MAX, integer=True)
    check_number(flt.offset, "offset", low=0, high=INT64_MAX, integer=True)
    for name in ("created_after", "created_before"):
        value = getattr(flt, name)
        if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
            raise InvalidPayloadError("must be a timezone-aware datetime", field=name)
    if flt.cursor is not None:
        if not isinstance(flt.cursor, str) or len(flt.cursor) > MAX_CURSOR_LENGTH:
            raise InvalidPayloadError("not a next_cursor that list returned", field="cursor")
        try:
            at, last_id = decode_cursor(flt.cursor)
        except CeleryExtError:
            raise InvalidPayloadError("not a next_cursor that list returned", field="cursor") from None
        if at.tzinfo is None or not storable_id(last_id, MAX_KEY_LENGTH):
            raise InvalidPayloadError("not a next_cursor that list returned", field="cursor")


# --- reading records back ----------------------------------------------------------------------


def renderable(value: Any, depth: int = RENDER_DEPTH) -> Any:
    """A JSON-ready copy of a stored value: non-finite numbers become the strings ``"NaN"``,
    ``"Infinity"``, ``"-Infinity"``; lone surrogates become U+FFFD; anything nested deeper than
    ``depth`` levels is replaced by a string saying so.  Valid JSON comes back equal."""
    kind = type(value)
    if kind is str:
        return _clean_text(value)
    if kind is float:
        return (
            value
            if math.isfinite(value)
            else ("NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity")
        )
    if kind is int or kind is bool or value is None:
        return value
    if isinstance(value, Mapping):
        if depth <= 0:
            return f"<nested deeper than {RENDER_DEPTH} levels: not shown>"
        return {_clean_text(k) if isinstance(k, str) else k: renderable(v, depth - 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        if depth <= 0:
            return f"<nested deeper than {RENDER_DEPTH} levels: not shown>"
        return [renderable(v, depth - 1) for v in value]
    if isinstance(value, float):
        return renderable(float(value), depth)
    return value


def _clean_text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in value)
    return value
