"""The ``kafka`` executor: task types ``send_kafka_message`` and ``publish_event``.

One idempotent confluent-kafka ``Producer`` per worker process (``acks=all``,
``enable.idempotence``); a task succeeds only once its delivery report arrives.

Config keys (besides ``timeout`` and ``max_retries``):
  brokers           ``host:port`` list, or one comma-separated string (required)
  allow_topics      topics this executor may write; shell wildcards (``orders.*``) allowed.
                    Empty (the default) allows none.
  delivery_timeout  duration: how long to wait for the delivery report (librdkafka
                    ``message.timeout.ms``), default 30s; running out is a retried failure
  max_message_bytes largest serialized message accepted, default 1 MiB
  producer          other librdkafka settings passed through (``sasl.password: ${KAFKA_PW}``...);
                    ``acks`` and ``enable.idempotence`` cannot be weakened

Payload: ``topic``, ``message`` (a string is sent as is, any other JSON value is serialized),
optional ``key`` (string) and ``headers`` (string -> string).  Result: ``topic``, ``partition``,
``offset``.  Reason codes: ``invalid_payload``, ``topic_not_allowed``, ``message_too_large``,
``delivery_timeout``, ``broker_unavailable``, ``producer_fatal``, ``delivery_failed``.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import threading
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, field_validator

from celery_ext.config import PositiveDuration, format_errors
from celery_ext.errors import ConfigError, PermanentError, TransientError
from celery_ext.executors.base import Executor, ExecutorSettings
from celery_ext.model import Task, TaskResult

logger = logging.getLogger(__name__)

# Settings that would silently break the delivery guarantee this executor promises.
_PINNED = {"acks": "all", "enable.idempotence": True}
_TOPIC_CHARS = r"^[A-Za-z0-9._-]{1,249}$"


class KafkaSettings(ExecutorSettings):
    brokers: list[str] = Field(min_length=1)
    allow_topics: list[str] = Field(default_factory=list)
    delivery_timeout: PositiveDuration = 30.0
    max_message_bytes: int = Field(1024 * 1024, ge=1)
    producer: dict[str, Any] = Field(default_factory=dict)

    @field_validator("brokers", mode="before")
    @classmethod
    def _split(cls, brokers: Any) -> Any:
        # "kafka-1:9092,kafka-2:9092", as librdkafka's bootstrap.servers is written
        return [b.strip() for b in brokers.split(",") if b.strip()] if isinstance(brokers, str) else brokers

    @field_validator("brokers")
    @classmethod
    def _host_port(cls, brokers: list[str]) -> list[str]:
        for b in brokers:
            host, sep, port = b.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"expected host:port (got {b!r})")
        return brokers

    @field_validator("producer")
    @classmethod
    def _not_weakened(cls, producer: dict[str, Any]) -> dict[str, Any]:
        for key, value in producer.items():
            if key in ("bootstrap.servers", "message.timeout.ms", "delivery.timeout.ms"):
                raise ValueError(f"{key}: set it with brokers / delivery_timeout instead")
            if key in _PINNED and str(value).lower() not in (str(_PINNED[key]).lower(), "-1"):
                raise ValueError(f"{key}: must stay {_PINNED[key]!r} (idempotent delivery)")
        return producer


class KafkaPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    topic: StrictStr = Field(pattern=_TOPIC_CHARS)
    message: Any = Field(...)
    key: StrictStr | None = None
    headers: dict[str, StrictStr] = Field(default_factory=dict)


def parse_payload(payload: dict[str, Any]) -> KafkaPayload:
    try:
        return KafkaPayload.model_validate(payload)
    except ValidationError as exc:
        raise PermanentError("invalid_payload", "; ".join(format_errors(exc, "payload"))) from None


def serialize(message: Any) -> bytes:
    if isinstance(message, str):
        return message.encode()
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()


class KafkaExecutor(Executor):
    type = "kafka"
    settings_model = KafkaSettings

    def __init__(self, settings: ExecutorSettings | None = None) -> None:
        if settings is None:
            raise ConfigError("executors[kafka].config.brokers: required")
        super().__init__(settings)
        assert isinstance(self.settings, KafkaSettings)
        self.config: KafkaSettings = self.settings
        self._producer: Any = None
        self._lock = threading.Lock()

    @property
    def supported_task_types(self) -> list[str]:
        return ["send_kafka_message", "publish_event"]

    def producer_config(self) -> dict[str, Any]:
        return {
            # Reconnect soon after a broker comes back (librdkafka's default backs off up to 10s).
            "reconnect.backoff.max.ms": 1000,
            # Each task waits for its own delivery report: a batching delay is pure latency.
            "linger.ms": 0,
            **self.config.producer,
            "bootstrap.servers": ",".join(self.config.brokers),
            "message.timeout.ms": max(1, int(self.config.delivery_timeout * 1000)),
            **_PINNED,
            # librdkafka logs through Python logging, so its lines reach the worker log.
            "logger": logging.getLogger("celery_ext.executors.kafka.librdkafka"),
        }

    def initialize(self, config: ExecutorSettings) -> None:
        try:
            from confluent_kafka import Producer
        except ImportError as exc:
            raise ConfigError("the kafka executor needs confluent-kafka: pip install celery-ext[kafka]") from exc
        # An invalid librdkafka setting raises here; an unreachable broker does not (its tasks retry).
        self._producer = Producer(self.producer_config())

    def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            left = producer.flush(min(5.0, self.config.delivery_timeout))
            if left:
                logger.warning("kafka producer closed with %d undelivered messages", left)

    def allowed(self, topic: str) -> bool:
        return any(fnmatch.fnmatchcase(topic, pattern) for pattern in self.config.allow_topics)

    def execute(self, task: Task) -> TaskResult:
        p = parse_payload(task.payload)
        if not self.allowed(p.topic):
            raise PermanentError("topic_not_allowed", f"topic {p.topic!r} is not in allow_topics")
        value = serialize(p.message)
        if len(value) > self.config.max_message_bytes:
            raise PermanentError(
                "message_too_large",
                f"message is {len(value)} bytes; max_message_bytes is {self.config.max_message_bytes}",
            )
        msg = self._send(p.topic, value, p.key, p.headers)
        logger.info("delivered to %s [%d] at offset %d", msg.topic(), msg.partition(), msg.offset())
        return TaskResult.ok({"topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset()})

    def _send(self, topic: str, value: bytes, key: str | None, headers: dict[str, str]) -> Any:
        from confluent_kafka import KafkaException

        producer = self._producer
        if producer is None:
            raise TransientError("broker_unavailable", "the kafka producer is closed")
        done = threading.Event()
        report: dict[str, Any] = {}

        def on_delivery(err: Any, msg: Any) -> None:
            report.update(err=err, msg=msg)
            done.set()

        try:
            producer.produce(topic, value, key=key, headers=list(headers.items()) or None, on_delivery=on_delivery)
        except BufferError as exc:
            raise TransientError("broker_unavailable", f"producer queue is full: {exc}") from exc
        except KafkaException as exc:
            raise self._error(exc.args[0], producer) from exc
        # The report always comes within message.timeout.ms; the grace covers the poll loop.
        deadline = time.monotonic() + self.config.delivery_timeout + 5.0
        while not done.is_set():
            if time.monotonic() > deadline:
                raise TransientError("delivery_timeout", "no delivery report in time")
            try:
                producer.poll(0.05)
            except KafkaException as exc:
                raise self._error(exc.args[0], producer) from exc
        if report["err"] is not None:
            raise self._error(report["err"], producer)
        return report["msg"]

    def _error(self, err: Any, producer: Any) -> Exception:
        """Map a librdkafka error to a retried or a permanent failure."""
        from confluent_kafka import KafkaError

        text = f"{err.name()}: {err.str()}"
        if err.fatal():
            # An idempotent producer cannot go on after a fatal error: start a new one for the retry.
            self._renew_producer(producer)
            return TransientError("producer_fatal", f"kafka producer failed ({text}); replaced, will retry")
        code = err.code()
        if code == KafkaError._MSG_TIMED_OUT:
            # A broker that restarted without its producer-id state can leave an idempotent
            # producer bumping epochs forever; a fresh producer (new id) recovers at once.
            self._renew_producer(producer)
            return TransientError("delivery_timeout", f"no delivery within {self.config.delivery_timeout:g}s ({text})")
        if code in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT) or err.retriable():
            return TransientError("broker_unavailable", text)
        if code == KafkaError.MSG_SIZE_TOO_LARGE:
            return PermanentError("message_too_large", text)
        return PermanentError("delivery_failed", text)

    def _renew_producer(self, failed: Any) -> None:
        with self._lock:
            if self._producer is not failed:
                return  # another thread already replaced it
            self._producer = None
            try:
                failed.purge()
            except Exception:  # noqa: BLE001 - a broken producer may refuse; it is dropped anyway
                logger.debug("purge of the replaced producer failed", exc_info=True)
            try:
                self.initialize(self.config)
            except Exception:  # noqa: BLE001 - the next task reports the broken producer
                logger.exception("could not create a new kafka producer")
