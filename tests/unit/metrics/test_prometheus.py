"""Metric names and labels of the prometheus collector, and where producers count."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from celery_ext.config import parse_config
from celery_ext.metrics.prometheus import PrometheusMetrics
from celery_ext.runtime import runtime_of


def test_names_and_bounded_labels(monkeypatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    m = PrometheusMetrics()
    m.task_created("echo")
    m.task_completed("echo", "succeeded", 0.2)
    m.task_completed("echo", "failed", 0.1)
    m.task_failed("echo", "bad reason/with spaces" + "x" * 100)
    m.worker_registered("w1")
    m.worker_load("w1", 3)
    m.queue_length("app.echo", 7)
    m.scheduler_election(True)
    body, content_type = m.exposition()
    assert content_type.startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(body.decode())
        for s in f.samples
    }
    assert samples[("celery_ext_task_created_total", (("task_type", "echo"),))] == 1
    assert samples[("celery_ext_task_duration_seconds_count", (("status", "succeeded"), ("task_type", "echo")))] == 1
    reason = "bad_reason_with_spaces" + "x" * 42
    assert samples[("celery_ext_task_failed_total", (("reason", reason), ("task_type", "echo")))] == 1
    assert samples[("celery_ext_worker_online", (("worker", "w1"),))] == 1
    assert samples[("celery_ext_worker_load", (("worker", "w1"),))] == 3
    assert samples[("celery_ext_queue_length", (("queue", "app.echo"),))] == 7
    assert samples[("celery_ext_scheduler_is_leader", ())] == 1
    m.worker_offline("w1")
    assert b'celery_ext_worker_online{worker="w1"} 0.0' in m.exposition()[0]


def test_producers_count_for_the_cluster_in_its_redis_else_in_the_process(tmp_path, monkeypatch) -> None:
    from celery_ext.factory import create_app

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)

    def collector(broker: str, **scheduler: str) -> PrometheusMetrics:
        config = parse_config(
            {
                "app": {"name": "cm", "data_dir": str(tmp_path)},
                "broker": {"url": broker},
                "scheduler": scheduler,
                "plugins": [{"name": "metrics"}],
            }
        )
        m = runtime_of(create_app(config)).metrics  # type: ignore[attr-defined]
        assert isinstance(m, PrometheusMetrics)
        return m

    on_redis = collector("redis://127.0.0.1:6379/0")
    assert on_redis.cluster is not None and on_redis.cluster.key("task_created") == "cm.metrics.task_created"
    registry = collector("amqp://guest:guest@127.0.0.1:5672//", registry_url="redis://127.0.0.1:6379/1")
    assert registry.cluster is not None
    # No Redis at all: counted in the process, as the fallback documented in docs/metrics.md.
    alone = collector("amqp://guest:guest@127.0.0.1:5672//")
    assert alone.cluster is None
    alone.task_created("echo")
    assert b'celery_ext_task_created_total{task_type="echo"} 1.0' in alone.exposition()[0]
