"""The alert plugin: dedupe, rate limit, signature and retries."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest

from celery_ext.errors import ConfigError
from celery_ext.events import Event
from celery_ext.plugins import PluginContext
from celery_ext.plugins.alert import AlertPlugin, sign
from tests.support.plugins import plugin_context
from tests.support.receiver import WebhookReceiver


def make_alert(url: str, **config: Any) -> tuple[AlertPlugin, PluginContext]:
    plugin = AlertPlugin()
    plugin.initialize({"webhook_url": url, "backoff": 0.01, **config})
    c = plugin_context()
    plugin.start(c)
    return plugin, c


def test_alert_dedupes_and_rate_limits_a_failure_storm() -> None:
    plugin, c = make_alert("http://127.0.0.1:9/never", max_per_window=3, window="1h")
    sent: list[dict[str, Any]] = []
    plugin._enqueue = lambda body: sent.append(body)  # type: ignore[method-assign]
    for i in range(10):
        plugin.on_event(Event("task_failed", f"t{i}"))
        plugin.on_event(Event("task_failed", f"t{i}"))  # the same task again: deduped
    assert [b["event"]["task_id"] for b in sent] == ["t0", "t1", "t2"]
    assert plugin.suppressed == 7
    plugin.stop(c)


def test_alert_retries_5xx_with_backoff_and_signs_the_body() -> None:
    receiver = WebhookReceiver(fail_first=2)
    try:
        plugin, c = make_alert(receiver.url, secret="k", max_retries=3)
        assert plugin.post({"event": Event("task_failed", "t1").to_dict()})
        assert receiver.attempts == 3 and len(receiver.calls) == 1
        call = receiver.calls[0]
        assert call["headers"]["x-celeryext-signature"] == sign("k", call["body"])
        assert sign("k", b"x") == "sha256=" + hmac.new(b"k", b"x", hashlib.sha256).hexdigest()
        plugin.stop(c)
    finally:
        receiver.close()


def test_alert_rejects_unknown_event_types() -> None:
    with pytest.raises(ConfigError, match="unknown event types"):
        AlertPlugin().initialize({"webhook_url": "http://x", "events": ["task_exploded"]})
