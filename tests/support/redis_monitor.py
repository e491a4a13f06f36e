"""What Redis ran while a test did something: redis-py's ``MONITOR``, read on a thread."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import redis

from tests.support.services import unique


def commands_of(client: redis.Redis, action: Callable[[], Any]) -> list[dict[str, Any]]:
    """The commands the server of ``client`` ran while ``action`` ran (in this thread: Celery's
    ``reply_to`` is the thread's), as redis-py's ``MONITOR`` parses them: ``command``,
    ``client_type`` (``lua`` for one a script ran), ``client_address``, ``client_port``; up to a
    marker sent after the action on a connection of its own."""
    kwargs = client.connection_pool.connection_kwargs
    marker = unique("end")
    marking = redis.Redis(host=kwargs.get("host", "localhost"), port=kwargs.get("port", 6379))
    marking.ping()  # connected before: its handshake is not among the commands
    got: list[dict[str, Any]] = []
    with client.monitor() as monitor:  # MONITOR confirmed: every later command is seen

        def read() -> None:
            while marker not in (command := monitor.next_command())["command"]:
                got.append(command)

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        action()
        marking.echo(marker)
        thread.join(10)
    marking.close()
    return got
