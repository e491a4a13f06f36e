"""PluginManager: order, isolation, loading entries."""

from __future__ import annotations

import pytest

from celery_ext.config import PluginEntry
from celery_ext.errors import ConfigError
from celery_ext.plugins import Plugin, PluginContext, PluginManager
from tests.support.plugins import plugin_context


class Recorder(Plugin):
    def __init__(self, name: str, log: list[str], fail: str = "") -> None:
        super().__init__()
        self.name, self.log, self.fail = name, log, fail  # type: ignore[misc]

    def start(self, ctx: PluginContext) -> None:
        if self.fail == "start":
            raise RuntimeError("no")
        self.log.append(f"start {self.name}")

    def stop(self, ctx: PluginContext) -> None:
        self.log.append(f"stop {self.name}")
        if self.fail == "stop":
            raise RuntimeError("no")


def test_start_in_order_stop_in_reverse_and_failures_are_isolated() -> None:
    log: list[str] = []
    pm = PluginManager()
    for name, fail in (("a", ""), ("b", "start"), ("c", "stop"), ("d", "")):
        pm.register(Recorder(name, log, fail))
    with pytest.raises(ConfigError, match="plugin named 'a' is already registered"):
        pm.register(Recorder("a", log))
    c = plugin_context()
    pm.start_all(c)
    assert pm.running == ["a", "c", "d"]
    assert pm.failures == {"b": "start: RuntimeError: no"}
    pm.stop_all(c)
    # b failed to start: it is stopped at once (to release what it opened), never again
    assert log == ["start a", "stop b", "start c", "start d", "stop d", "stop c", "stop a"]
    assert pm.failures["c"] == "stop: RuntimeError: no"
    assert pm.get("d") is not None and pm.get("zz") is None


def test_load_reports_unknown_and_invalid_plugins_without_raising() -> None:
    pm = PluginManager()
    pm.load(
        [
            PluginEntry(name="alrt"),
            PluginEntry(name="alert", config={"webhook_url": "ftp://x"}),
            PluginEntry(name="metrics", enabled=False),
            PluginEntry(name="metrics", config={"bind": "0.0.0.0"}),
        ]
    )
    assert "did you mean 'alert'" in pm.failures["alrt"]
    assert "plugins[1].config.webhook_url" in pm.failures["alert"]
    assert pm.names == ["metrics"] and pm.get("metrics").settings.bind == "0.0.0.0"


def test_an_invalid_entry_never_disables_a_valid_one_of_the_same_name() -> None:
    # Review bug (issue 11): two entries named "alert", one valid, disabled both.
    pm = PluginManager()
    pm.load(
        [
            PluginEntry(name="alert", config={"webhook_url": "ftp://x"}),
            PluginEntry(name="alert", config={"webhook_url": "http://127.0.0.1:9/hook"}),
        ]
    )
    assert pm.names == ["alert"] and pm.get("alert").settings.webhook_url == "http://127.0.0.1:9/hook"
    # The failure stays reported, under its entry, since a plugin of that name runs.
    assert list(pm.failures) == ["alert (plugins[0])"]
    assert "plugins[0].config.webhook_url" in pm.failures["alert (plugins[0])"]
    assert_runs_only(pm, ["alert"])


def test_a_second_entry_of_a_loaded_name_is_refused_and_the_first_runs() -> None:
    pm = PluginManager()
    pm.load(
        [
            PluginEntry(name="alert", config={"webhook_url": "http://127.0.0.1:9/first"}),
            PluginEntry(name="alert", config={"webhook_url": "http://127.0.0.1:9/second"}),
        ]
    )
    assert pm.get("alert").settings.webhook_url == "http://127.0.0.1:9/first"
    assert "already loaded from plugins[0]" in pm.failures["alert (plugins[1])"]
    assert_runs_only(pm, ["alert"])


def assert_runs_only(pm: PluginManager, names: list[str]) -> None:
    """Started, exactly ``names`` run; then stopped."""
    c = plugin_context()
    pm.start_all(c)
    try:
        assert pm.running == names
    finally:
        pm.stop_all(c)
