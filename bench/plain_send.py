"""A producer that imports only ``celery``, for bench/bench_plain.py: what another team's service
sends.  Run with ``python -I`` (nothing of this repository on ``sys.path``)::

    python -I bench/plain_send.py BROKER_URL TASK_NAME N

Sends ``N`` messages of ``TASK_NAME`` with ``send_task`` (no kwargs), one at a time on one
producer, to Celery's default queue ``celery`` (no routing options: what such a service knows).
Prints one JSON object: ``{"start": <time.time() before the first send>, "cpu": <CPU seconds of
the sends>, "ids": [...]}``.
"""

import json
import sys
import time

from celery import Celery


def main(broker_url: str, name: str, n: int) -> dict:
    app = Celery(broker=broker_url)
    app.conf.update(task_serializer="json", accept_content=["json"])
    with app.producer_or_acquire() as producer:
        producer.connection.ensure_connection()  # connected before the clock starts
        start, cpu = time.time(), time.process_time()
        ids = [app.send_task(name, kwargs={}, producer=producer).id for _ in range(n)]
        cpu = time.process_time() - cpu
    return {"start": start, "cpu": cpu, "ids": ids}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
