"""Plugins that misbehave on purpose, named in config as ``tests.support.plugins:<Class>``, and
``plugin_context()``: the context a plugin starts with, on a local bus and no storage."""

from __future__ import annotations

from celery_ext.config import Config
from celery_ext.events import EventBus
from celery_ext.metrics import NullMetrics
from celery_ext.plugins import Plugin, PluginContext


class BoomOnStartPlugin(Plugin):
    name = "boom"

    def start(self, ctx: PluginContext) -> None:
        raise RuntimeError("boom in start")


class BoomOnEventPlugin(Plugin):
    """Its handler raises on every event: the bus counts it, the task is unaffected."""

    name = "boom_handler"

    def start(self, ctx: PluginContext) -> None:
        ctx.events.subscribe("*", self.on_event, local_only=True)

    def on_event(self, event: object) -> None:
        raise ValueError("handler exploded")


def plugin_context() -> PluginContext:
    return PluginContext(
        events=EventBus(),
        metrics=NullMetrics(),
        storage=None,
        config=Config(),  # type: ignore[arg-type]
        worker_id="w1",
    )
