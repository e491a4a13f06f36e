"""A Celery producer that imports only ``celery``: what a team's existing code looks like.

Run as a script by tests/integration/test_celery_native.py (copied into a temp dir first, so
that nothing of this repository is on its ``sys.path``), with ``CELERY_EXT_CONFIG`` naming the
cluster's config.yaml and no ``PYTHONPATH``::

    python plain_producer.py BROKER_URL SENDS_JSON

SENDS_JSON is a list of sends, each one of

- ``{"name": str, "kwargs": {...}, "args": [...], "task_id": str}`` (all but ``name`` optional):
  ``app.send_task``, with no queue and no routing options;
- ``{"chain": [step, ...]}``, a chain of ``app.signature(name, args, kwargs)`` steps;
- ``{"chord": [step, ...], "body": step}``, a chord.

Each is waited for with ``AsyncResult.get()``.  Prints one JSON object::

    {"celery_ext_before_send": bool, "backend": "<module>:<class>", "celery_ext_after": bool,
     "sends": [{"task_id", "ids", "state", "retries", "result"} or {"task_id", "ids", "state",
               "error_type", "error_module", "error"}]}

where ``ids`` are the task ids of a chain's steps (or a chord's header), first to last.

This file must import nothing but the standard library and ``celery`` (the test checks it).
"""

import json
import sys

from celery import Celery, chain, chord


def loaded(prefix: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for name in sys.modules)


def main(broker_url: str, sends: list) -> dict:
    app = Celery(broker=broker_url, backend="celery_ext://")
    before = loaded("celery_ext")
    out = []

    def sig(step: dict):
        return app.signature(step["name"], args=step.get("args"), kwargs=step.get("kwargs"))

    for spec in sends:
        if "chain" in spec:
            result = chain(*(sig(step) for step in spec["chain"])).apply_async()
            ids, node = [], result
            while node is not None:
                ids.insert(0, node.id)
                node = node.parent
        elif "chord" in spec:
            result = chord([sig(step) for step in spec["chord"]], sig(spec["body"])).apply_async()
            ids = [r.id for r in result.parent.results]
        else:
            result = app.send_task(
                spec["name"], args=spec.get("args"), kwargs=spec.get("kwargs"), task_id=spec.get("task_id")
            )
            ids = [result.id]
        entry = {"task_id": result.id, "ids": ids}
        try:
            entry["result"] = result.get(timeout=spec.get("timeout", 30))
        except Exception as exc:  # noqa: BLE001 - reported to the test
            entry.update(error_type=type(exc).__name__, error_module=type(exc).__module__, error=str(exc))
        entry["state"] = result.state
        entry["retries"] = result.retries
        out.append(entry)
    backend = type(app.backend)
    return {
        "celery_ext_before_send": before,
        "backend": f"{backend.__module__}:{backend.__name__}",
        "celery_ext_after": loaded("celery_ext"),
        "sends": out,
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], json.loads(sys.argv[2]))))
