"""Cluster counters: counts made in any process, summed in Redis, exported by one process.

A producer (the REST API, ``celery-ext submit``, an application's ``TaskManager``) serves no
``/metrics``, and a short-lived one is gone before any scrape.  So the counters that producers
make (``task_created``) are summed in the registry's Redis, one hash per counter
(``<app.name>.metrics.<counter>``, field: the JSON list of label values), and the scheduler
leader exports the sums (``PrometheusMetrics.exposition``): one series for the whole cluster,
never the same counts from two processes.

Off the submit path: ``inc`` adds to a dict in the process; a thread writes what gathered every
``FLUSH_DELAY`` seconds in one script call (one round trip for any number of counts), and the
process writes the rest at exit (``flush``, also from ``Runtime.close``).  A batch that failed is
retried under the same number, and the script applies each process's batch numbers once: a batch
applied whose reply was lost is not counted twice.  Counts of a process killed (SIGKILL) in the
last ``FLUSH_DELAY`` are lost; a forked child starts empty (its parent writes what it held).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
import uuid
import weakref
from typing import Any

from celery_ext.forksafe import fork_safe
from celery_ext.transport import redis_py_url

logger = logging.getLogger("celery_ext.metrics")

# KEYS[1]: this process's last batch number; KEYS[2..]: a counter's hash for each count.
# ARGV[1]: the batch number, ARGV[2]: how long its number is kept (ms); then field, amount per count.
_APPLY = """
local last = tonumber(redis.call('get', KEYS[1]) or '0')
if tonumber(ARGV[1]) <= last then return 0 end
for i = 2, #KEYS do
  redis.call('hincrby', KEYS[i], ARGV[2 * i - 1], ARGV[2 * i])
end
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

Counts = dict[tuple[str, tuple[str, ...]], int]

_ALL: weakref.WeakSet[ClusterCounters] = weakref.WeakSet()


class ClusterCounters:
    FLUSH_DELAY = 0.5
    RETRY_DELAY = 2.0
    # A process's last batch number (``<app.name>.metrics.batch.<process>``) is kept this long:
    # far longer than any retry takes.
    KEEP_BATCH_MS = 24 * 3600 * 1000

    def __init__(self, client: Any, app_name: str) -> None:
        self.client = client
        self.prefix = f"{app_name}.metrics"
        self._apply = client.register_script(_APPLY)
        self._reset()
        _ALL.add(self)

    def _reset(self) -> None:
        """A fresh process's state (and a forked child's: what it inherited is the parent's)."""
        self._lock = threading.Lock()
        self._writing = threading.Lock()  # held while a batch is written: flush waits for it
        self._wake = threading.Event()
        self._pending: Counts = {}
        self._batch: tuple[int, Counts] | None = None  # written, not yet acknowledged
        self._seq = 0
        self._origin = uuid.uuid4().hex
        self._thread: threading.Thread | None = None
        self._warned_at = 0.0

    @classmethod
    def from_url(cls, url: str, app_name: str) -> ClusterCounters:
        import redis

        client = redis.Redis.from_url(redis_py_url(url), socket_timeout=2, socket_connect_timeout=1)
        return cls(fork_safe(client), app_name)

    def key(self, counter: str) -> str:
        return f"{self.prefix}.{counter}"

    # --- counting (any process) -----------------------------------------------------------

    def inc(self, counter: str, labels: tuple[str, ...], amount: int = 1) -> None:
        with self._lock:
            first = not self._pending
            k = (counter, labels)
            self._pending[k] = self._pending.get(k, 0) + amount
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="celery_ext-metrics-flush", daemon=True)
                self._thread.start()
                atexit.register(self.flush)
        if first:
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(self.FLUSH_DELAY)  # let the counts of a burst join the batch
            self._wake.clear()
            if not self.flush():
                time.sleep(self.RETRY_DELAY)
                self._wake.set()

    def flush(self) -> bool:
        """Write every count made before the call (waiting for a batch the thread is writing).
        False if Redis refused: the counts are kept for the next try."""
        with self._writing:
            return self._write() and self._write()  # a batch retried, then the counts since

    def _write(self) -> bool:
        with self._lock:
            if self._batch is None and self._pending:
                self._seq += 1
                self._batch, self._pending = (self._seq, self._pending), {}
            batch = self._batch
        if batch is None:
            return True
        seq, counts = batch
        keys = [f"{self.prefix}.batch.{self._origin}"]
        args: list[Any] = [seq, self.KEEP_BATCH_MS]
        for (counter, labels), amount in counts.items():
            keys.append(self.key(counter))
            args += [json.dumps(list(labels)), amount]
        try:
            self._apply(keys=keys, args=args)
        except Exception as exc:  # noqa: BLE001 - kept and retried; counting must never fail a submit
            if time.monotonic() - self._warned_at > 60:
                self._warned_at = time.monotonic()
                logger.warning("could not add %d count(s) to the cluster metrics: %s", sum(counts.values()), exc)
            return False
        with self._lock:
            self._batch = None
        return True

    # --- exporting (the scheduler leader) -------------------------------------------------

    def totals(self, counter: str) -> dict[tuple[str, ...], int]:
        """The cluster's sums of ``counter``, by label values."""
        raw: dict[bytes, bytes] = self.client.hgetall(self.key(counter))
        out = {}
        for field, value in raw.items():
            try:
                labels = tuple(str(v) for v in json.loads(field))
            except ValueError:
                continue  # not ours
            out[labels] = int(value)
        return out


def _after_fork() -> None:
    for counters in list(_ALL):
        counters._reset()


os.register_at_fork(after_in_child=_after_fork)
