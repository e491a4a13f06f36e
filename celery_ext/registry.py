"""Name -> class resolution for every extension point.

A name resolves to a built-in first, then to an entry point of the point's group, then to a
``module:Class`` path.  An unknown name is a ``ConfigError`` listing the known names.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from celery_ext.errors import ConfigError


@dataclass(frozen=True)
class ExtensionPoint:
    """One extension point: its kind (for messages), entry-point group and built-ins."""

    kind: str
    group: str
    builtins: dict[str, str]
    base: str  # "module:Class" of the ABC that every implementation must subclass

    def known(self) -> list[str]:
        names = set(self.builtins)
        names.update(ep.name for ep in entry_points(group=self.group))
        return sorted(names)

    def resolve(self, name: str, path: str = "") -> type[Any]:
        where = f"{path}: " if path else ""
        if name in self.builtins:
            self._check_shadowing(name, where)
            return self._check(import_path(self.builtins[name], where), name, where)
        eps = [ep for ep in entry_points(group=self.group) if ep.name == name]
        if eps:
            try:
                cls = eps[0].load()
            except Exception as exc:
                raise ConfigError(
                    f"{where}{self.kind} {name!r} from entry point {eps[0].value} failed to load: {exc}"
                ) from exc
            return self._check(cls, name, where)
        if ":" in name:
            return self._check(import_path(name, where), name, where)
        known = self.known()
        hint = difflib.get_close_matches(name, known, n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(f"{where}no {self.kind} {name!r}{suggestion} (known: {', '.join(known)})")

    def _check_shadowing(self, name: str, where: str) -> None:
        for ep in entry_points(group=self.group):
            if ep.name == name:
                raise ConfigError(
                    f"{where}entry point {ep.value} in group {self.group} reuses the built-in "
                    f"{self.kind} name {name!r}; rename it"
                )

    def _check(self, cls: Any, name: str, where: str) -> type[Any]:
        base = import_path(self.base, where)
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise ConfigError(f"{where}{self.kind} {name!r} is {cls!r}, not a subclass of {base.__name__}")
        return cls


def import_path(path: str, where: str = "") -> Any:
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split(".") if attr else ():
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{where}cannot import {path!r}: {exc}") from exc
    return obj


EXECUTORS = ExtensionPoint(
    "executor",
    "celery_ext.executors",
    {
        "python": "celery_ext.executors.python:PythonExecutor",
        "http": "celery_ext.executors.http:HttpExecutor",
        "rpc": "celery_ext.executors.rpc:RpcExecutor",
        "kafka": "celery_ext.executors.kafka:KafkaExecutor",
        "database": "celery_ext.executors.database:DatabaseExecutor",
    },
    "celery_ext.executors.base:Executor",
)

STORAGE = ExtensionPoint(
    "storage backend",
    "celery_ext.storage",
    {
        "sqlite": "celery_ext.storage.sql:SqlStorage",
        "postgresql": "celery_ext.storage.sql:SqlStorage",
        "mysql": "celery_ext.storage.sql:SqlStorage",
        "mongodb": "celery_ext.storage.mongo:MongoStorage",
    },
    "celery_ext.storage.base:Storage",
)

BALANCERS = ExtensionPoint(
    "load balancer",
    "celery_ext.balancers",
    {
        "least_task": "celery_ext.routing.least_task:LeastTaskBalancer",
        "weighted_round_robin": "celery_ext.routing.weighted:WeightedRoundRobinBalancer",
        "affinity": "celery_ext.routing.affinity:AffinityBalancer",
        "round_robin": "celery_ext.routing.simple:RoundRobinBalancer",
        "random": "celery_ext.routing.simple:RandomBalancer",
        "consistent_hash": "celery_ext.routing.hashing:ConsistentHashBalancer",
    },
    "celery_ext.routing.base:LoadBalancer",
)

EVENT_BUSES = ExtensionPoint(
    "event bus",
    "celery_ext.eventbus",
    {
        "local": "celery_ext.events.local:LocalTransport",
        "kombu": "celery_ext.events.kombu:KombuTransport",
        "redis": "celery_ext.events.redis:RedisTransport",
    },
    "celery_ext.events.transport:Transport",
)
PLUGINS = ExtensionPoint(
    "plugin",
    "celery_ext.plugins",
    {
        "alert": "celery_ext.plugins.alert:AlertPlugin",
        "metrics": "celery_ext.plugins.metrics:MetricsPlugin",
    },
    "celery_ext.plugins.base:Plugin",
)
METRICS = ExtensionPoint(
    "metrics collector",
    "celery_ext.metrics",
    {
        "prometheus": "celery_ext.metrics.prometheus:PrometheusMetrics",
        "null": "celery_ext.metrics:NullMetrics",
    },
    "celery_ext.metrics:MetricsCollector",
)

CONFIG_LOADERS = ExtensionPoint(
    "config loader",
    "celery_ext.config_loaders",
    {
        "file": "celery_ext.config:YamlConfigLoader",
        "redis": "celery_ext.config_store:RedisConfigLoader",
        "rediss": "celery_ext.config_store:RedisConfigLoader",
        "unix": "celery_ext.config_store:RedisConfigLoader",
    },
    "celery_ext.config:ConfigLoader",
)
