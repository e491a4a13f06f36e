"""Balancer state shared by every producer of a cluster, in the worker registry's Redis.

A stateful strategy (``round_robin``, ``weighted_round_robin``, ``affinity``) kept in one
process gives the configured split only to that process: 120 short-lived ``celery-ext submit``
processes would each start the rotation from the same place.  Here the state lives in Redis and
one Lua script reads it, advances it, checks capacity and the shared-queue backlog, and reserves
the slot: one round trip per decision, the same as the reservation it replaces.

A balancer opts in by returning a ``SharedPlan`` from ``LoadBalancer.shared_plan(pool, type)``:

* ``cycle``: a sequence of turns (``round_robin``: the workers in id order;
  ``weighted_round_robin``: each worker ``weight`` times, evenly spread).  The cluster takes one
  ticket per decision; a full worker's turn passes to the next turn.
* ``sticky``: a type sticks to one worker (the plan's ``first``, by rendezvous hash, at the
  start); when that worker is full or gone, to the least loaded one, and it re-sticks there.

Keys (``<app.name>`` prefix): ``<p>.balance.state`` (hash: ``<strategy>|<type>`` -> ticket or
sticky worker; kept a day after its last use) and ``<p>.balance.plan.<digest>`` (hash: a plan's
turns and capacities, uploaded by the first producer that needs it, kept an hour after its last
use).  The plan is built from the producer's registry snapshot; a changed pool is a new digest,
so its first decision in the cluster costs a second round trip (the upload), once.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from celery_ext.routing.workers import KEEP_KEYS_MS, WorkerInfo

PLAN_TTL_MS = 3600 * 1000
#: A weighted cycle longer than this has its weights scaled down (proportions kept to ~1/MAX).
MAX_CYCLE = 10_000

# KEYS: in-flight, plan, state, the type's shared sub-queues...
# ARGV: mode, state field, plan ttl ms, state ttl ms, [plan field/value pairs to upload...]
# -> {worker id, new in-flight}; -1 every worker full; -2 work waits in the shared queue;
#    -3 the plan is unknown (upload it)
_DECIDE = """
for i = 4, #KEYS do
  if redis.call('LLEN', KEYS[i]) > 0 then return -2 end
end
if #ARGV > 4 then
  redis.call('DEL', KEYS[2])
  for i = 5, #ARGV, 4000 do
    redis.call('HSET', KEYS[2], unpack(ARGV, i, math.min(i + 3999, #ARGV)))
  end
end
local n = tonumber(redis.call('HGET', KEYS[2], '#n'))
if not n then return -3 end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
local function take(id)
  if not id then return nil end
  local cap = redis.call('HGET', KEYS[2], 'c:' .. id)
  if not cap then return nil end
  if tonumber(redis.call('HGET', KEYS[1], id) or '0') >= tonumber(cap) then return nil end
  return redis.call('HINCRBY', KEYS[1], id, 1)
end
if ARGV[1] == 'cycle' then
  local ticket = redis.call('HINCRBY', KEYS[3], ARGV[2], 1) - 1
  local left, tried = tonumber(redis.call('HGET', KEYS[2], '#w')), {}
  for k = 0, n - 1 do
    local id = redis.call('HGET', KEYS[2], 'i:' .. ((ticket + k) % n))
    if not tried[id] then
      local got = take(id)
      if got then
        -- The turns skipped (full workers) are used up: the next ticket follows this one.
        if k > 0 then redis.call('HINCRBY', KEYS[3], ARGV[2], k) end
        return {id, got}
      end
      tried[id] = true
      left = left - 1
      if left == 0 then break end
    end
  end
  return -1
end
-- sticky
local stuck = redis.call('HGET', KEYS[3], ARGV[2])
local want = stuck or redis.call('HGET', KEYS[2], '#f')
local got = take(want)
if got then
  if not stuck then redis.call('HSET', KEYS[3], ARGV[2], want) end
  return {want, got}
end
local best, low = nil, nil
for k = 0, n - 1 do
  local id = redis.call('HGET', KEYS[2], 'i:' .. k)
  local load = tonumber(redis.call('HGET', KEYS[1], id) or '0')
  if load < tonumber(redis.call('HGET', KEYS[2], 'c:' .. id)) and (low == nil or load < low) then
    best, low = id, load
  end
end
if not best then return -1 end
redis.call('HSET', KEYS[3], ARGV[2], best)
return {best, redis.call('HINCRBY', KEYS[1], best, 1)}
"""


@dataclass(frozen=True)
class SharedPlan:
    """A strategy's decision, in the form the shared script runs (see the module doc)."""

    mode: Literal["cycle", "sticky"]
    turns: tuple[str, ...]  # cycle: the turns in order; sticky: the pool, scanned for the least loaded
    capacities: Mapping[str, int]
    first: str = ""  # sticky: where a type sticks first
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        h = hashlib.blake2b(digest_size=12)
        for part in (self.mode, self.first, *self.turns, *(f"{k}={v}" for k, v in sorted(self.capacities.items()))):
            h.update(part.encode())
            h.update(b"\0")
        object.__setattr__(self, "digest", h.hexdigest())

    @classmethod
    def cycle(cls, turns: Sequence[str], pool: Sequence[WorkerInfo]) -> SharedPlan:
        return cls("cycle", tuple(turns), {w.id: w.capacity for w in pool})

    @classmethod
    def sticky(cls, first: str, pool: Sequence[WorkerInfo]) -> SharedPlan:
        return cls("sticky", tuple(sorted(w.id for w in pool)), {w.id: w.capacity for w in pool}, first)

    def fields(self) -> list[str | int]:
        """The plan hash, flattened as field/value pairs for the upload."""
        out: list[str | int] = ["#n", len(self.turns), "#w", len(self.capacities), "#f", self.first]
        for i, wid in enumerate(self.turns):
            out += [f"i:{i}", wid]
        for wid, cap in self.capacities.items():
            out += [f"c:{wid}", cap]
        return out


def weighted_turns(pool: Sequence[WorkerInfo]) -> list[str]:
    """Each worker ``weight`` times (over the weights' gcd), its turns evenly spaced: turn j of a
    worker of weight w sits at (j + 0.5) / w of the cycle.  Weights 5, 1, 1 give ``a a a b c a a``.
    Built with a heap, so a thousand workers cost milliseconds, once per change of the pool."""
    weights = {w.id: max(1, w.weight) for w in pool}
    total = sum(weights.values())
    if total > MAX_CYCLE:
        weights = {k: max(1, round(v * MAX_CYCLE / total)) for k, v in weights.items()}
    g = math.gcd(*weights.values())
    weights = {k: v // g for k, v in weights.items()}
    heap = [(0.5 / w, wid, 0) for wid, w in weights.items()]
    heapq.heapify(heap)
    turns: list[str] = []
    while heap:
        _, wid, j = heapq.heappop(heap)
        turns.append(wid)
        if j + 1 < weights[wid]:
            heapq.heappush(heap, ((j + 1.5) / weights[wid], wid, j + 1))
    return turns


class SharedState:
    """Runs shared decisions against the registry's Redis (``client``)."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.state_key = f"{prefix}.balance.state"
        self._decide = client.register_script(_DECIDE)

    def plan_key(self, plan: SharedPlan) -> str:
        return f"{self.prefix}.balance.plan.{plan.digest}"

    def decide(
        self, plan: SharedPlan, state_field: str, inflight_key: str, backlog_keys: Sequence[str] = ()
    ) -> tuple[str, int] | int:
        """``(worker id, its new in-flight)``, or -1 (every worker of the plan is full) or -2
        (work waits in the shared queue).  One round trip; two when this plan is new to Redis."""
        keys = [inflight_key, self.plan_key(plan), self.state_key, *backlog_keys]
        args: list[str | int] = [plan.mode, state_field, PLAN_TTL_MS, KEEP_KEYS_MS]
        reply = self._decide(keys=keys, args=args)
        if reply == -3:
            reply = self._decide(keys=keys, args=[*args, *plan.fields()])
        if isinstance(reply, list):
            wid = reply[0]
            return (wid.decode() if isinstance(wid, bytes) else str(wid)), int(reply[1])
        return int(reply)

    def forget(self) -> None:
        """Drop the positions and assignments of every strategy (tests, benchmarks)."""
        self.client.delete(self.state_key)
