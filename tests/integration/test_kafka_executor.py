"""The kafka executor against a real Kafka-protocol broker (tansu) and real worker processes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from celery_ext.errors import ConfigError, PermanentError
from celery_ext.executors.kafka import KafkaExecutor
from celery_ext.model import Task, TaskStatus
from tests.support import kafka as kafka_support
from tests.support.kafka import TansuBroker, consume

tansu = kafka_support.tansu  # the broker fixture

pytestmark = pytest.mark.timeout(120)


def kafka_entry(broker: TansuBroker, **extra: Any) -> dict[str, Any]:
    config = {"brokers": [broker.bootstrap], "allow_topics": ["orders", "events.*"], "delivery_timeout": "2s", **extra}
    return {"type": "kafka", "config": config}


def test_delivers_messages_with_keys_and_headers(make_cluster, tansu: TansuBroker) -> None:
    c = make_cluster(executors=[kafka_entry(tansu)])
    c.worker()
    t1 = c.manager.submit(
        "send_kafka_message",
        {"topic": "orders", "message": "plain text", "key": "order-1", "headers": {"source": "test"}},
    )
    t2 = c.manager.submit("publish_event", {"topic": "events.user", "message": {"user": 7, "tags": ["a", "ü"]}})
    done = [c.manager.wait(t.task_id, 60) for t in (t1, t2)]
    assert [d.status for d in done] == [TaskStatus.SUCCEEDED, TaskStatus.SUCCEEDED], [d.error for d in done]
    assert done[0].result["topic"] == "orders"
    assert isinstance(done[0].result["partition"], int) and done[0].result["offset"] >= 0

    [m1] = consume(tansu.bootstrap, "orders", 1)
    assert (m1.value(), m1.key(), m1.headers()) == (b"plain text", b"order-1", [("source", b"test")])
    assert (m1.partition(), m1.offset()) == (done[0].result["partition"], done[0].result["offset"])
    [m2] = consume(tansu.bootstrap, "events.user", 1)
    assert json.loads(m2.value()) == {"user": 7, "tags": ["a", "ü"]}
    assert m2.key() is None


def test_refusals_fail_at_once_naming_the_problem(make_cluster, tansu: TansuBroker) -> None:
    c = make_cluster(executors=[kafka_entry(tansu, max_retries=3, max_message_bytes=1000)])
    c.worker()
    bad = [
        ({"topic": "secrets", "message": "x"}, "topic_not_allowed", "secrets"),
        ({"topic": "orders"}, "invalid_payload", "payload.message"),
        ({"topic": "orders", "message": "x", "headers": {"h": 1}}, "invalid_payload", "payload.headers.h"),
        ({"topic": "orders", "message": "x" * 2000}, "message_too_large", "max_message_bytes"),
    ]
    tasks = [c.manager.submit("send_kafka_message", payload) for payload, _, _ in bad]
    for task, (_, reason, needle) in zip(tasks, bad, strict=True):
        done = c.manager.wait(task.task_id, 30)
        assert done.status == TaskStatus.FAILED
        assert done.error.reason == reason
        assert needle in done.error.message
        assert done.attempt == 1  # permanent: never retried
    assert consume(tansu.bootstrap, "secrets", 1, timeout=3) == []


def test_broker_outage_fails_after_retries_then_recovers(make_cluster, tansu: TansuBroker) -> None:
    c = make_cluster(executors=[kafka_entry(tansu, delivery_timeout="1s", max_retries=1)])
    c.worker()
    warm = c.manager.submit("send_kafka_message", {"topic": "orders", "message": "before"})
    assert c.manager.wait(warm.task_id, 30).status == TaskStatus.SUCCEEDED

    tansu.stop()
    lost = [c.manager.submit("send_kafka_message", {"topic": "orders", "message": f"down {i}"}) for i in range(2)]
    for task in lost:
        done = c.manager.wait(task.task_id, 60)
        assert done.status == TaskStatus.FAILED
        assert done.error.reason == "delivery_timeout"
        assert "no delivery within 1s" in done.error.message
        assert done.attempt == 2  # the first attempt and one retry

    tansu.start()  # same port, empty broker
    back = [
        c.manager.submit("send_kafka_message", {"topic": "orders", "message": f"back {i}"}, max_retries=5)
        for i in range(3)
    ]
    results = [c.manager.wait(t.task_id, 60) for t in back]
    assert all(r.status == TaskStatus.SUCCEEDED for r in results), [r.error for r in results]
    values = sorted(m.value() for m in consume(tansu.bootstrap, "orders", 3))
    assert values == [b"back 0", b"back 1", b"back 2"]


def test_unusable_kafka_config_leaves_other_executors_running(make_cluster, tansu: TansuBroker) -> None:
    c = make_cluster(
        executors=[
            kafka_entry(tansu, producer={"no.such.librdkafka.setting": "1"}),
            {"type": "python"},
        ]
    )
    w = c.worker(concurrency=1)
    k1 = c.manager.submit("send_kafka_message", {"topic": "orders", "message": "x"}, max_retries=2)
    k2 = c.manager.submit("publish_event", {"topic": "orders", "message": "y"})
    echo = c.manager.submit("echo", {"still": "alive"})
    for task in (k1, k2):
        done = c.manager.wait(task.task_id, 30)
        assert done.status == TaskStatus.FAILED
        assert done.error.reason == "executor_unavailable"
        assert "no.such.librdkafka.setting" in done.error.message
    assert c.manager.wait(echo.task_id, 30).result == {"still": "alive"}
    # Logged once per process (one pool process here), not once per task.
    assert w.log().count("] executor 'kafka' failed to initialize") == 1


def test_settings_are_validated_with_paths() -> None:
    with pytest.raises(ConfigError) as err:
        KafkaExecutor.parse_settings({"brokers": ["nohost"], "producer": {"acks": "1"}}, "executors[0].config")
    text = str(err.value)
    assert "executors[0].config.brokers: expected host:port" in text
    assert "executors[0].config.producer: acks: must stay 'all'" in text


def test_executor_runs_without_a_worker(tansu: TansuBroker) -> None:
    ex = KafkaExecutor(KafkaExecutor.parse_settings({"brokers": [tansu.bootstrap], "allow_topics": ["*"]}))
    ex.initialize(ex.settings)
    try:
        result = ex.execute(Task("t1", "send_kafka_message", {"topic": "direct", "message": [1, 2]}))
        assert result.success and result.data["topic"] == "direct"
        with pytest.raises(PermanentError) as err:
            ex.execute(Task("t2", "send_kafka_message", {"topic": "bad topic!", "message": "x"}))
        assert err.value.reason == "invalid_payload" and "payload.topic" in str(err.value)
    finally:
        ex.close()
    assert [json.loads(m.value()) for m in consume(tansu.bootstrap, "direct", 1)] == [[1, 2]]
