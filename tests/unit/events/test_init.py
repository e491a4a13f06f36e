"""``build_event_bus``: the transport named by ``events.type``."""

from __future__ import annotations

import pytest

from celery_ext.config import Config, parse_config
from celery_ext.errors import ConfigError
from celery_ext.events import Transport, build_event_bus
from celery_ext.events.local import LocalTransport
from celery_ext.events.redis import RedisTransport


def test_build_event_bus_names_and_errors() -> None:
    assert isinstance(build_event_bus(Config(), "redis://x").transport, LocalTransport)
    cfg = parse_config({"events": {"type": "redis"}})
    assert isinstance(build_event_bus(cfg, "redis://127.0.0.1:6379/0").transport, RedisTransport)
    with pytest.raises(ConfigError, match="events.type: no event bus 'kombo'; did you mean 'kombu'"):
        build_event_bus(parse_config({"events": {"type": "kombo"}}), "redis://x")
    with pytest.raises(ConfigError, match="events.config.url: the redis event bus needs a Redis URL"):
        build_event_bus(cfg, "amqp://guest@localhost//")
    with pytest.raises(ConfigError, match="events.config.maxlen"):
        build_event_bus(parse_config({"events": {"type": "redis", "config": {"maxlen": 0}}}), "redis://x")
    assert issubclass(LocalTransport, Transport)
