"""The ``metrics`` plugin on a real prefork worker: one scrape sums every pool child."""

from __future__ import annotations

from celery_ext.model import TaskStatus
from tests.support.scrape import free_port, poll, sample, scrape

TASKS = [{"type": "python", "config": {"modules": ["tests.support.event_tasks"]}}]


def test_one_scrape_counts_tasks_of_every_pool_child_including_replaced_ones(make_cluster) -> None:
    port = free_port()
    c = make_cluster(
        executors=TASKS, plugins=[{"name": "metrics", "config": {"prometheus_port": port, "sample_interval": 0.2}}]
    )
    c.data["app"]["version"] = "2.4.1"  # reported as celery_ext_app_info{app, version}
    from tests.support.workers import write_config

    write_config(c.tmp_path, c.data)
    # Each child is replaced after 2 tasks: counts of exited children must stay in the scrape.
    w = c.worker(concurrency=2, extra_args=["--max-tasks-per-child=2"])
    ok = [c.manager.submit("whoami", {"seconds": 0.2}) for _ in range(8)]
    bad = [c.manager.submit("doomed", {"reason": "planned"}) for _ in range(3)]
    done = [c.manager.wait(t.task_id, 60) for t in ok + bad]
    assert [t.status for t in done] == [TaskStatus.SUCCEEDED] * 8 + [TaskStatus.FAILED] * 3
    pids = {t.result["pid"] for t in done[:8]}
    assert len(pids) >= 3, pids  # two children at a time, replaced after two tasks each

    def counted() -> bool:
        s = scrape(port)
        return (
            sample(s, "celery_ext_task_duration_seconds_count", task_type="whoami", status="succeeded") == 8
            and sample(s, "celery_ext_task_duration_seconds_count", task_type="doomed", status="failed") == 3
        )

    poll(counted, 20, "task counts in the scrape")
    s = scrape(port)
    assert sample(s, "celery_ext_task_failed_total", task_type="doomed", reason="planned") == 3
    assert sample(s, "celery_ext_task_failed_total", task_type="whoami", reason="planned") == 0
    worker = w.hostname.replace("%h", __import__("socket").gethostname())
    assert sample(s, "celery_ext_worker_online", worker=worker) == 1
    # Queue lengths are sampled for every celery_ext queue (all drained by now).
    queues = {dict(labels)["queue"] for name, labels in s if name == "celery_ext_queue_length"}
    app = c.data["app"]["name"]
    assert {f"{app}.whoami", f"{app}.doomed", "celery"} <= queues
    assert sample(s, "celery_ext_app_info", app=app, version="2.4.1") == 1
    # No task ids in any label.
    assert not any(t.task_id in str(labels) for _, labels in s for t in ok)


def test_queue_length_reflects_waiting_messages(make_cluster) -> None:
    port = free_port()
    c = make_cluster(
        executors=TASKS,
        worker={"supported_types": ["doomed"]},
        plugins=[{"name": "metrics", "config": {"prometheus_port": port, "sample_interval": 0.2}}],
    )
    app = c.data["app"]["name"]
    # The only worker runs "doomed" alone: whoami messages wait in their shared queue.
    c.worker(concurrency=2, extra_args=["-Q", f"{app}.doomed"])
    for _ in range(4):
        c.manager.submit("whoami")
    poll(lambda: sample(scrape(port), "celery_ext_queue_length", queue=f"{app}.whoami") == 4, 20, "queue length 4")
