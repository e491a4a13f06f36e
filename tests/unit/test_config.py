from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from celery_ext.config import (
    Config,
    ConfigLoader,
    YamlConfigLoader,
    find_config_file,
    load_config,
    loader_for,
    parse_config,
    parse_duration,
)
from celery_ext.config_store import RedisConfigLoader
from celery_ext.errors import ConfigError
from tests.support.workers import write_config


def errors_of(data: object, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, env=env or {})
    return info.value.errors


def test_defaults_are_valid() -> None:
    config = parse_config(None, env={})
    assert config == Config()
    assert config.worker.capacity >= 1
    assert [e.type for e in config.executors] == ["python"]
    assert config.storage.type == "sqlite"
    assert config.broker.url is None


def test_error_names_yaml_path_and_value() -> None:
    assert errors_of({"worker": {"capacity": 0}}) == ["worker.capacity: must be >= 1 (got 0)"]


def test_unknown_keys_are_errors_not_ignored() -> None:
    errs = errors_of({"worker": {"capacity": 2, "capasity": 3}, "bogus": {}})
    assert "worker.capasity: unknown key; did you mean 'capacity'?" in errs
    assert "bogus: unknown key" in errs  # nothing close: no suggestion


def test_list_entries_are_indexed() -> None:
    errs = errors_of({"executors": [{"type": "python"}, {"enabled": True}], "plugins": [{"name": "x", "enabeld": 1}]})
    assert "executors[1].type: required" in errs
    assert "plugins[0].enabeld: unknown key; did you mean 'enabled'?" in errs


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("100ms", 0.1),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("2d", 172800.0),
        (7, 7.0),
        (0.5, 0.5),
        ("1.5s", 1.5),
        ("12", 12.0),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_bad_duration_names_path() -> None:
    errs = errors_of({"worker": {"heartbeat_interval": "fast"}})
    assert errs == ["worker.heartbeat_interval: expected a duration such as 100ms, 30s or 5m (got 'fast')"]


def test_env_interpolation_with_default_and_missing() -> None:
    data = {"broker": {"url": "redis://${HOST}:${PORT:-6379}/0"}, "app": {"name": "${NAME:-svc}"}}
    config = parse_config(data, env={"HOST": "10.0.0.5"})
    assert config.broker.url == "redis://10.0.0.5:6379/0"
    assert config.app.name == "svc"
    errs = errors_of({"storage": {"config": {"password": "${DB_PASSWORD}"}}})
    assert errs == ["storage.config.password: environment variable DB_PASSWORD is not set"]


def test_env_values_are_typed_by_the_model() -> None:
    config = parse_config({"worker": {"capacity": "${CAP}"}}, env={"CAP": "8"})
    assert config.worker.capacity == 8


def test_yaml_is_safe_loaded(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("app: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path)


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CELERY_EXT_CONFIG", raising=False)
    assert find_config_file() is None
    (tmp_path / "config.yaml").write_text("worker: {capacity: 3}\n")
    assert find_config_file() == Path("config.yaml")
    env_file = tmp_path / "env.yaml"
    env_file.write_text("worker: {capacity: 5}\n")
    monkeypatch.setenv("CELERY_EXT_CONFIG", str(env_file))
    assert load_config().worker.capacity == 5
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text("worker: {capacity: 7}\n")
    assert load_config(explicit).worker.capacity == 7


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")


def test_data_dir_is_relative_to_config_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("app: {data_dir: data}\n")
    assert load_config(path).data_dir == tmp_path / "data"


def test_example_config_is_valid() -> None:
    example = Path(__file__).parents[2] / "config.yaml"
    config = load_config(example)
    assert {e.type for e in config.executors} >= {"python"}


def test_watch_reports_valid_changes_and_keeps_last_good(tmp_path: Path) -> None:
    import os
    import threading

    path = tmp_path / "config.yaml"
    path.write_text("worker: {capacity: 2}\n")
    seen: list[int] = []
    changed = threading.Event()

    def on_change(config: Config) -> None:
        seen.append(config.worker.capacity)
        changed.set()

    stop = YamlConfigLoader(path, poll_interval=0.02).watch(on_change)
    try:
        path.write_text("worker: {capacity: 0}\n")  # invalid: ignored
        os.utime(path, (1, 1))
        path.write_text("worker: {capacity: 6}\n")
        os.utime(path, (1, 1))  # the same mtime, as two edits within one second on a coarse filesystem
        assert changed.wait(5)
        changed.clear()
        path.write_text("worker: {capacity: 7}\n")
        os.utime(path, (1, 1))
        assert changed.wait(5)
    finally:
        stop()
    assert seen[-2:] == [6, 7] and 0 not in seen


def test_production_example_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_PASSWORD", "x")
    config = load_config(Path(__file__).parents[2] / "deploy" / "config.production.yaml")
    assert config.storage.type == "postgresql" and config.storage.config["password"] == "x"


def test_the_location_chooses_the_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path, {"worker": {"capacity": 2}})
    assert isinstance(loader_for(path), YamlConfigLoader)
    assert loader_for(f"file://{path}").load().worker.capacity == 2
    keyed = loader_for("redis://:secret@localhost:6379/2#shop.config")
    assert isinstance(keyed, RedisConfigLoader) and keyed.key == "shop.config"
    assert keyed.source == "redis://:**@localhost:6379/2#shop.config"  # never the password
    assert isinstance(loader_for("redis://localhost:6379/0"), RedisConfigLoader)
    monkeypatch.setenv("CELERY_EXT_CONFIG", "rediss://localhost:6380/0#k")
    assert isinstance(loader_for(None), RedisConfigLoader)
    with pytest.raises(ConfigError, match=r"no config loader 'http'.*known: file, redis, rediss, unix"):
        loader_for("http://example.com/config.yaml")


class DictLoader(ConfigLoader):
    """A loader is ``read`` alone: load and watch come from the base class."""

    def __init__(self, location: str, poll_interval: float = 1.0) -> None:
        super().__init__(location, poll_interval)
        self.data: dict[str, Any] = {"worker": {"capacity": 1}}
        self.etag = "1"

    def read(self) -> tuple[Any, str]:
        return self.data, self.etag


def test_a_loader_needs_only_read() -> None:
    loader = DictLoader("memory://", poll_interval=0.02)
    assert loader.load().worker.capacity == 1
    got: list[int] = []
    done = threading.Event()
    stop = loader.watch(lambda c: (got.append(c.worker.capacity), done.set()))
    try:
        loader.data, loader.etag = {"worker": {"capacity": 0}}, "2"  # invalid: logged, not applied
        time.sleep(0.5)  # seen by many polls
        loader.data, loader.etag = {"worker": {"capacity": 9}}, "3"
        assert done.wait(5)
    finally:
        stop()
    assert got == [9]
