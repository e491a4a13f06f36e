"""The worker registry in Redis: who is online, what each worker runs, and how loaded it is.

Keys (``<app.name>`` prefix, so two apps on one Redis never mix):

* ``<p>.workers`` hash: worker id -> JSON ``WorkerInfo`` (queue, weight, capacity, types, ...)
* ``<p>.workers.expiry`` sorted set: worker id -> when its entry expires (Redis server time,
  ms).  Each heartbeat pushes it ``worker.offline_after`` ahead: that is the entry's TTL.  An id
  whose score is in the past is offline; ``sweep_offline`` removes it exactly once and calls the
  registry's ``on_offline`` (the composition root passes the observer's: ``worker_offline``).
* ``<p>.balance.strategy``: the routing strategy last published to the cluster (JSON: strategy,
  config, version); every registry read returns it, so producers follow its changes.
* ``<p>.tasks.held`` sorted set: task id -> until when (Redis server time, ms) a live worker
  process holds that task while storage is away: its outcome waits in the process's spool, or
  it still runs and its lease could not be renewed (``hold``).  Recovery leaves a held task be;
  a process that dies stops renewing its holds, and they run out after ``worker.task_lease``.
* ``<p>.workers.inflight`` hash: worker id -> tasks routed to it or held by it and not finished.
  The router reserves a slot (``reserve``), the worker releases it when a task ends, and the
  heartbeat checks it against the truth (held by the worker + waiting in its direct queue) and
  corrects a difference that persists for two beats, so a crash leaks a reservation briefly.

Server time is used for every freshness decision, so clock skew between hosts does not matter.
Config: ``scheduler.registry_url`` (default: the broker when it is Redis).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from celery_ext.forksafe import fork_safe
from celery_ext.nowait import NoReplyWriter
from celery_ext.transport import redis_py_url

logger = logging.getLogger("celery_ext.routing")

KEEP_KEYS_MS = 24 * 3600 * 1000  # an app that stops entirely leaves no keys behind after a day

_NOW = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "

# KEYS: workers, expiry, inflight, generation, published strategy, direct sub-queues...
# ARGV: id, info, ttl_ms, held, keep_ms, previous delta -> {in-flight, delta}
# The truth is held + queued.  The count is reset to it only when it differs by the same amount
# at two beats in a row: a one-off difference is a task between two steps (popped but not yet
# held, finished but not yet released), while a leak (a crashed child) persists.
_HEARTBEAT = (
    _NOW
    + """
local queued = 0
for i = 6, #KEYS do queued = queued + redis.call('LLEN', KEYS[i]) end
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  -- The static part changed (or is new): readers holding a cached copy must reload it.
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('INCR', KEYS[4])
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
for i = 1, 5 do redis.call('PEXPIRE', KEYS[i], ARGV[5]) end
local truth = tonumber(ARGV[4]) + queued
local current = redis.call('HGET', KEYS[3], ARGV[1])
local delta = truth - tonumber(current or truth)
if not current or (delta ~= 0 and delta == tonumber(ARGV[6])) then
  redis.call('HSET', KEYS[3], ARGV[1], truth)
  return {truth, 0}
end
return {truth - delta, delta}
"""
)

# KEYS: workers, expiry, inflight, generation, published strategy  ARGV: the caller's generation
# -> {generation, ids, loads, infos, strategy} of the online workers; infos only when the
# generation moved; the strategy last published to the cluster (or false)
_ONLINE = (
    _NOW
    + """
local gen = redis.call('GET', KEYS[4]) or '0'
local fetch = gen ~= ARGV[1]
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], now, '+inf')
local infos, loads = {}, {}
for i = 1, #ids, 500 do
  local chunk = {unpack(ids, i, math.min(i + 499, #ids))}
  local b = redis.call('HMGET', KEYS[3], unpack(chunk))
  for j = 1, #chunk do loads[#loads + 1] = b[j] end
  if fetch then
    local a = redis.call('HMGET', KEYS[1], unpack(chunk))
    for j = 1, #chunk do infos[#infos + 1] = a[j] end
  end
end
return {gen, ids, loads, infos, redis.call('GET', KEYS[5])}
"""
)


def _reserving(backlog_from: int, taken: str) -> str:
    """A script that takes a slot: KEYS[1] the in-flight hash, KEYS[``backlog_from``...] the
    type's shared sub-queues, ARGV[1], ARGV[2] the worker's id and capacity.  -2 when work
    already waits in the shared queue (routing around a backlog would let new tasks overtake it,
    and a worker that frees a slot takes from the backlog anyway); -1 when the worker is full;
    else ``taken`` runs, with the new in-flight count in ``n``, and returns it."""
    return f"""
for i = {backlog_from}, #KEYS do
  if redis.call('LLEN', KEYS[i]) > 0 then return -2 end
end
local n = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if n >= tonumber(ARGV[2]) then return -1 end
n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
{taken}
return n
"""


# KEYS: inflight, the type's shared sub-queues  ARGV: id, capacity -> new in-flight, -1, -2
_RESERVE = _reserving(2, "")

# ``_RESERVE`` and the publish of the message that takes the slot, in one round trip, when the
# registry is the broker (``TaskRouter.pending``, ``RedisWire.push_reserved``).
# KEYS: inflight, the message's list, the type's shared sub-queues...
# ARGV: id, capacity, the message, its task-sent events ('' for none), the events' topics...
# -> as _RESERVE; the message and its events are written only when the slot was taken
_RESERVE_PUSH = _reserving(
    3,
    """redis.call('LPUSH', KEYS[2], ARGV[3])
for i = 5, #ARGV do redis.call('PUBLISH', ARGV[i], ARGV[4]) end""",
)

# KEYS: inflight  ARGV: id, delta -> new in-flight, never below zero
_ADJUST = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
if n < 0 then redis.call('HSET', KEYS[1], ARGV[1], 0) return 0 end
return n
"""

# KEYS: held  ARGV: ttl ms, keep ms, task ids...  (held until now + ttl)
_HOLD = (
    _NOW
    + """
for i = 3, #ARGV do redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 0
"""
)

# KEYS: held  ARGV: task ids...  -> the ids held now
_HELD = (
    _NOW
    + """
local out = {}
for i = 1, #ARGV do
  local until_ms = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if until_ms and tonumber(until_ms) >= now then out[#out + 1] = ARGV[i] end
end
return out
"""
)

# KEYS: workers, expiry, inflight  ARGV: limit -> infos of the workers removed as offline
_SWEEP = (
    _NOW
    + """
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. now, 'LIMIT', 0, tonumber(ARGV[1]))
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[2], id)
  out[#out + 1] = redis.call('HGET', KEYS[1], id) or cjson.encode({id = id})
  redis.call('HDEL', KEYS[1], id)
  redis.call('HDEL', KEYS[3], id)
end
return out
"""
)


def direct_queue_name(prefix: str, worker_id: str) -> str:
    """The queue only one worker consumes."""
    return f"{prefix}.worker.{worker_id}"


@dataclass(slots=True)
class WorkerInfo:
    """One registry entry.  ``in_flight`` comes from the in-flight hash, not from the JSON."""

    id: str
    queue: str
    hostname: str = ""
    weight: int = 1
    capacity: int = 1
    supported_types: tuple[str, ...] = ()
    in_flight: int = 0
    config_version: str = ""
    restart_needed: tuple[str, ...] = ()  # config keys changed since start that wait for a restart
    app_version: str = ""  # app.version of the worker's config
    # False while the worker's consumer takes nothing though work waits and slots are free
    # (``heartbeat.Progress``); ``problem`` says why.
    healthy: bool = True
    problem: str = ""
    heartbeat_at: float = 0.0  # from the expiry score: Redis time of the last heartbeat
    ttl: float = 0.0
    pid: int = 0
    online: bool = True
    _types: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    def __post_init__(self) -> None:
        self.supported_types = tuple(self.supported_types)
        self.restart_needed = tuple(self.restart_needed)
        self._types = frozenset(self.supported_types)

    def supports(self, task_type: str) -> bool:
        return task_type in self._types

    @property
    def free(self) -> int:
        return self.capacity - self.in_flight

    def to_json(self) -> str:
        """The static part (what the registry hash stores; load and liveness live apart)."""
        data = asdict(self)
        for key in ("in_flight", "online", "_types", "heartbeat_at"):
            data.pop(key)
        return json.dumps(data, separators=(",", ":"))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("_types")
        data["supported_types"] = list(self.supported_types)
        data["restart_needed"] = list(self.restart_needed)
        return data

    @classmethod
    def from_json(cls, raw: str | bytes, in_flight: Any = 0, online: bool = True) -> WorkerInfo:
        data = json.loads(raw)
        known = {k: v for k, v in data.items() if k in _FIELDS}
        known.setdefault("queue", "")
        return cls(**known, in_flight=int(in_flight or 0), online=online)


_FIELDS = frozenset(
    f for f in WorkerInfo.__dataclass_fields__ if f not in ("in_flight", "online", "_types", "heartbeat_at")
)


class WorkerRegistry:
    """Reads and writes the registry; every operation is one Redis round trip."""

    def __init__(self, client: Any, prefix: str, on_offline: Callable[[WorkerInfo], None] | None = None) -> None:
        self.client = client
        self.prefix = prefix
        #: Called with each worker ``sweep_offline`` finds offline (after it was removed).
        self.on_offline = on_offline
        self.keys = (
            f"{prefix}.workers",
            f"{prefix}.workers.expiry",
            f"{prefix}.workers.inflight",
            f"{prefix}.workers.generation",
        )
        # The routing strategy last published to the cluster (see TaskRouter.publish_strategy), as
        # of the last ``online``: producers follow its changes.
        self.strategy_key = f"{prefix}.balance.strategy"
        self.published: bytes | None = None
        # The static entries as of ``_generation``: a refresh re-reads only ids and loads.
        self._static: dict[str, WorkerInfo] = {}
        self._generation = ""
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._online = client.register_script(_ONLINE)
        self._reserve = client.register_script(_RESERVE)
        #: ``_RESERVE`` with the message's publish (run on the broker's own connection).
        self.reserve_push = client.register_script(_RESERVE_PUSH)
        self._adjust = client.register_script(_ADJUST)
        self._sweep = client.register_script(_SWEEP)
        self.held_key = f"{prefix}.tasks.held"
        self._hold = client.register_script(_HOLD)
        self._held = client.register_script(_HELD)
        self._nowait: Any = None

    @property
    def generation(self) -> str:
        """Moves whenever some worker's static entry changes (as of the last ``online``)."""
        return self._generation

    @classmethod
    def from_url(cls, url: str, prefix: str, on_offline: Callable[[WorkerInfo], None] | None = None) -> WorkerRegistry:
        import redis

        # fork_safe: the heartbeat thread may be inside the pool when the worker forks a pool process.
        client = redis.Redis.from_url(redis_py_url(url), socket_timeout=2, socket_connect_timeout=1)
        return cls(fork_safe(client), prefix, on_offline)

    # --- the worker side ------------------------------------------------------------------

    def heartbeat(
        self, info: WorkerInfo, ttl: float, held: int, queue_keys: Sequence[str] = (), last_delta: int = 0
    ) -> tuple[int, int]:
        """Register or refresh ``info`` for ``ttl`` seconds and check its in-flight count against
        the truth (``held`` + queued in ``queue_keys``).  Returns ``(in_flight, delta)``: pass
        ``delta`` back as ``last_delta`` next time; a delta seen twice in a row is corrected."""
        info.ttl = ttl
        count, delta = self._heartbeat(
            keys=[*self.keys, self.strategy_key, *queue_keys],
            args=[info.id, info.to_json(), int(ttl * 1000), held, KEEP_KEYS_MS, last_delta],
        )
        return int(count), int(delta)

    def mark_offline(self, worker_id: str) -> None:
        """A worker that leaves expires at once, so the next sweep hands back its queue."""
        self.client.zadd(self.keys[1], {worker_id: 0}, xx=True)

    def adjust(self, worker_id: str, delta: int) -> int:
        return int(self._adjust(keys=[self.keys[2]], args=[worker_id, delta]))

    def adjust_command(self, worker_id: str, delta: int) -> tuple[Any, ...]:
        """``adjust`` as a command for a ``NoReplyWriter`` on this registry's Redis."""
        return ("EVAL", _ADJUST, 1, self.keys[2], worker_id, delta)

    def adjust_nowait(self, worker_id: str, delta: int) -> None:
        """``adjust`` without waiting for Redis (the per-task path; see nowait.py)."""
        if self._nowait is None:
            self._nowait = NoReplyWriter(self.client)
        if delta >= 0:  # only a decrement can cross zero
            self._nowait.send("HINCRBY", self.keys[2], worker_id, delta)
        else:
            self._nowait.send(*self.adjust_command(worker_id, delta))

    # --- holds: tasks a live process keeps while storage is away ------------------------------

    def holds(self, ttl: float) -> TaskHolds:
        """Holds of ``ttl`` seconds (a spool's ``Holds``)."""
        return TaskHolds(self, ttl)

    def hold(self, task_ids: Sequence[str], ttl: float) -> None:
        if task_ids:
            self._hold(keys=[self.held_key], args=[int(ttl * 1000), KEEP_KEYS_MS, *task_ids])

    def release(self, task_ids: Sequence[str]) -> None:
        if task_ids:
            self.client.zrem(self.held_key, *task_ids)

    def held(self, task_ids: Sequence[str]) -> set[str]:
        """Which of ``task_ids`` a live process holds now (recovery leaves them be)."""
        if not task_ids:
            return set()
        return {_s(t) for t in self._held(keys=[self.held_key], args=list(task_ids))}

    # --- the producer side ----------------------------------------------------------------

    def online(self) -> list[WorkerInfo]:
        """The online workers with their current loads.  The objects are reused from call to
        call (only ``in_flight`` changes) while no worker's static entry changed."""
        gen, ids, loads, infos, published = self._online(keys=[*self.keys, self.strategy_key], args=[self._generation])
        self.published = published or None
        if infos:
            static = {}
            for wid, raw in zip(ids, infos, strict=True):
                try:
                    static[_s(wid)] = WorkerInfo.from_json(raw)
                except (ValueError, TypeError) as exc:
                    logger.warning("ignoring malformed registry entry %r: %s", wid, exc)
            self._static, self._generation = static, _s(gen)
        out = []
        for wid, load in zip(ids, loads, strict=True):
            base = self._static.get(_s(wid))
            if base is not None:
                base.in_flight = int(load or 0)
                out.append(base)
        return out

    def publish_strategy(self, spec: str) -> None:
        """Make ``spec`` the cluster's routing strategy (producers follow it at their next read)."""
        self.client.set(self.strategy_key, spec, px=KEEP_KEYS_MS)

    def reserve(self, worker_id: str, capacity: int, backlog_keys: Sequence[str] = ()) -> int:
        """Take one slot on a worker; returns its new in-flight count, -1 if it is full, or -2
        if any of ``backlog_keys`` (the type's shared queue) holds waiting work."""
        return int(self._reserve(keys=[self.keys[2], *backlog_keys], args=[worker_id, capacity]))

    # --- inspection and the scheduler -----------------------------------------------------

    def all(self) -> list[WorkerInfo]:
        """Every entry, online or not yet swept, with ``online`` set."""
        pipe = self.client.pipeline(transaction=False)
        pipe.time().hgetall(self.keys[0]).zrange(self.keys[1], 0, -1, withscores=True).hgetall(self.keys[2])
        (sec, usec), infos, expiry, loads = pipe.execute()
        now_ms = sec * 1000 + usec // 1000
        expires = {_s(k): v for k, v in expiry}
        loads = {_s(k): v for k, v in loads.items()}
        out = []
        for wid, raw in infos.items():
            wid = _s(wid)
            online = expires.get(wid, 0) >= now_ms
            info = WorkerInfo.from_json(raw, loads.get(wid, 0), online=online)
            if expires.get(wid):
                info.heartbeat_at = expires[wid] / 1000 - info.ttl
            out.append(info)
        return sorted(out, key=lambda w: w.id)

    def sweep_offline(self, limit: int = 100) -> list[WorkerInfo]:
        """Remove workers whose entry expired; each is returned (and handed to the
        ``on_offline``) by exactly one caller, however many schedulers sweep."""
        gone = [WorkerInfo.from_json(raw, 0, online=False) for raw in self._sweep(keys=list(self.keys), args=[limit])]
        on_offline = self.on_offline
        if on_offline is not None:
            for info in gone:
                try:
                    on_offline(info)
                except Exception:  # noqa: BLE001 - the sweep's result stands whatever a subscriber does
                    logger.exception("on_offline failed for worker %s", info.id)
        return gone

    def remove(self, worker_ids: Iterable[str]) -> None:
        ids = list(worker_ids)
        if ids:
            pipe = self.client.pipeline()
            pipe.hdel(self.keys[0], *ids).zrem(self.keys[1], *ids).hdel(self.keys[2], *ids)
            pipe.execute()


@dataclass(frozen=True, slots=True)
class TaskHolds:
    """``WorkerRegistry.hold``/``release`` with a fixed ttl: what a spool and a lease keeper use."""

    registry: WorkerRegistry
    ttl: float

    def hold(self, task_ids: Sequence[str]) -> None:
        self.registry.hold(task_ids, self.ttl)

    def release(self, task_ids: Sequence[str]) -> None:
        self.registry.release(task_ids)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
