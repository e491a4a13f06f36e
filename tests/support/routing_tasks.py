"""Task types for the routing tests: each run records where and when it ran in a Redis list."""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from celery import current_task

from celery_ext import task_type


def _record(key: str, tag: str, start: float) -> dict[str, Any]:
    hostname = current_task.request.hostname if current_task else "?"
    entry = {"w": hostname, "s": start, "e": time.time(), "tag": tag}
    r = redis.Redis(host="127.0.0.1", port=6379, db=0)
    r.rpush(key, json.dumps(entry))
    r.expire(key, 600)
    return entry


@task_type("rt_slow")
def rt_slow(key: str, seconds: float = 0.3, tag: str = "") -> dict[str, Any]:
    start = time.time()
    time.sleep(seconds)
    return _record(key, tag, start)


@task_type("rt_other")
def rt_other(key: str, seconds: float = 0.0, tag: str = "") -> dict[str, Any]:
    start = time.time()
    time.sleep(seconds)
    return _record(key, tag, start)


@task_type("rt_orphan")
def rt_orphan(key: str, tag: str = "") -> dict[str, Any]:
    return _record(key, tag, time.time())


def runs(key: str) -> list[dict[str, Any]]:
    r = redis.Redis(host="127.0.0.1", port=6379, db=0)
    return [json.loads(x) for x in r.lrange(key, 0, -1)]
