"""Plugins: ``Plugin`` and ``PluginManager``; built-ins ``alert`` (webhook) and ``metrics`` (exporter)."""

from __future__ import annotations

from celery_ext.plugins.base import Plugin, PluginContext
from celery_ext.plugins.manager import PluginManager

__all__ = ["Plugin", "PluginContext", "PluginManager"]
