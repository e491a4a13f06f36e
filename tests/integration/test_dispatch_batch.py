"""A batch publish (``Dispatcher.publish_many``: the scheduler's due work, ``submit_many``) sends
the same messages and task-sent events as Celery's ``send_task`` does, read back raw from Redis;
the events as one ``task.multi`` list per pipeline, as a Celery worker sends its buffered ones."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import signals

from celery_ext.config import parse_config
from celery_ext.dispatch import PUBLISH_BATCH, Dispatch, Dispatcher, queue_name
from celery_ext.errors import StorageError
from celery_ext.factory import create_app
from celery_ext.model import Task, TaskStatus, new_id, utcnow
from celery_ext.runtime import runtime_of
from tests.conftest import TEST_TASKS
from tests.support.redis_monitor import commands_of
from tests.support.services import REDIS_HOST, REDIS_PORT, create_database, drop_database, unique

DB = 11  # a Redis database of its own: the test reads every list and event in it


@pytest.fixture()
def dispatcher(tmp_path: Path) -> Iterator[Dispatcher]:
    data = {
        "app": {"name": unique("disp")},
        "broker": {"url": f"redis://{REDIS_HOST}:{REDIS_PORT}/{DB}"},
        "storage": {"type": "sqlite", "config": {"url": f"sqlite:///{tmp_path / 'tasks.db'}"}},
    }
    rt: Any = runtime_of(create_app(parse_config(data, source="test")))
    yield rt.dispatcher
    rt.close()


def send_task_path(d: Dispatcher, batch: list[Dispatch]) -> None:
    """What publish_many did before it had a lean path: Celery's send_task per message."""
    with d.app.producer_or_acquire() as producer, producer.batch(max_size=PUBLISH_BATCH):
        for item in batch:
            d.app.send_task(item.task.task_type, producer=producer, **d.options(item))


def dispatch(countdown: float | None) -> Dispatch:
    task = Task(task_id=new_id(), task_type="echo", payload={"i": 1}, timeout=30, parent_id="p", priority=7)
    return Dispatch(task, new_id(), 2, countdown, utcnow())


def masked(value: Any) -> Any:
    """A decoded message or event with its per-message fields replaced, key order kept."""
    if isinstance(value, dict):
        return {k: "*" if k in VARYING else masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v) for v in value]
    return value


def raw_view(raw: bytes) -> tuple[str, bytes]:
    """A raw Redis entry as text to compare: the envelope's JSON value with its per-message
    fields masked (key order and spelling kept), and its body's, decoded from base64 (a task
    message's body has no per-message field; an event's is masked too), each written again by
    ``json.dumps`` (celery_ext encodes by orjson: the same values, other spacing and escapes)."""
    envelope = json.loads(raw)
    body = base64.b64decode(envelope.pop("body"))
    assert envelope["content-encoding"] == "utf-8"
    decoded_body = json.loads(body.decode("utf-8"))
    if b'"clock"' in body:  # an event
        decoded_body = masked(decoded_body)
    return json.dumps(masked(envelope)), json.dumps(decoded_body).encode()


class Captured:
    """Every list entry and every Celery event of the test's Redis database."""

    def __init__(self) -> None:
        self.client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=DB)
        self.client.flushdb()
        self.events: list[dict[str, Any]] = []
        self.raw_events: list[tuple[str, bytes]] = []
        self._pubsub = self.client.pubsub()
        self._pubsub.psubscribe(f"/{DB}.celeryev/*")  # kombu names event channels by database
        while self._pubsub.get_message(timeout=1.0) is None:
            pass  # the subscription's confirmation
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            m = self._pubsub.get_message(timeout=0.1)
            if m is not None and m["type"] == "pmessage":
                event = decoded(json.loads(m["data"]))
                body = event["body"]
                # A list is several events, as Celery's event receiver (Flower's) reads it.
                self.events += [{**event, "body": b} for b in body] if isinstance(body, list) else [event]
                self.raw_events.append((m["channel"].decode(), m["data"]))

    def messages(self) -> list[dict[str, Any]]:
        found = []
        for key in self.client.keys("*"):
            if self.client.type(key) == b"list":
                found += [decoded(json.loads(raw)) for raw in self.client.lrange(key, 0, -1)]
        return found

    def raw(self) -> dict[str, list[tuple[str, bytes]]]:
        """Every list of the database, by key (a priority's list is ``queue\\x06\\x16<n>``), as
        ``raw_view``s, oldest first; then the database is emptied."""
        found = {}
        for key in self.client.keys("*"):
            if self.client.type(key) == b"list":
                found[key.decode()] = [raw_view(r) for r in reversed(self.client.lrange(key, 0, -1))]
                self.client.delete(key)
        return found

    def wait_events(self, n: int) -> list[tuple[str, tuple[str, bytes]]]:
        """The next ``n`` event messages, raw, with their channels (then forgotten)."""
        deadline = time.monotonic() + 10
        while len(self.raw_events) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        got, self.raw_events = self.raw_events[:n], self.raw_events[n:]
        return [(channel, raw_view(data)) for channel, data in got]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._pubsub.close()
        self.client.flushdb()


def unpacked(events: list[tuple[str, tuple[str, bytes]]]) -> tuple[list[str], list[Any]]:
    """Event messages (``wait_events``) as their envelopes with the routing key left out, and the
    events they carry, one after another (a ``task.multi`` message's list in order)."""
    envelopes, bodies = [], []
    for _, (envelope, body) in events:
        data = json.loads(envelope)
        data["properties"]["delivery_info"].pop("routing_key")
        envelopes.append(json.dumps(data))
        decoded_body = json.loads(body)
        bodies += decoded_body if isinstance(decoded_body, list) else [decoded_body]
    return envelopes, bodies


def decoded(message: dict[str, Any]) -> dict[str, Any]:
    if message.get("properties", {}).get("body_encoding") == "base64":
        message["body"] = json.loads(base64.b64decode(message["body"]))
    return message


VARYING = {"delivery_tag", "eta", "clock", "timestamp"}


def same_but_varying(a: Any, b: Any) -> list[str]:
    """Paths where ``a`` and ``b`` differ, except the per-message fields (tags, times)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [f"{k}: {d}" for k in set(a) | set(b) if k not in VARYING for d in same_but_varying(a.get(k), b.get(k))]
    return [] if a == b else [f"{a!r} != {b!r}"]


@pytest.mark.parametrize("countdown", [None, 0.5])
def test_publish_many_sends_what_send_task_sends(dispatcher: Dispatcher, countdown: float | None) -> None:
    cap = Captured()
    try:
        first = dispatch(countdown)
        send_task_path(dispatcher, [first])
        dispatcher.publish_many([first])  # the same record, token and attempt again
        deadline = time.monotonic() + 10
        while len(cap.events) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        old, new = cap.messages()
        assert old["headers"]["id"] == new["headers"]["id"] == first.task.task_id
        assert not same_but_varying(old, new), same_but_varying(old, new)
        assert (new["headers"]["eta"] is None) is (countdown is None)
        assert new["headers"]["celery_ext"]["token"] == first.token
        assert new["headers"]["timelimit"] == [30 + dispatcher.grace, 30]
        sent = [e for e in cap.events if e["body"]["type"] == "task-sent"]
        assert len(sent) == 2, cap.events
        assert not same_but_varying(sent[0]["body"], sent[1]["body"])
        assert sent[1]["body"]["uuid"] == first.task.task_id and sent[1]["body"]["queue"]
    finally:
        cap.close()


def test_a_publish_signal_receiver_sees_every_batch_message(dispatcher: Dispatcher) -> None:
    """With a ``before_task_publish`` receiver (tracing, for one), the batch goes through
    ``send_task``, so the receiver sees (and may change) every message."""
    seen: list[str] = []

    def receiver(headers: dict[str, Any], **_: Any) -> None:
        seen.append(headers["id"])
        headers["traced"] = "yes"

    signals.before_task_publish.connect(receiver, weak=False)
    cap = Captured()
    try:
        batch = [dispatch(None) for _ in range(3)]
        dispatcher.publish_many(batch)
        assert seen == [d.task.task_id for d in batch]
        assert [m["headers"].get("traced") for m in cap.messages()] == ["yes"] * 3
    finally:
        signals.before_task_publish.disconnect(receiver)
        cap.close()


def test_batch_messages_equal_send_tasks_for_every_priority_type_and_queue(dispatcher: Dispatcher) -> None:
    """Value for value (per-message tags, times and clocks masked): each priority's Redis list, the
    queue of each task type, and the task-sent events with their channels, in order."""
    batch = []
    for i in range(20):
        task = Task(
            task_id=new_id(),
            task_type=("echo", "sleep")[i % 2],
            payload={"i": i, "text": "quote ' and \\ and \u00e9", "nested": {"a": [1, 2.5, None, True]}},
            priority=i % 10,
            timeout=30 if i % 3 else None,
            group_id="g" if i % 4 == 0 else None,
            root_id="r" if i % 5 == 0 else None,
        )
        batch.append(Dispatch(task, new_id(), 1 + i % 3, 0.5 if i % 7 == 0 else None, utcnow()))
    cap = Captured()
    try:
        send_task_path(dispatcher, batch)
        old, old_events = cap.raw(), cap.wait_events(len(batch))
        dispatcher.publish_many(batch)
        new, new_events = cap.raw(), cap.wait_events(1)
        assert new == old
        # One PUBLISH for the batch's events, on the topic of task.multi; each event in it is
        # the one send_task sent, in the same order, in the same envelope.
        assert not cap.wait_events(1)
        assert [channel.rsplit("/", 1)[1] for channel, _ in old_events] == ["task.sent"] * len(batch)
        assert new_events[0][0].rsplit("/", 1)[1] == "task.multi"
        old_envelopes, old_bodies = unpacked(old_events)
        new_envelopes, new_bodies = unpacked(new_events)
        assert new_bodies == old_bodies and len(new_bodies) == len(batch)
        assert new_envelopes == old_envelopes[:1] and len(set(old_envelopes)) == 1
        # Each type's queue, one list per priority (celery_ext sets kombu's steps to 0-9, sep ":").
        with dispatcher.app.producer_or_acquire() as producer:
            channel = producer.channel
            expected = {
                channel._q_for_pri(queue_name(dispatcher.app.main, d.task.task_type), 9 - d.task.priority)
                for d in batch
            }
        assert set(new) == expected and len(expected) == 10
        assert sum(len(v) for v in new.values()) == len(batch)
    finally:
        cap.close()


def test_a_big_batch_runs_each_task_once_on_a_real_worker_with_records(make_cluster: Any) -> None:
    """5,005 tasks in one ``submit_many`` on PostgreSQL: two INSERT chunks, three pipelines.  Each
    runs exactly once (the task appends its number to a Redis list) and its record succeeded.
    Idempotency keys inside the batch: one used before, one given twice; each answers its first."""
    c = make_cluster(storage="postgresql", executors=TEST_TASKS)
    m = c.manager
    ran, used, twice = unique("big:"), unique("idem-"), unique("idem-")
    first = m.submit("record", {"key": ran, "value": "first"}, idempotency_key=used)
    specs: list[dict[str, Any]] = [
        {"task_type": "record", "payload": {"key": ran, "value": str(i)}, "max_retries": 0} for i in range(5000)
    ]
    specs[10:10] = [{"task_type": "record", "payload": {"key": ran, "value": "twice"}, "idempotency_key": twice}]
    specs[20:20] = [{"task_type": "record", "payload": {"key": ran, "value": "used"}, "idempotency_key": used}]
    specs += [{"task_type": "record", "payload": {"key": ran, "value": "again"}, "idempotency_key": twice}]
    specs += [{"task_type": "record", "payload": {"key": ran, "value": str(i)}} for i in range(5000, 5002)]
    tasks = m.submit_many(specs)
    assert len(tasks) == len(specs) == 5005
    assert tasks[20].task_id == first.task_id and tasks[20].payload["value"] == "first"
    assert tasks[-3].task_id == tasks[10].task_id and tasks[10].payload["value"] == "twice"
    fresh = [t for i, t in enumerate(tasks) if i not in (20, len(tasks) - 3)]
    assert len({t.task_id for t in fresh}) == 5003
    assert all(t.status is TaskStatus.QUEUED for t in fresh)
    c.worker(concurrency=2)
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0)
    deadline = time.monotonic() + 240
    while client.llen(ran) < 5004 and time.monotonic() < deadline:
        time.sleep(0.5)
    for t in [*fresh, first]:
        assert m.wait(t.task_id, 60).status is TaskStatus.SUCCEEDED
    time.sleep(1)  # a second run of any task would show up here
    values = [v.decode() for v in client.lrange(ran, 0, -1)]
    client.delete(ran)
    assert sorted(values) == sorted(["first", "twice", *map(str, range(5002))])
    records = [m.get(t.task_id) for t in fresh]
    assert all(r.status is TaskStatus.SUCCEEDED and r.attempt == 1 and r.queued_at for r in records)


def test_celerys_event_receiver_reads_each_task_sent_event_of_a_batch(dispatcher: Dispatcher) -> None:
    """Celery's own ``EventReceiver`` (what Flower and ``celery events`` run) hands each event of a
    batch's ``task.multi`` message to its handler, one by one, with the task's id and queue."""
    app = dispatcher.app
    seen: list[dict[str, Any]] = []
    batch = [dispatch(None) for _ in range(5)]
    with app.connection_for_write() as out, app.connection_for_read() as conn:
        probe = app.events.Dispatcher(out, enabled=True)
        receiver = app.events.Receiver(conn, handlers={"task-sent": seen.append})
        thread = threading.Thread(target=lambda: receiver.capture(limit=None, timeout=10, wakeup=False))
        thread.daemon = True
        thread.start()
        # kombu subscribes to the fanout topics on the receiver's first poll: until then, send
        # a probe event now and then; the first one it hands over says it listens.
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            probe.send("task-sent", uuid="probe")
            time.sleep(0.05)
        assert seen, "the receiver never listened"
        probe.close()
        dispatcher.publish_many(batch)
        deadline = time.monotonic() + 10
        while len([e for e in seen if e["uuid"] != "probe"]) < len(batch) and time.monotonic() < deadline:
            time.sleep(0.05)
        receiver.should_stop = True
        thread.join(15)
    seen[:] = [e for e in seen if e["uuid"] != "probe"]
    assert [e["uuid"] for e in seen] == [d.task.task_id for d in batch]
    assert all(e["type"] == "task-sent" and e["queue"] == queue_name(app.main, "echo") for e in seen)


def test_a_single_publish_sends_what_send_task_sends_in_one_pipeline(dispatcher: Dispatcher) -> None:
    """``Dispatcher.publish`` (``submit``'s, a retry's) writes a message and its task-sent event
    as Celery's ``send_task`` does (the same JSON values, key order kept), the event as a
    ``task.multi`` list of one; the channel's setup is kept, so each publish sends the same."""
    batch = [dispatch(None), dispatch(0.5), dispatch(None)]
    cap = Captured()
    try:
        for d in batch:
            send_task_path(dispatcher, [d])
            old, old_events = cap.raw(), cap.wait_events(1)
            dispatcher.publish(d)
            new, new_events = cap.raw(), cap.wait_events(1)
            assert new == old and sum(len(v) for v in new.values()) == 1
            assert old_events[0][0].rsplit("/", 1)[1] == "task.sent"
            assert new_events[0][0].rsplit("/", 1)[1] == "task.multi"
            assert unpacked(new_events) == unpacked(old_events)
        assert not cap.wait_events(1)
    finally:
        cap.close()


def private_dispatcher(tmp_path: Path, url: str) -> Any:
    data = {
        "app": {"name": unique("disp")},
        "broker": {"url": url},
        "storage": {"type": "sqlite", "config": {"url": f"sqlite:///{tmp_path / 'tasks.db'}"}},
    }
    return runtime_of(create_app(parse_config(data, source="test")))


def queued_ids(client: redis.Redis, d: Dispatcher) -> list[str]:
    ids = []
    for key in client.keys(f"{queue_name(d.app.main, 'echo')}*"):
        ids += [json.loads(raw)["headers"]["id"] for raw in client.lrange(key, 0, -1)]
    return ids


def test_a_single_publish_after_the_broker_dropped_the_connection_still_arrives(
    tmp_path: Path, private_redis: Any
) -> None:
    """The server closes every client connection between two publishes (``CLIENT KILL``): the
    channel kept for the lean path (its event dispatcher, ``RedisWire``) still publishes, redis-py
    finding the dropped connection and opening another, and each message arrives."""
    rt = private_dispatcher(tmp_path, private_redis.url)
    client = redis.Redis.from_url(private_redis.url)
    try:
        d = rt.dispatcher
        sent = [dispatch(None) for _ in range(3)]
        d.publish(sent[0])
        client.client_kill_filter(_type="normal", skipme=True)
        d.publish(sent[1])
        d.publish(sent[2])
        ids = queued_ids(client, d)
        assert {d.task.task_id for d in sent} <= set(ids), ids
    finally:
        client.close()
        rt.close()


def test_a_single_publish_the_broker_refuses_is_retried_by_celerys_send_task(
    tmp_path: Path, private_redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker is down when the lean path publishes: the publish goes on through Celery's
    ``send_task`` and its retry policy, and arrives once the broker is back (started again as
    soon as the lean attempt has failed)."""
    rt = private_dispatcher(tmp_path, private_redis.url)
    d = rt.dispatcher
    d.app.conf.task_publish_retry_policy = {
        "max_retries": 100,
        "interval_start": 0.1,
        "interval_step": 0,
        "interval_max": 0.1,
    }
    lean_failed, lean = threading.Event(), d._publish_lean

    def observed(producer: Any, batch: Any, meanwhile: Any = None) -> None:
        try:
            lean(producer, batch, meanwhile)
        except BaseException:
            lean_failed.set()
            raise

    monkeypatch.setattr(d, "_publish_lean", observed)

    def restart() -> None:
        assert lean_failed.wait(30)
        private_redis.start()

    try:
        d.publish(dispatch(None))  # the lean path set up on the live broker
        private_redis.kill()
        thread = threading.Thread(target=restart, daemon=True)
        thread.start()
        late = dispatch(None)
        d.publish(late)
        thread.join(30)
        assert lean_failed.is_set()
        client = redis.Redis.from_url(private_redis.url)
        assert queued_ids(client, d) == [late.task.task_id]  # the restarted broker is empty but for it
        client.close()
    finally:
        rt.close()


# --- a single publish that reserves its worker's slot in the same round trip -----------------


def free_worker(rt: Any, capacity: int = 2) -> Any:
    """A worker registered for ``echo`` (no process: the registry entry is what routing reads),
    with the router's snapshot kept for the test (no refresh between two publishes)."""
    from celery_ext.routing.workers import WorkerInfo, direct_queue_name

    wid = unique("w") + "@test"
    info = WorkerInfo(wid, direct_queue_name(rt.config.app.name, wid), capacity=capacity, supported_types=("echo",))
    rt.registry.heartbeat(info, 60, 0)
    rt.router.cache_ttl = 60.0
    rt.router.invalidate()
    return info


def queue_of(key: str) -> str:
    """The queue of a Redis list key (a priority's list is ``queue:<step>``, the transport's
    separator)."""
    base, _, step = key.rpartition(":")
    return base if step.isdigit() else key


def in_flight(rt: Any, worker_id: str) -> int:
    return int(rt.registry.client.hget(rt.registry.keys[2], worker_id) or 0)


def test_a_single_publish_reserves_its_workers_slot_and_writes_its_message_in_one_script() -> None:
    """With a free worker registered and the registry on the broker, a single publish is one
    command: the script takes the worker's slot and writes the message and its task-sent event,
    the same JSON values ``send_task`` writes to that worker's queue."""
    data = {
        "app": {"name": unique("disp")},
        "broker": {"url": f"redis://{REDIS_HOST}:{REDIS_PORT}/{DB}"},
        "storage": {"type": "sqlite", "config": {"url": "sqlite:///:memory:"}},
    }
    rt: Any = runtime_of(create_app(parse_config(data, source="test")))
    cap = Captured()
    try:
        worker = free_worker(rt, capacity=3)
        d = rt.dispatcher
        first, second = dispatch(None), dispatch(None)
        d.publish(first)  # the script loaded, the queue declared
        assert in_flight(rt, worker.id) == 1
        cap.raw(), cap.wait_events(1)
        ran = [(c["client_type"], c["command"]) for c in commands_of(cap.client, lambda: d.publish(second))]
        outside = [c for kind, c in ran if kind != "lua"]
        assert len(outside) == 1 and outside[0].startswith("EVALSHA"), ran
        inside = [c.split()[0].upper() for kind, c in ran if kind == "lua"]
        assert inside[-3:] == ["HINCRBY", "LPUSH", "PUBLISH"], ran
        assert in_flight(rt, worker.id) == 2
        new, new_events = cap.raw(), cap.wait_events(1)
        assert [queue_of(k) for k in new] == [worker.queue]
        d.app.send_task(second.task.task_type, queue=worker.queue, **d.options(second))
        old, old_events = cap.raw(), cap.wait_events(1)
        assert new == old
        assert unpacked(new_events) == unpacked(old_events)
    finally:
        cap.close()
        rt.close()


def reserving_runtime(storage_url: str) -> Any:
    """A runtime on the test's Redis database and ``storage_url`` (PostgreSQL), with a free
    worker registered for ``echo``: a single submit reserves its slot in the publish's script."""
    data = {
        "app": {"name": unique("disp")},
        "broker": {"url": f"redis://{REDIS_HOST}:{REDIS_PORT}/{DB}"},
        "storage": {"type": "postgresql", "config": {"url": storage_url, "connect_timeout": 2}},
        "executors": TEST_TASKS,
    }
    return runtime_of(create_app(parse_config(data, source="test")))


def test_a_single_submit_writes_its_message_before_it_sends_its_record(monkeypatch: pytest.MonkeyPatch) -> None:
    """A single submit whose worker slot is reserved by the script sends the record's insert
    while the script's reply is on its way (``Dispatcher.publish``'s ``meanwhile``): the message
    leaves first.  Seen from inside the insert: the message is in the worker's queue already.
    The record is still written, QUEUED, and the submit returns it."""
    url = create_database("postgresql")
    rt = reserving_runtime(url)
    cap = Captured()
    try:
        worker = free_worker(rt, capacity=5)
        rt.manager.submit("echo", {"i": 1})  # the script loaded, the queue declared, a connection kept
        queue = [key for key in cap.client.keys("*") if queue_of(key.decode()) == worker.queue]
        assert len(queue) == 1
        tasks, create_sent = rt.storage.tasks, rt.storage.tasks.create_sent
        seen: list[bool] = []

        def observed(task: Task) -> Any:
            deadline = time.monotonic() + 2.0
            while not (there := task.task_id in listed(cap.client, queue[0])) and time.monotonic() < deadline:
                time.sleep(0.005)
            seen.append(there)
            return create_sent(task)

        monkeypatch.setattr(tasks, "create_sent", observed)
        task = rt.manager.submit("echo", {"i": 2})
        assert seen == [True]
        assert task.status is TaskStatus.QUEUED
        assert rt.manager.get(task.task_id).status is TaskStatus.QUEUED
        assert in_flight(rt, worker.id) == 2
    finally:
        cap.close()
        rt.close()
        drop_database("postgresql", url)


def test_a_single_submit_to_a_store_known_to_be_away_publishes_nothing(private_postgres: Any) -> None:
    """The insert goes after the message only on a live kept connection.  A server that shut
    down told its connections so (they have something to read): such a connection is dropped,
    and the next submit sends its insert first, on a fresh one, and fails with a clear error,
    nothing published; so does the one after it.  Back up, the submits publish again."""
    rt = reserving_runtime(private_postgres.url())
    cap = Captured()
    try:
        worker = free_worker(rt, capacity=5)
        rt.manager.submit("echo", {"i": 1})  # the schema made, a connection kept
        assert rt.storage.live_connection()
        private_postgres.stop()
        for i in (2, 3):
            with pytest.raises(StorageError) as info:
                rt.manager.submit("echo", {"i": i})
            assert f"127.0.0.1:{private_postgres.port}" in str(info.value)
        assert len(cap.messages()) == 1 and in_flight(rt, worker.id) == 1
        private_postgres.start()
        task = rt.manager.submit("echo", {"i": 4})
        assert rt.manager.get(task.task_id).status is TaskStatus.QUEUED
        assert len(cap.messages()) == 2 and in_flight(rt, worker.id) == 2
    finally:
        cap.close()
        rt.close()


def listed(client: redis.Redis, key: bytes) -> list[str]:
    """The task ids of the messages in a queue's list."""
    return [json.loads(raw)["headers"]["id"] for raw in client.lrange(key, 0, -1)]


def test_a_single_publish_to_a_worker_full_by_the_servers_count_goes_to_the_shared_queue(dispatcher: Any) -> None:
    """Another producer took the worker's last slot since this one's snapshot: the script writes
    nothing, and the message is routed again (here to the type's shared queue), once, with one
    task-sent event."""
    rt = runtime_of(dispatcher.app)
    cap = Captured()
    try:
        worker = free_worker(rt, capacity=2)
        dispatcher.publish(dispatch(None))
        cap.raw(), cap.wait_events(1)
        rt.registry.client.hset(rt.registry.keys[2], worker.id, 2)  # the server's count: full
        late = dispatch(None)
        dispatcher.publish(late)
        found = cap.raw()
        shared = queue_name(rt.config.app.name, "echo")
        assert [queue_of(k) for k in found] == [shared], found
        assert sum(len(v) for v in found.values()) == 1
        marker = dispatch(None)
        dispatcher.publish(marker)  # its event follows every event of the publish before it
        _, events = unpacked(cap.wait_events(2))
        # One event for the late task (none from the refused script), then the marker's.
        assert [e["uuid"] for e in events] == [late.task.task_id, marker.task.task_id]
        assert in_flight(rt, worker.id) == 2
    finally:
        cap.close()


def test_a_single_publish_queues_behind_a_backlog_in_the_shared_queue(dispatcher: Any) -> None:
    """Work already waits in the type's shared queue: the script takes no slot and writes
    nothing; the message joins the backlog, and later ones go there without asking again."""
    rt = runtime_of(dispatcher.app)
    cap = Captured()
    try:
        worker = free_worker(rt, capacity=2)
        shared = queue_name(rt.config.app.name, "echo")
        waiting = dispatch(None)
        dispatcher.app.send_task("echo", queue=shared, **dispatcher.options(waiting))
        cap.raw()  # read and emptied: put it back, raw, as the backlog
        dispatcher.app.send_task("echo", queue=shared, **dispatcher.options(waiting))
        cap.wait_events(1)
        sent = [dispatch(None), dispatch(None)]
        ran = [
            (c["client_type"], c["command"])
            for c in commands_of(cap.client, lambda: [dispatcher.publish(d) for d in sent])
        ]
        sha = rt.registry.reserve_push.sha
        assert sum(1 for kind, c in ran if kind != "lua" and c.startswith(f"EVALSHA {sha}")) == 1, ran
        lists = [k.decode() for k in cap.client.keys("*") if cap.client.type(k) == b"list"]
        assert [queue_of(k) for k in lists] == [shared], lists
        ids = [json.loads(raw)["headers"]["id"] for raw in reversed(cap.client.lrange(lists[0], 0, -1))]
        assert ids == [waiting.task.task_id] + [d.task.task_id for d in sent]
        assert in_flight(rt, worker.id) == 0
    finally:
        cap.close()
