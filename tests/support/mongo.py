"""A real MongoDB wire-protocol server for tests: ``nx-27017`` (in-memory) on a free port.

``mongo_server`` (session) starts one server; ``mongo_url`` gives each caller its own database
on it.  A missing ``nx-27017`` skips locally and fails under ``CI=true``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.services import unique


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _binary() -> str | None:
    here = Path(sys.executable).parent / "nx-27017"
    return str(here) if here.exists() else shutil.which("nx-27017")


class MongoServer:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0, port: int | None = None) -> MongoServer:
        """Start on a free port, or on ``port`` (to come back where clients expect it)."""
        binary = _binary()
        if binary is None:
            message = "nx-27017 is not installed (pip install nx-27017)"
            if os.environ.get("CI") == "true":
                pytest.fail(message)
            pytest.skip(message)
        for _ in range(3):  # a port taken between probe and bind: pick another
            self.port = port or _free_port()
            self.proc = subprocess.Popen(
                [
                    binary,
                    "--db",
                    "memory",
                    "--host",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "--log-file",
                    str(self.directory / "nx.log"),
                    "--pid-file",
                    str(self.directory / "nx.pid"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            if self._wait_ready(timeout):
                return self
            self.stop()
        raise RuntimeError(f"nx-27017 did not start; log:\n{self.log()[-3000:]}")

    def _wait_ready(self, timeout: float) -> bool:
        import pymongo

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                client = pymongo.MongoClient(self.url, serverSelectionTimeoutMS=300)
                client.admin.command("ping")
                client.close()
                return True
            except pymongo.errors.PyMongoError:
                time.sleep(0.05)
        return False

    def log(self) -> str:
        try:
            return (self.directory / "nx.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MongoServer]:
    server = MongoServer(tmp_path_factory.mktemp("mongo")).start()
    yield server
    server.stop()


def database_url(server: MongoServer) -> str:
    """A fresh database (a new name) on ``server``."""
    return f"{server.url}/{unique('ce_')}"
