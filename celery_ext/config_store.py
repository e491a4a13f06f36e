"""The cluster's config in Redis: ``celery-ext config apply``, the Redis key loader, ``config status``.

``celery-ext config apply FILE`` validates FILE as ``config validate`` does, then stores it under
``<app.name>.config`` in the worker registry's Redis (``scheduler.registry_url``, else the
broker) as JSON: ``{"version", "config", "source", "applied_at"}``.  ``config`` is the file's tree
before ``${ENV}`` interpolation (each process interpolates its own environment); ``version`` is
``config_version`` of the validated config, the name every worker and scheduler reports.

Every worker and scheduler with a registry watches that key (a GET every second) besides its own
source, and applies what can change live (``celery_ext.reload``); the last change wins, from
either.  A process may also take its config from a key only: ``--config`` /
``$CELERY_EXT_CONFIG`` = ``redis://host:6379/0#<key>`` selects ``RedisConfigLoader``, the second
built-in ``ConfigLoader`` (``celery_ext.config_loaders`` entry-point group).

Schedulers announce themselves in ``<app.name>.schedulers`` (a hash: holder -> JSON of its config
version, the keys waiting for a restart, and when it was last seen) every tick; workers report
the same in their registry entries.  ``config status`` reads both.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from celery_ext.config import Config, ConfigLoader, config_version, read_yaml
from celery_ext.errors import ConfigError
from celery_ext.routing.workers import KEEP_KEYS_MS
from celery_ext.transport import redis_py_url

logger = logging.getLogger("celery_ext.config")

DEFAULT_KEY = "celery_ext.config"


def config_key(app_name: str) -> str:
    """Where ``config apply`` stores the config of app ``app_name``."""
    return f"{app_name}.config"


def _client(url: str) -> Any:
    return redis.Redis.from_url(redis_py_url(url), socket_timeout=5, socket_connect_timeout=5)


class RedisConfigLoader(ConfigLoader):
    """The ``redis`` loader: ``redis://[:password@]host:port/db#key`` (the key defaults to
    ``celery_ext.config``); the document ``config apply`` writes, versioned by its ``version``."""

    def __init__(self, location: str, poll_interval: float = 1.0) -> None:
        super().__init__(location, poll_interval)
        url, _, key = location.partition("#")
        self.url, self.key = url, key or DEFAULT_KEY
        self._redis: Any = None

    @property
    def client(self) -> Any:
        if self._redis is None:
            self._redis = _client(self.url)
        return self._redis

    def read(self) -> tuple[Any, str]:
        try:
            raw = self.client.get(self.key)
        except redis.RedisError as exc:
            raise ConfigError(f"{self.source}: cannot read the config key ({exc})") from None
        if raw is None:
            raise ConfigError(
                f"{self.source}: no config under key {self.key!r} (`celery-ext config apply FILE` stores one)"
            )
        try:
            doc = json.loads(raw)
            return doc["config"], str(doc["version"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{self.source}: the key {self.key!r} holds no config document ({exc!r})") from None


@dataclass(frozen=True)
class Applied:
    """What ``config apply`` stored."""

    key: str
    version: str
    source: str
    applied_at: str


def applied_config(client: Any, key: str) -> Applied | None:
    raw = client.get(key)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
        return Applied(key, str(doc["version"]), str(doc.get("source", "")), str(doc.get("applied_at", "")))
    except (ValueError, KeyError, TypeError):
        return None


def apply_config(path: str | os.PathLike[str], config: Config, registry_url: str) -> Applied:
    """Store the (already validated) file at ``path`` as app ``config.app.name``'s config."""
    applied = Applied(
        key=config_key(config.app.name),
        version=config_version(config),
        source=str(os.path.abspath(path)),
        applied_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    doc = {
        "version": applied.version,
        "config": read_yaml(Path(path)),
        "source": applied.source,
        "applied_at": applied.applied_at,
    }
    _client(registry_url).set(applied.key, json.dumps(doc, default=str))
    return applied


# --- who runs what ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    """One worker or scheduler as ``config status`` shows it."""

    kind: str  # "worker" or "scheduler"
    id: str
    config_version: str
    restart_needed: tuple[str, ...] = ()
    leader: bool = False


class SchedulerPresence:
    """A scheduler's line in ``<app>.schedulers``, refreshed every tick, removed at stop."""

    def __init__(self, client: Any, app_name: str, holder: str, ttl: float) -> None:
        self.client, self.key, self.holder, self.ttl = client, f"{app_name}.schedulers", holder, ttl

    def announce(self, version: str, restart_needed: list[str], leader: bool) -> None:
        entry = {
            "version": version,
            "restart_needed": restart_needed,
            "leader": leader,
            "seen": time.time(),
            "ttl": self.ttl,
        }
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(self.key, self.holder, json.dumps(entry)).pexpire(self.key, KEEP_KEYS_MS).execute()

    def withdraw(self) -> None:
        self.client.hdel(self.key, self.holder)


def schedulers(client: Any, app_name: str) -> list[Component]:
    """The schedulers seen within their ttl (three scheduler intervals)."""
    out = []
    now = time.time()
    for holder, raw in sorted(client.hgetall(f"{app_name}.schedulers").items()):
        try:
            entry = json.loads(raw)
            if now - float(entry["seen"]) > float(entry["ttl"]):
                continue
            out.append(
                Component(
                    "scheduler",
                    holder.decode() if isinstance(holder, bytes) else str(holder),
                    str(entry["version"]),
                    tuple(entry.get("restart_needed") or ()),
                    bool(entry.get("leader")),
                )
            )
        except (ValueError, KeyError, TypeError):
            continue
    return out
