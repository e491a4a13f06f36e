"""Real ``celery -A celery_ext worker`` processes, started and stopped by tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.support.services import unique


def write_config(directory: Path, data: dict[str, Any], name: str = "config.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a child process that must import this repository's tests package."""
    root = str(Path(__file__).resolve().parents[2])
    hook = str(Path(__file__).resolve().parent / "sitehook")  # SIGUSR2 dumps stacks (see there)
    pythonpath = os.pathsep.join(p for p in (hook, root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": pythonpath, **extra}


class WorkerProcess:
    """One worker process; ``stop()`` sends SIGTERM (warm shutdown), ``kill()`` SIGKILL."""

    def __init__(
        self,
        config_path: Path,
        *,
        hostname: str | None = None,
        concurrency: int = 2,
        pool: str = "prefork",
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.config_path = config_path
        self.hostname = hostname or f"{unique('w')}@%h"
        self.log_path = config_path.parent / f"worker-{self.hostname.split('@')[0]}.log"
        self.args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "celery_ext",
            "worker",
            "-n",
            self.hostname,
            "-c",
            str(concurrency),
            "-P",
            pool,
            "-l",
            "INFO",
            "--without-mingle",
            "--without-gossip",
            "--logfile",
            str(self.log_path),
            *extra_args,
        ]
        self.env = subprocess_env(CELERY_EXT_CONFIG=str(config_path), **(env or {}))
        self.proc: subprocess.Popen[bytes] | None = None
        self._output = b""

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        self.log_path.unlink(missing_ok=True)
        self.close_output()  # a worker started again under the same name: its last run's pipe
        self._output = b""
        self.proc = subprocess.Popen(
            self.args, env=self.env, cwd=self.config_path.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.wait_for_log(" ready.", timeout)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def output(self) -> str:
        """What the worker wrote to its stdout and stderr, once it has exited ("" before)."""
        self.close_output()
        return self._output.decode(errors="replace")

    def close_output(self) -> None:
        """Keep what an exited worker's pipe holds and close it (left open, the garbage collector
        closes it with a ResourceWarning, in whichever test runs then).  The read does not block:
        a pool process that outlived its worker may hold the pipe open."""
        stdout = None if self.proc is None else self.proc.stdout
        if stdout is None or stdout.closed or self.proc is None or self.proc.poll() is None:
            return
        os.set_blocking(stdout.fileno(), False)
        try:
            self._output += stdout.read() or b""
        except BlockingIOError:
            pass
        finally:
            stdout.close()

    def wait_for_log(self, needle: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.log():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.output()}\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker log never showed {needle!r}:\n{self.log()[-4000:]}")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        if not self.alive():
            self.close_output()
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self.close_output()

    def process_ids(self) -> list[int]:
        """The main process and its pool children."""
        if self.proc is None:
            return []
        try:
            found = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
            children = [int(pid) for pid in found.stdout.split()]
        except OSError:
            children = []
        return [self.proc.pid, *children]

    def stacks(self) -> str:
        """Every thread's stack of every process of this worker, after which it is killed."""
        if not self.alive():
            return ""
        for pid in self.process_ids():
            try:
                os.kill(pid, signal.SIGUSR2)
            except ProcessLookupError:
                pass
        time.sleep(1.0)
        self.kill()
        assert self.proc is not None
        self.proc.wait(10)
        return self.output()

    def kill(self) -> None:
        if self.proc is None:
            return
        # Kill the whole process group of the worker: the main process and its pool children.
        for pid in self.process_ids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)
