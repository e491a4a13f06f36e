"""Sentry's own Celery integration in a worker, as teams run it, with a transport that writes each
event to the JSON-lines file ``$SENTRY_EVENTS`` instead of sending it (no network here).  Listed
among the python executor's modules, so the worker imports it before its pool forks; a process
without ``$SENTRY_EVENTS`` starts no Sentry client."""

from __future__ import annotations

import json
import os
from typing import Any

import sentry_sdk
from sentry_sdk.envelope import Envelope
from sentry_sdk.integrations.celery import CeleryIntegration
from sentry_sdk.transport import Transport

from celery_ext import task_type


class FileTransport(Transport):
    def capture_envelope(self, envelope: Envelope) -> None:
        for item in envelope.items:
            if item.type == "event" and item.payload.json is not None:
                with open(os.environ["SENTRY_EVENTS"], "a") as out:
                    out.write(json.dumps(item.payload.json, default=str) + "\n")


# Only where the test asks for it (the worker's environment): a producer process imports the same
# modules, and a client with Celery's integration would patch Celery for the rest of its life.
if os.environ.get("SENTRY_EVENTS"):
    sentry_sdk.init(dsn="http://public@127.0.0.1:9/1", transport=FileTransport, integrations=[CeleryIntegration()])


@task_type("sentry_probe")
def sentry_probe(**payload: Any) -> dict[str, Any]:
    """A task of this module, so that it is a task module like any other."""
    return payload
