"""Writes sent without waiting for Redis's reply (``nowait.py``): the in-flight counts,
the pushed completions and, through celery_ext's transport, every task event.  Nothing may be lost
or reordered, also when the server closed the writer's connection (a restart, ``CLIENT KILL``, an
idle ``timeout``): the first write on such a socket would otherwise vanish without an error."""

from __future__ import annotations

import base64
import json
import select
import time
from typing import Any

import redis
from celery import Celery

from celery_ext.nowait import NoReplyWriter
from celery_ext.transport import install
from tests.support.services import unique


def kill(rds: Any, conn: Any) -> None:
    """Close ``conn`` from the server's side, as a restart or an idle timeout does."""
    host, port = conn._sock.getsockname()[:2]
    assert rds.client_kill_filter(_type=None, addr=f"{host}:{port}") == 1
    readable, _, _ = select.select([conn._sock], [], [], 5)  # the server's FIN reached our side
    assert readable


def eventually(read: Any, expected: Any, timeout: float = 5.0) -> Any:
    end = time.monotonic() + timeout
    while (got := read()) != expected and time.monotonic() < end:
        time.sleep(0.01)
    return got


def test_writes_apply_in_order_and_none_is_lost_after_the_server_closed_the_connection(redis_url) -> None:
    rds = redis.Redis.from_url(redis_url)
    key = unique("nowait")
    writer = NoReplyWriter(redis.Redis.from_url(redis_url))
    try:
        for i in range(200):
            writer.send("RPUSH", key, i)
        assert eventually(lambda: [int(x) for x in rds.lrange(key, 0, -1)], list(range(200))) == list(range(200))
        kill(rds, writer._conn)
        writer.send("RPUSH", key, 200)  # without the check, this one went into a dead socket
        writer.send("RPUSH", key, 201)
        assert eventually(lambda: rds.llen(key), 202) == 202
        assert [int(x) for x in rds.lrange(key, -2, -1)] == [200, 201]
    finally:
        writer.close()
        rds.delete(key)


def test_sync_returns_once_every_write_sent_is_applied(redis_url) -> None:
    """What a reader on another connection sees after ``sync``: every write sent before it."""
    rds = redis.Redis.from_url(redis_url)
    key = unique("nowait")
    writer = NoReplyWriter(redis.Redis.from_url(redis_url))
    try:
        writer.sync()  # nothing sent yet: nothing to wait for
        for _ in range(5):
            writer.send_many([("RPUSH", key, "x" * 100)] * 20_000)
            writer.sync()
            assert rds.llen(key) % 20_000 == 0  # never part of a batch
        assert rds.llen(key) == 100_000
        writer.send("RPUSH", key, "after")  # replies are off again: nothing left to read
        assert eventually(lambda: rds.llen(key), 100_001) == 100_001
        assert not select.select([writer._conn._sock], [], [], 0.2)[0]
    finally:
        writer.close()
        rds.delete(key)


def test_task_events_reach_subscribers_in_order_also_after_the_connection_was_closed(redis_url) -> None:
    """Events go out through celery_ext's transport (installed whenever celery_ext builds an app)
    as PUBLISHes with replies off; a subscriber sees every one, in order, before and after a
    server-side close."""
    install()
    app = Celery(unique("nowait"), broker=redis_url)
    app.conf.event_serializer = "json"
    app.conf.event_exchange = unique("celeryev")  # this test's events only
    rds = redis.Redis.from_url(redis_url)
    pubsub = rds.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe(f"/*.{app.conf.event_exchange}/*")
    pubsub.get_message(timeout=1)
    try:
        with app.connection_for_write() as conn:
            dispatcher = app.events.Dispatcher(conn, enabled=True)
            channel = dispatcher.producer.channel
            assert type(channel).__module__ == "celery_ext.transport"
            for i in range(50):
                dispatcher.send("task-sent", uuid=str(i))
            writer = channel._no_reply_writer
            assert writer is not None
            kill(rds, writer._conn)
            for i in range(50, 60):
                dispatcher.send("task-sent", uuid=str(i))
            dispatcher.close()
        seen: list[str] = []
        end = time.monotonic() + 10
        while len(seen) < 60 and time.monotonic() < end:
            got = pubsub.get_message(timeout=0.5)
            if got is not None:
                seen.append(json.loads(base64.b64decode(json.loads(got["data"])["body"]))["uuid"])
        assert seen == [str(i) for i in range(60)]
    finally:
        pubsub.close()


def test_acks_leave_nothing_in_the_unacked_hash_also_after_the_connection_was_closed(redis_url) -> None:
    """kombu keeps a fetched message in its unacked hash until the ack; the ack, written with
    replies off, removes it (else the message would come back after the visibility timeout)."""
    from kombu import Connection

    install()
    rds = redis.Redis.from_url(redis_url)
    queue = unique("nowait")
    with Connection(redis_url) as conn:
        channel = conn.default_channel
        assert type(channel).__module__ == "celery_ext.transport"
        unacked = channel.unacked_key
        simple = conn.SimpleQueue(queue, no_ack=False)
        try:
            for i in range(3):
                simple.put({"i": i})
            first = simple.get(timeout=5)
            assert eventually(lambda: rds.hexists(unacked, first.delivery_tag), True) is True
            first.ack()
            assert eventually(lambda: rds.hexists(unacked, first.delivery_tag), False) is False
            assert rds.zscore(channel.unacked_index_key, first.delivery_tag) is None
            second = simple.get(timeout=5)
            kill(rds, simple.channel.no_reply_writer()._conn)
            second.ack()  # on a connection the server closed: reconnects first
            assert eventually(lambda: rds.hexists(unacked, second.delivery_tag), False) is False
            third = simple.get(timeout=5)
            assert third.payload == {"i": 2}
            third.ack()
        finally:
            simple.close()
            rds.delete(queue)


def test_a_requeue_right_after_the_fetch_finds_the_message_in_the_unacked_hash(redis_url) -> None:
    """kombu's entry for a fetched message (hash and index) is written with replies off too; a
    requeue reads it back on another connection at once, and must find it there: no message is
    lost, and the hash and index are empty once all are acked."""
    from kombu import Connection

    install()
    rds = redis.Redis.from_url(redis_url)
    queue = unique("nowait")
    with Connection(redis_url) as conn:
        simple = conn.SimpleQueue(queue, no_ack=False)
        channel = simple.channel
        try:
            for i in range(100):
                simple.put({"i": i})
            for _ in range(100):  # each requeued as soon as it is fetched
                simple.get(timeout=5).requeue()
            seen, tags = [], []
            for _ in range(100):
                message = simple.get(timeout=5)
                assert eventually(lambda t=message.delivery_tag: rds.hexists(channel.unacked_key, t), True) is True
                seen.append(message.payload["i"])
                tags.append(message.delivery_tag)
                message.ack()
            assert sorted(seen) == list(range(100))
            kill(rds, channel.no_reply_writer()._conn)
            simple.put({"i": 100})
            message = simple.get(timeout=5)  # its entry written on a new connection
            message.reject()  # without requeue: removed, as an ack
            tags.append(message.delivery_tag)

            def left() -> list[Any]:  # the hash and index are shared by every queue of the database
                return [t for t in tags if rds.hexists(channel.unacked_key, t)] + [
                    t for t in tags if rds.zscore(channel.unacked_index_key, t) is not None
                ]

            assert eventually(left, []) == []
            assert rds.llen(queue) == 0
        finally:
            simple.close()
            rds.delete(queue)
