"""The plain queues a worker consumes besides its types' (``dispatch.plain_queues``): this app's
default queue and ``worker.celery_queue`` ("celery", where a plain producer's ``send_task``
lands).  Each is bound on its own exchange with its own name as key: were "celery" bound to the
app's default exchange and key, every message for the default queue would be copied into it, and
every app's workers on the broker would take the copy (a second run, or another app's)."""

from __future__ import annotations

from typing import Any

import redis

from celery_ext.dispatch import queue_name
from tests.conftest import TEST_TASKS
from tests.support.services import unique


def test_a_message_for_the_default_queue_is_not_copied_into_the_celery_queue(make_cluster: Any) -> None:
    plain = unique("plainq")
    c = make_cluster(executors=TEST_TASKS, worker={"celery_queue": plain})
    own = queue_name(c.data["app"]["name"], "default")
    broker = redis.Redis.from_url(c.data["broker"]["url"])
    with c.runtime.celery.connection_for_write() as conn:
        channel: Any = conn.default_channel
        binding, permanent, sep = channel.keyprefix_queue % own, channel.keyprefix_binding_permanent % own, channel.sep
    stale = sep.join([own, "", plain])
    broker.sadd(binding, stale)  # what a worker before the fix declared
    broker.sadd(permanent, stale)
    w = c.worker()
    assert not broker.sismember(binding, stale) and not broker.sismember(permanent, stale)
    assert "removed the old binding" in w.log()
    w.stop()
    c.runtime.celery.send_task("nothing_runs_this", kwargs={}, queue=own)
    assert broker.llen(own) == 1
    assert broker.llen(plain) == 0, "the default queue's message was copied into the celery queue"
    # A plain producer's message for the celery queue still reaches it.
    c.runtime.celery.send_task("echo", kwargs={"x": 1}, queue=plain)
    assert broker.llen(plain) == 1
