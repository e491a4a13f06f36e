"""``PluginManager``: loads plugins from ``plugins:``, starts them in order, stops them in reverse.

A plugin that fails to load, initialize, start or stop is disabled and reported (logged at ERROR
and kept in ``failures``); the other plugins and the worker carry on.  A name may run once: a
later entry of a name already loaded is refused (and reported), the earlier one runs; an entry
that fails never holds its name against a later valid one.  Names resolve built-in, then the
``celery_ext.plugins`` entry-point group, then ``module:Class``.  ``check_plugins`` reports the
same problems without starting anything (``celery-ext config validate``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from celery_ext.config import PluginEntry
from celery_ext.errors import ConfigError
from celery_ext.plugins.base import Plugin, PluginContext
from celery_ext.registry import PLUGINS

logger = logging.getLogger("celery_ext.plugins")


class PluginManager:
    def __init__(self) -> None:
        self._plugins: dict[str, Plugin] = {}
        self._started: list[str] = []
        self._disabled: set[str] = set()  # failed to start: never started again
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
        failed: list[tuple[str, str]] = []  # (name, path) of the entries that failed
        holder: dict[str, str] = {}  # name -> path of the entry that loaded it
        for i, entry in enumerate(entries):
            if not entry.enabled:
                continue
            path = f"plugins[{i}]"
            try:
                if entry.name in holder:
                    raise ConfigError(
                        f"{path}.name: a plugin named {entry.name!r} is already loaded from "
                        f"{holder[entry.name]}; this entry is ignored"
                    )
                plugin = build_plugin(entry, path)
                self.register(plugin)
                holder[entry.name] = path
            except Exception as exc:  # noqa: BLE001 - a bad plugin never stops the worker
                failed.append((entry.name, path))
                self._fail(entry.name, "load", exc, key=f"{entry.name} ({path})")
        # A failure is reported under the plugin's name, unless another entry of that name runs.
        for name, path in failed:
            if name not in self._plugins and name not in self.failures:
                self.failures[name] = self.failures.pop(f"{name} ({path})")

    def start_all(self, ctx: PluginContext) -> None:
        for name, plugin in self._plugins.items():
            if name in self._disabled or name in self._started:
                continue
            try:
                plugin.start(ctx)
            except Exception as exc:  # noqa: BLE001
                self._disabled.add(name)
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

    def _fail(self, name: str, stage: str, exc: BaseException, key: str | None = None) -> None:
        message = f"{exc.__class__.__name__}: {exc}"
        self.failures[key or name] = f"{stage}: {message}"
        logger.error(
            "plugin %r failed in %s and is disabled: %s",
            name,
            stage,
            message,
            exc_info=not isinstance(exc, ConfigError),
        )

    def _stop_quietly(self, plugin: Plugin, ctx: PluginContext) -> None:
        # Let a plugin that failed half-way release what it did open.
        try:
            plugin.stop(ctx)
        except Exception:  # noqa: BLE001, S110
            pass


def build_plugin(entry: PluginEntry, path: str) -> Plugin:
    """Resolve ``entry.name``, instantiate it and initialize it with ``entry.config`` (validated
    against the plugin's settings model; errors name ``<path>.config...``).  No I/O."""
    cls = PLUGINS.resolve(entry.name, f"{path}.name")
    plugin = cls()
    if not plugin.name:
        plugin.name = entry.name
    plugin.config_path = f"{path}.config"
    plugin.initialize(entry.config)
    built: Plugin = plugin
    return built


def check_plugins(entries: Sequence[tuple[int, PluginEntry]]) -> tuple[list[str], list[str]]:
    """What ``load`` would report, as (errors, warnings), without starting anything: every
    enabled entry's name and settings, and names given twice.  A disabled entry's problems are
    warnings.  ``entries`` are (index in ``plugins``, entry) pairs."""
    errors: list[str] = []
    warnings: list[str] = []
    holder: dict[str, str] = {}
    for i, entry in entries:
        path = f"plugins[{i}]"
        problems: list[str] = []
        try:
            build_plugin(entry, path)
        except ConfigError as exc:
            problems.extend(exc.errors)
        except Exception as exc:  # noqa: BLE001 - a third-party plugin may raise anything
            problems.append(f"{path}: {entry.name!r} failed to initialize: {exc.__class__.__name__}: {exc}")
        if not entry.enabled:
            warnings.extend(f"{p} (the entry is disabled)" for p in problems)
            continue
        errors.extend(problems)
        if entry.name in holder:
            errors.append(
                f"{path}.name: a plugin named {entry.name!r} is already given by {holder[entry.name]}; "
                f"a worker runs only the first"
            )
        elif not problems:
            holder[entry.name] = path
    return errors, warnings
