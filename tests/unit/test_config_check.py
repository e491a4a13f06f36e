"""One validation for everything (issue 11): the design's config.yaml as written, every error in
one run, suggestions for unknown keys, names and task types."""

from __future__ import annotations

from pathlib import Path

import pytest

from celery_ext.config import load_config, parse_config
from celery_ext.config_check import check_config, check_file
from celery_ext.errors import ConfigError

DESIGN = Path(__file__).parents[1] / "fixtures" / "design_config.yaml"


def test_the_design_config_validates_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DB_PASSWORD", raising=False)
    report = check_file(DESIGN)
    assert report.errors == []
    # send_email is the users' own type: no configured executor provides it, so a warning only.
    assert len(report.warnings) == 1 and "worker.supported_types[0]" in report.warnings[0]
    assert "'send_email'" in report.warnings[0]
    config = load_config(DESIGN)
    assert report.config == config
    assert config.app.version == "1.0.0"
    assert config.scheduler.enabled and config.worker.enabled
    assert config.scheduler.interval == 5.0  # scan_interval is an alias of interval
    kafka = next(e for e in config.executors if e.type == "kafka")
    from celery_ext.executors.kafka import KafkaExecutor

    settings = KafkaExecutor.parse_settings(kafka.config)
    assert settings.brokers == ["kafka-1:9092", "kafka-2:9092", "kafka-3:9092"]  # type: ignore[attr-defined]


def test_design_keys() -> None:
    config = parse_config(
        {
            "app": {"version": 2.1},
            "scheduler": {"enabled": False, "scan_interval": "250ms"},
            "worker": {"enabled": False},
        }
    )
    assert config.app.version == "2.1" and config.scheduler.interval == 0.25
    assert not config.scheduler.enabled and not config.worker.enabled
    with pytest.raises(ConfigError) as both:
        parse_config({"scheduler": {"scan_interval": "1s", "interval": "2s"}})
    assert both.value.errors == ["scheduler: scan_interval is an alias of interval: give one of them (got both)"]


def test_every_error_in_one_run_with_suggestions() -> None:
    report = check_config(
        {
            "worker": {"capasity": 2},
            "executors": [
                {"type": "pyhton"},
                {"type": "http", "config": {"allow_hostz": ["a.example.com"]}},
                {"type": "python", "enabeld": True},
            ],
            "plugins": [{"name": "alrt"}, {"name": "alert", "config": {"webhook_url": "ftp://hooks.example.com"}}],
            "scheduler": {"load_balance_strategy": "weighted_round_robbin"},
            "storage": {"type": "postgress"},
        },
        env={},
    )
    assert report.config is None
    # (the known names depend on what is installed here: entry points add to them)
    assert [e.split(" (known: ")[0] for e in report.errors] == [
        "worker.capasity: unknown key; did you mean 'capacity'?",
        "executors[2].enabeld: unknown key; did you mean 'enabled'?",
        "executors[0].type: no executor 'pyhton'; did you mean 'python'?",
        "executors[1].config.allow_hostz: unknown key; did you mean 'allow_hosts'?",
        "plugins[0].name: no plugin 'alrt'; did you mean 'alert'?",
        "plugins[1].config.webhook_url: does not match ^https?:// (got 'ftp://hooks.example.com')",
        "scheduler.load_balance_strategy: no load balancer 'weighted_round_robbin'; did you mean "
        "'weighted_round_robin'?",
        "storage.type: no storage backend 'postgress'; did you mean 'postgresql'?",
    ]


def test_balancer_settings_events_and_metrics_are_checked() -> None:
    report = check_config(
        {
            "scheduler": {"load_balance_strategy": "consistent_hash", "load_balance_config": {"replica": 3}},
            "events": {"type": "kombu", "config": {"lingr": 1}},
            "metrics": {"type": "prometheus", "config": {"buckets": "fast"}},
        },
        env={},
    )
    assert "scheduler.load_balance_config.replica: unknown key; did you mean 'replicas'?" in report.errors
    assert any(e.startswith("events.config.lingr: unknown key") for e in report.errors)
    assert any(e.startswith("metrics.config.buckets:") for e in report.errors)
    assert len(report.errors) == 3


def test_a_section_that_fails_is_checked_with_its_defaults_and_the_rest_still_is() -> None:
    report = check_config(
        {"worker": {"capacity": 0}, "app": {"name": "bad name!"}, "plugins": [{"name": "nope"}]}, env={"X": "1"}
    )
    assert report.errors[0] == "app.name: does not match ^[A-Za-z0-9_.-]+$ (got 'bad name!')"
    assert "worker.capacity: must be >= 1 (got 0)" in report.errors
    assert any(e.startswith("plugins[0].name: no plugin 'nope'") for e in report.errors)


def test_missing_environment_variables_are_reported_with_the_rest() -> None:
    report = check_config({"storage": {"config": {"password": "${NOPE}"}}, "worker": {"colour": 1}}, env={})
    assert report.errors[0] == "storage.config.password: environment variable NOPE is not set"
    assert "worker.colour: unknown key" in report.errors
    assert report.config is None


def test_supported_types_no_executor_provides_are_warnings_with_a_suggestion() -> None:
    report = check_config(
        {
            "worker": {"supported_types": ["send_emial", "echo", "zzz"]},
            "executors": [{"type": "python", "config": {"task_types": ["send_email"]}}],
        },
        env={},
    )
    assert report.errors == []
    lines = [w for w in report.warnings if w.startswith("worker.supported_types")]
    assert len(lines) == 2
    assert (
        "worker.supported_types[0]: no configured executor provides 'send_emial'; did you mean 'send_email'?"
        in lines[0]
    )
    assert lines[1].startswith("worker.supported_types[2]: no configured executor provides 'zzz' (")


def test_disabled_entries_warn_and_duplicate_plugin_names_are_errors() -> None:
    report = check_config(
        {
            "executors": [{"type": "python"}, {"type": "kafka", "enabled": False, "config": {"brokers": "nohost"}}],
            "plugins": [
                {"name": "alert", "config": {"webhook_url": "https://a.example.com"}},
                {"name": "alert", "config": {"webhook_url": "https://b.example.com"}},
                {"name": "metrics", "enabled": False, "config": {"prometheus_port": -1}},
            ],
        },
        env={},
    )
    assert report.errors == [
        "plugins[1].name: a plugin named 'alert' is already given by plugins[0]; a worker runs only the first"
    ]
    assert "executors[1].config.brokers: expected host:port (got 'nohost') (the entry is disabled)" in report.warnings
    assert any(
        w.startswith("plugins[2].config.prometheus_port: must be >= 0") and w.endswith("(the entry is disabled)")
        for w in report.warnings
    )


def test_a_task_type_claimed_twice_is_an_error() -> None:
    report = check_config({"executors": [{"type": "http"}, {"type": "http"}]}, env={})
    assert any("task type" in e and "claimed by both" in e for e in report.errors)


def test_unreadable_and_non_mapping_files(tmp_path: Path) -> None:
    assert (
        check_file(tmp_path / "missing.yaml").errors[0].endswith("cannot read config file (No such file or directory)")
    )
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n")
    assert check_file(listed).errors == ["(top level): expected a mapping of sections (got list)"]


def test_the_repository_examples_stay_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    root = Path(__file__).parents[2]
    assert check_file(root / "config.yaml").errors == []
    monkeypatch.setenv("DB_PASSWORD", "x")
    assert check_file(root / "deploy" / "config.production.yaml").errors == []
