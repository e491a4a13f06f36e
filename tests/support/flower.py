"""A real ``celery -A celery_ext flower`` process on 127.0.0.1, and headless Chromium to look at it.

Flower runs against a test config (``CELERY_EXT_CONFIG``), on a free port, without its state file
(``--persistent=False``), with its JSON API open (``FLOWER_UNAUTHENTICATED_API=true``: Flower
refuses ``/api/*`` without authentication otherwise); no auth is configured, so the HTML pages
need none either.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.scrape import free_port
from tests.support.workers import subprocess_env

CHROMIUM = "/usr/bin/chromium"


class FlowerProcess:
    """``start()`` waits until Flower answers ``/healthcheck``; ``stop()`` sends SIGTERM."""

    def __init__(
        self,
        config_path: Path,
        *,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.config_path = config_path
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = config_path.parent / f"flower-{self.port}.log"
        self.args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "celery_ext",
            "flower",
            "--address=127.0.0.1",
            f"--port={self.port}",
            "--persistent=False",
            f"--db={config_path.parent / f'flower-{self.port}.db'}",
            "--inspect_timeout=2000",
            "--logging=info",
            *extra_args,
        ]
        self.env = subprocess_env(CELERY_EXT_CONFIG=str(config_path), FLOWER_UNAUTHENTICATED_API="true", **(env or {}))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> FlowerProcess:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.args, env=self.env, cwd=self.config_path.parent, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"flower exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"flower never answered on {self.url}:\n{self.log()[-4000:]}")
            time.sleep(0.2)
        return self

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthcheck", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=30, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", timeout=30, **kwargs)

    def tasks(self, **params: Any) -> dict[str, dict[str, Any]]:
        """``/api/tasks``: ``{task id: task}`` as Flower knows them (from the Celery events)."""
        response = self.get("/api/tasks", params=params)
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@contextmanager
def running_flower(config_path: Path, **kwargs: Any) -> Iterator[FlowerProcess]:
    flower = FlowerProcess(config_path, **kwargs).start()
    try:
        yield flower
    finally:
        flower.stop()


def require_chromium() -> str:
    """The Chromium binary; a missing one skips the test on a laptop but fails it under ``CI=true``
    (``.ci/run`` installs Debian's ``chromium``)."""
    path = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    if path:
        return path
    message = f"Chromium is not installed ({CHROMIUM}): apt-get install chromium chromium-driver"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI must install it)")
    pytest.skip(message)


def chromium(url: str, *args: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    """One headless Chromium run on ``url`` (``--dump-dom``, ``--screenshot=...``) with a throwaway
    profile and no network of its own; ``--virtual-time-budget`` lets the page's AJAX finish."""
    binary = require_chromium()
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        return subprocess.run(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                f"--user-data-dir={profile}",
                "--window-size=1280,900",
                "--virtual-time-budget=10000",
                *args,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
