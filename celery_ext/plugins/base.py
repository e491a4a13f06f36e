"""The ``Plugin`` ABC and ``PluginContext``, what a running plugin may use.

A plugin lives in a worker's main process (and in the scheduler's): ``initialize(config)`` with its
``plugins[i].config`` mapping, then ``start(ctx)``, then ``stop(ctx)`` on shutdown.  Any exception
at any stage disables that plugin only (see ``PluginManager``).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

from celery_ext.config import validate_section

if TYPE_CHECKING:
    from celery_ext.config import Config
    from celery_ext.events.base import EventBus
    from celery_ext.metrics import MetricsCollector
    from celery_ext.storage.base import Storage


@dataclass
class PluginContext:
    """What the host hands a plugin: the event bus, metrics, the task store and the config."""

    events: EventBus
    metrics: MetricsCollector
    storage: Storage
    config: Config
    worker_id: str = ""
    app: Any = None  # the Celery app, for plugins that need broker access
    extras: dict[str, Any] = field(default_factory=dict)


class Plugin(abc.ABC):
    """Subclasses set ``name`` and ``version`` and implement ``start``.

    ``settings_model`` (a pydantic model) validates ``config`` in ``initialize``; the result is
    ``self.settings``.  Errors name the YAML path, e.g. ``plugins[0].config.webhook_url: required``.
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = "0.0.0"
    settings_model: ClassVar[type[BaseModel] | None] = None

    def __init__(self) -> None:
        self.settings: Any = None
        self.config_path = f"plugins[{self.name}].config"

    def initialize(self, config: Mapping[str, Any]) -> None:
        """Validate and keep the plugin's own config; no I/O here."""
        if self.settings_model is not None:
            self.settings = validate_section(self.settings_model, config, self.config_path)
        else:
            self.settings = dict(config)

    @abc.abstractmethod
    def start(self, ctx: PluginContext) -> None:
        """Begin work: subscribe to events, open servers, start threads.  Must return promptly."""

    def stop(self, ctx: PluginContext) -> None:  # noqa: B027 - optional hook
        """Undo ``start``."""
