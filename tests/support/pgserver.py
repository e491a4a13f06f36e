"""A private PostgreSQL server for fault tests: its own data directory, on a free port, that a
test may stop and start again (never the shared server on 5432).  initdb and postgres refuse to
run as root, so both run as the ``postgres`` system user when the tests run as root."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from tests.support.scrape import free_port
from tests.support.services import port_open


def _bin_dir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    return os.path.dirname(found[-1]) if found else None


class PrivatePostgres:
    def __init__(self) -> None:
        bin_dir = _bin_dir()
        assert bin_dir is not None
        self.bin_dir = bin_dir
        self.port = free_port()
        # Under /tmp, not pytest's tmp_path: the postgres user must be able to reach it.
        self.directory = tempfile.mkdtemp(prefix="private-pg-")
        self.data = os.path.join(self.directory, "data")
        self.proc: subprocess.Popen[bytes] | None = None
        self._as: list[str] = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self.directory, "postgres", "postgres")
        subprocess.run(
            [*self._as, f"{bin_dir}/initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
            timeout=120,
        )

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        log = open(os.path.join(self.directory, "server.log"), "ab")  # noqa: SIM115 - the server's
        self.proc = subprocess.Popen(
            [
                *self._as,
                f"{self.bin_dir}/postgres",
                "-D",
                self.data,
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={self.directory}",
                "-c",
                "fsync=off",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 60
        while not port_open("127.0.0.1", self.port):
            assert self.proc.poll() is None, f"private postgres exited: {self.log()[-2000:]}"
            assert time.monotonic() < deadline, "private postgres did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        """A fast shutdown (SIGINT to the postmaster): clients are disconnected at once."""
        if self.proc is not None and self.proc.poll() is None:
            with open(os.path.join(self.data, "postmaster.pid")) as f:
                postmaster = int(f.readline())  # not runuser's pid: signal the server itself
            os.kill(postmaster, signal.SIGINT)
            self.proc.wait(60)
        self.proc = None

    def log(self) -> str:
        try:
            with open(os.path.join(self.directory, "server.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def destroy(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    if _bin_dir() is None:
        pytest.skip("no PostgreSQL server binaries")
    server = PrivatePostgres()
    server.start()
    yield server
    server.destroy()
