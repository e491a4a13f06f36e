"""The Redis key config loader and ``config apply`` (real Redis)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import redis

from celery_ext.config import Config, config_version, loader_for, parse_config
from celery_ext.config_store import RedisConfigLoader, applied_config, apply_config, config_key
from celery_ext.errors import ConfigError
from tests.support.services import REDIS_HOST, REDIS_PORT, require, unique
from tests.support.workers import write_config

URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"


@pytest.fixture
def client() -> redis.Redis:
    require("Redis", REDIS_HOST, REDIS_PORT)
    return redis.Redis.from_url(URL)


def test_apply_then_load_from_the_key(tmp_path: Path, client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    app = unique("cfg")
    data = {"app": {"name": app}, "worker": {"capacity": 3, "weight": "${WEIGHT:-2}"}}
    path = write_config(tmp_path, data)
    config = parse_config(data)
    try:
        applied = apply_config(path, config, URL)
        assert applied.key == config_key(app) and applied.version == config_version(config)
        assert applied_config(client, applied.key) == applied
        # The tree is stored before interpolation: each process reads its own environment.
        assert json.loads(client.get(applied.key))["config"]["worker"]["weight"] == "${WEIGHT:-2}"
        monkeypatch.setenv("WEIGHT", "5")
        loaded = loader_for(f"{URL}#{applied.key}").load()
        assert (loaded.worker.capacity, loaded.worker.weight) == (3, 5)
        assert loaded.source == f"{URL}#{applied.key}" and loaded.data_dir == Path.cwd() / ".celery_ext"
    finally:
        client.delete(config_key(app))


def test_the_key_loader_names_what_is_wrong(client: redis.Redis) -> None:
    key = unique("cfg")
    with pytest.raises(ConfigError, match=rf"no config under key '{key}' \(`celery-ext config apply FILE`"):
        RedisConfigLoader(f"{URL}#{key}").load()
    client.set(key, "not json", ex=60)
    with pytest.raises(ConfigError, match=rf"the key '{key}' holds no config document"):
        RedisConfigLoader(f"{URL}#{key}").load()
    client.set(key, json.dumps({"version": "x", "config": {"worker": {"capacity": 0}}}), ex=60)
    with pytest.raises(ConfigError, match=r"worker.capacity: must be >= 1 \(got 0\)"):
        RedisConfigLoader(f"{URL}#{key}").load()
    with pytest.raises(ConfigError, match="cannot read the config key"):
        RedisConfigLoader("redis://127.0.0.1:1/0#k").load()


def test_the_key_loader_watches_new_versions(tmp_path: Path, client: redis.Redis) -> None:
    app = unique("cfg")
    seen: list[int] = []
    changed = threading.Event()

    def on_change(config: Config) -> None:
        seen.append(config.worker.capacity)
        changed.set()

    def apply(capacity: int) -> None:
        data = {"app": {"name": app}, "worker": {"capacity": capacity}}
        apply_config(write_config(tmp_path, data), parse_config(data), URL)

    apply(1)
    stop = RedisConfigLoader(f"{URL}#{config_key(app)}", poll_interval=0.05).watch(on_change)
    try:
        apply(4)
        assert changed.wait(5)
        assert seen == [4]
    finally:
        stop()
        client.delete(config_key(app))
