"""Handing back the work an offline worker left behind (Redis broker).

``move_stranded`` moves every message waiting in a worker's direct queue to the shared queue of
its task type, one atomic ``LMOVE`` per message (no loss, no duplicate), keeping its priority
sub-queue and its place ahead of newer work.  It also returns the messages the worker had
fetched but not acknowledged (kombu's ``unacked`` hash) when they came from that direct queue,
instead of leaving them for kombu's visibility timeout.  A message of a type not known here goes
to Celery's default queue (``celery``), which every worker consumes and forwards from.  The
scheduler calls this for each worker ``sweep_offline`` reports; a worker's warm shutdown calls it
for its own queue.

Transport options honoured: ``sep``, ``priority_steps``, ``global_keyprefix``, ``unacked_key``.
"""

from __future__ import annotations

import bisect
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

logger = logging.getLogger("celery_ext.routing")

KOMBU_SEP = "\x06\x16"
KOMBU_STEPS = (0, 3, 6, 9)

# ARGV: prefix, default queue, batch, n_steps, <sub-queue suffixes...>, <known types...>
# KEYS: the direct queue's sub-queues, in the order of the suffixes
_MOVE = """
local prefix, default, batch, nsteps = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local known = {}
for i = 5 + nsteps, #ARGV do known[ARGV[i]] = true end
local moved = 0
for k = 1, #KEYS do
  local suffix = ARGV[4 + k]
  while moved < batch do
    local raw = redis.call('LINDEX', KEYS[k], 0)
    if not raw then break end
    local ok, msg = pcall(cjson.decode, raw)
    local task = ok and type(msg) == 'table' and type(msg.headers) == 'table' and msg.headers.task
    local base = default
    if type(task) == 'string' and known[task] then base = prefix .. '.' .. task end
    -- LEFT (newest) to RIGHT (next consumed): the oldest ends up first in line, in order.
    redis.call('LMOVE', KEYS[k], base .. suffix, 'LEFT', 'RIGHT')
    moved = moved + 1
  end
end
return moved
"""

# KEYS: unacked hash, unacked index, destination  ARGV: tag, raw entry as read, message
_RESTORE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[3])
return 1
"""


def _options(transport_options: Mapping[str, Any] | None) -> tuple[str, list[int], str]:
    opts = transport_options or {}
    steps = sorted(opts.get("priority_steps") or KOMBU_STEPS)
    return str(opts.get("sep", KOMBU_SEP)), steps, str(opts.get("global_keyprefix", ""))


def _suffix(pri: int, sep: str) -> str:
    return f"{sep}{pri}" if pri else ""


def queue_keys(queue: str, transport_options: Mapping[str, Any] | None = None) -> list[str]:
    """The Redis lists kombu keeps for ``queue``: one per priority step."""
    sep, steps, gprefix = _options(transport_options)
    return [f"{gprefix}{queue}{_suffix(p, sep)}" for p in steps]


def move_stranded(
    client: Any,
    queue: str,
    prefix: str,
    transport_options: Mapping[str, Any] | None = None,
    task_types: Iterable[str] | None = None,
    batch: int = 200,
    default_queue: str | None = None,
) -> int:
    """Move every message of ``queue`` (and its unacked ones) to the shared queues; returns how
    many.  Safe to run concurrently with itself and with producers.  A message of a type not
    in ``task_types`` goes to ``default_queue``: by default this app's own default queue, which
    every worker of the app consumes and hands on to the type's queue (never Celery's shared
    "celery", which other apps' workers on the broker may consume)."""
    sep, steps, gprefix = _options(transport_options)
    default_queue = default_queue or f"{prefix}.default"
    # The unacknowledged messages are read before the queue moves: a message moved to a shared
    # queue keeps its routing key, and a live worker that fetches it there must keep it.
    fetched = _unacked_of(client, queue, transport_options)
    known = sorted(set(task_types)) if task_types is not None else []
    if task_types is None:  # trust the task names in the messages themselves
        seen = _types_seen(client, queue_keys(queue, transport_options))
        known = sorted({*seen, *(t for _, _, m in fetched if isinstance(t := m.get("headers", {}).get("task"), str))})
    script = client.register_script(_MOVE)
    suffixes = [_suffix(p, sep) for p in steps]
    args = [gprefix + prefix, gprefix + default_queue, batch, len(steps), *suffixes, *known]
    total = 0
    while True:
        # Batches keep each script short: Redis serves nobody else while one runs.
        moved = int(script(keys=queue_keys(queue, transport_options), args=args))
        total += moved
        if moved < batch:
            break
    return total + _restore_unacked(client, queue, prefix, transport_options, known, default_queue, fetched)


def _types_seen(client: Any, keys: list[str]) -> list[str]:
    """Without a list of known types, trust the task names in the messages themselves."""
    names: set[str] = set()
    for key in keys:
        for raw in client.lrange(key, 0, -1):
            try:
                names.add(str(json.loads(raw)["headers"]["task"]))
            except (ValueError, KeyError, TypeError):
                continue
    return sorted(names)


def _unacked_of(
    client: Any, queue: str, transport_options: Mapping[str, Any] | None
) -> list[tuple[Any, Any, dict[str, Any]]]:
    """kombu's unacknowledged entries (tag, raw entry, message) fetched from ``queue``."""
    opts = transport_options or {}
    hkey = _options(transport_options)[2] + str(opts.get("unacked_key", "unacked"))
    found = []
    for tag, raw in client.hscan_iter(hkey, count=500):
        try:
            message, _exchange, routing_key = json.loads(raw)
        except (ValueError, TypeError):
            continue
        if routing_key == queue and isinstance(message, dict):
            found.append((tag, raw, message))
    return found


def _restore_unacked(
    client: Any,
    queue: str,
    prefix: str,
    transport_options: Mapping[str, Any] | None,
    known: list[str],
    default_queue: str,
    fetched: list[tuple[Any, Any, dict[str, Any]]],
) -> int:
    sep, steps, gprefix = _options(transport_options)
    opts = transport_options or {}
    hkey = gprefix + str(opts.get("unacked_key", "unacked"))
    ikey = gprefix + str(opts.get("unacked_index_key", "unacked_index"))
    script = client.register_script(_RESTORE)
    restored = 0
    for tag, raw, message in fetched:
        try:
            task = message.get("headers", {}).get("task")
            pri = int(message.get("properties", {}).get("priority") or 0)
        except (ValueError, TypeError, AttributeError):
            continue
        step = steps[max(0, bisect.bisect(steps, pri) - 1)]
        base = f"{prefix}.{task}" if task in known else default_queue
        dest = f"{gprefix}{base}{_suffix(step, sep)}"
        # Only if the entry is still the one read: a worker may have acknowledged it since.
        restored += int(script(keys=[hkey, ikey, dest], args=[tag, raw, json.dumps(message)]))
    if restored:
        logger.info("returned %d unacknowledged message(s) of %s to the shared queues", restored, queue)
    return restored


def restore_unclaimed(
    client: Any,
    prefix: str,
    transport_options: Mapping[str, Any] | None,
    older_than: float,
    unclaimed: Callable[[str], bool],
) -> int:
    """Return to their queues the messages of this app's shared queues that a worker fetched
    more than ``older_than`` seconds ago and whose task nobody claimed (``unclaimed(task_id)``).

    When a worker dies between fetching a message from a shared queue and its pool claiming the
    record, kombu keeps the message only in its ``unacked`` hash, until the visibility timeout
    (an hour by default).  A message a live worker holds, waiting for a free pool slot, is also
    returned: the worker that claims first runs it and the other copy is dropped as a duplicate.
    """
    sep, steps, gprefix = _options(transport_options)
    opts = transport_options or {}
    hkey = gprefix + str(opts.get("unacked_key", "unacked"))
    ikey = gprefix + str(opts.get("unacked_index_key", "unacked_index"))
    cutoff = time.time() - older_than
    script = client.register_script(_RESTORE)
    shared = f"{prefix}."
    direct = f"{prefix}.worker."
    restored = 0
    for tag in client.zrangebyscore(ikey, "-inf", cutoff):
        raw = client.hget(hkey, tag)
        if raw is None:
            continue
        try:
            message, _exchange, routing_key = json.loads(raw)
            task_id = message.get("headers", {}).get("id")
            pri = int(message.get("properties", {}).get("priority") or 0)
        except (ValueError, TypeError, AttributeError):
            continue
        if (
            not isinstance(routing_key, str)
            or not routing_key.startswith(shared)
            or routing_key.startswith(direct)
            or not isinstance(task_id, str)
            or not unclaimed(task_id)
        ):
            continue
        step = steps[max(0, bisect.bisect(steps, pri) - 1)]
        dest = f"{gprefix}{routing_key}{_suffix(step, sep)}"
        restored += int(script(keys=[hkey, ikey, dest], args=[tag, raw, json.dumps(message)]))
    if restored:
        logger.warning("returned %d fetched but never claimed message(s) to the shared queues", restored)
    return restored
