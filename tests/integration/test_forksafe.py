"""A pool process forked while a thread of the worker's main process was inside a Redis pool."""

from __future__ import annotations

import os
import signal
import threading
import time

import redis

from celery_ext.forksafe import fork_safe


def fork_and_use(client: redis.Redis) -> str:
    """Fork while another thread holds the client's pool lock; in the child ping, then drop the
    client (as an event bus does after a fork).  Returns how the child ended."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with client.connection_pool._lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(5)
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 3
        try:
            code = 0 if client.ping() else 1
            client.close()
        finally:
            os._exit(code)
    release.set()
    holder.join()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return f"exit {os.waitstatus_to_exitcode(status)}"
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "hung"


def test_registered_pool_is_usable_in_a_child_forked_while_its_lock_was_held(redis_url: str) -> None:
    client = fork_safe(redis.Redis.from_url(redis_url, socket_timeout=5))
    client.ping()
    assert fork_and_use(client) == "exit 0"
    assert client.ping()  # the parent's pool is untouched
    client.close()


def test_the_broker_transport_registers_its_pools(redis_url: str) -> None:
    from kombu import Connection

    from celery_ext.forksafe import _POOLS

    with Connection(redis_url, transport="celery_ext.transport:Transport") as conn:
        channel = conn.default_channel
        assert channel.pool in _POOLS and channel.async_pool in _POOLS
        assert fork_and_use(channel._create_client()) == "exit 0"
