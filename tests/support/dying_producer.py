"""A producer that dies between its inserts and its publish: ``submit_many`` (or ``submit``, for
one task) writes the records, and the process is SIGKILLed as the first message is about to be
sent (a ``before_task_publish`` receiver: Celery's own hook, called after routing, before the
broker sees anything).  Run by tests/integration/test_outbox.py, with ``CELERY_EXT_CONFIG``
naming the cluster's config.yaml::

    python -m tests.support.dying_producer TASK_TYPE PAYLOADS_JSON
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

from celery import signals

from celery_ext.factory import create_app
from celery_ext.runtime import runtime_of


def die(**kwargs: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main(task_type: str, payloads: list[dict[str, Any]]) -> None:
    manager = runtime_of(create_app()).manager
    signals.before_task_publish.connect(die, weak=False)
    if len(payloads) == 1:
        manager.submit(task_type, payloads[0])
    else:
        manager.submit_many([{"task_type": task_type, "payload": p} for p in payloads])
    raise SystemExit("published: the process should have died first")


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
