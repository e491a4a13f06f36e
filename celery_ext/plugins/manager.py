"""``PluginManager``: loads plugins from ``plugins:``, starts them in order, stops them in reverse.

A plugin that fails to load, initialize, start or stop is disabled and reported (logged at ERROR
and kept in ``failures``); the other plugins and the worker carry on.  Names resolve built-in,
then the ``celery_ext.plugins`` entry-point group, then ``module:Class``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from celery_ext.config import PluginEntry
from celery_ext.errors import ConfigError
from celery_ext.plugins.base import Plugin, PluginContext

logger = logging.getLogger("celery_ext.plugins")


class PluginManager:
    def __init__(self) -> None:
        self._plugins: dict[str, Plugin] = {}
        self._started: list[str] = []
        self.failures: dict[str, str] = {}

    def register(self, plugin: Plugin) -> None:
        name = plugin.name or type(plugin).__name__
        if name in self._plugins:
            raise ConfigError(f"plugins: a plugin named {name!r} is already registered")
        self._plugins[name] = plugin

    def get(self, name: str) -> Plugin | None:
        return self._plugins.get(name)

    @property
    def names(self) -> list[str]:
        return list(self._plugins)

    @property
    def running(self) -> list[str]:
        return list(self._started)

    def load(self, entries: Iterable[PluginEntry]) -> None:
        """Resolve, instantiate and initialize every enabled entry; failures are reported, not raised."""
        from celery_ext.registry import PLUGINS

        for i, entry in enumerate(entries):
            if not entry.enabled:
                continue
            path = f"plugins[{i}]"
            try:
                cls = PLUGINS.resolve(entry.name, f"{path}.name")
                plugin = cls()
                if not plugin.name:
                    plugin.name = entry.name
                plugin.config_path = f"{path}.config"
                plugin.initialize(entry.config)
                self.register(plugin)
            except Exception as exc:  # noqa: BLE001 - a bad plugin never stops the worker
                self._fail(entry.name, "load", exc)

    def start_all(self, ctx: PluginContext) -> None:
        for name, plugin in self._plugins.items():
            if name in self.failures or name in self._started:
                continue
            try:
                plugin.start(ctx)
            except Exception as exc:  # noqa: BLE001
                self._fail(name, "start", exc)
                self._stop_quietly(plugin, ctx)
                continue
            self._started.append(name)
            logger.info("plugin %r %s started", name, plugin.version)

    def stop_all(self, ctx: PluginContext) -> None:
        for name in reversed(self._started):
            try:
                self._plugins[name].stop(ctx)
            except Exception as exc:  # noqa: BLE001
                self._fail(name, "stop", exc)
        self._started.clear()

    def _fail(self, name: str, stage: str, exc: BaseException) -> None:
        message = f"{exc.__class__.__name__}: {exc}"
        self.failures[name] = f"{stage}: {message}"
        logger.error("plugin %r failed in %s and is disabled: %s", name, stage, message,
                     exc_info=not isinstance(exc, ConfigError))

    def _stop_quietly(self, plugin: Plugin, ctx: PluginContext) -> None:
        # Let a plugin that failed half-way release what it did open.
        try:
            plugin.stop(ctx)
        except Exception:  # noqa: BLE001, S110
            pass
