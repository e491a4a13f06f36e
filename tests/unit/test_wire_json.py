"""``redis_wire.envelope_dumps``: the JSON value kombu's encoder writes, by orjson where it
encodes every part as kombu would, and by kombu's encoder where it would not (its own types)."""

from __future__ import annotations

import decimal
import json
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import pytest
from kombu.utils.json import loads as kombu_loads

from celery_ext.model import new_id, new_uuid
from celery_ext.redis_wire import envelope_dumps, json_dumps


class Color(StrEnum):
    RED = "red"


def envelope(extra: Any) -> dict[str, Any]:
    return {
        "body": "W1tdLCB7ImkiOiAxfV0=",
        "content-encoding": "utf-8",
        "headers": {"id": "x", "timelimit": (None, 30), "argsrepr": "()", "kwargsrepr": "{'é': '\u2603'}", "x": extra},
        "properties": {"delivery_info": {"exchange": "", "routing_key": "q"}, "priority": 9, "delivery_mode": 2},
    }


@pytest.mark.parametrize("extra", [None, 1.5, 1e16, -(2**63), 'quote " and \\ and \n', [1, {"a": []}], True, Color.RED])
def test_plain_envelopes_encode_to_what_kombu_decodes_the_same(extra: Any) -> None:
    data = envelope(extra)
    fast = envelope_dumps(data)
    assert isinstance(fast, bytes)  # orjson's
    assert kombu_loads(fast) == kombu_loads(json_dumps(data)) == json.loads(json.dumps(data))


@pytest.mark.parametrize(
    "extra",
    [
        datetime(2026, 12, 3, 12, 0, tzinfo=UTC),  # kombu's {"__type__": "datetime", ...}
        decimal.Decimal("1.10"),
        2**70,  # over 64 bits
        {1: "int key"},  # json.dumps makes it "1"
    ],
)
def test_values_kombu_encodes_its_own_way_take_kombus_encoder(extra: Any) -> None:
    data = envelope(extra)
    assert envelope_dumps(data) == json_dumps(data)
    assert kombu_loads(envelope_dumps(data))["headers"]["x"] == kombu_loads(json_dumps(data))["headers"]["x"]


def test_ids_are_random_version_4_uuids() -> None:
    ids = [new_id() for _ in range(2000)]
    assert len(set(ids)) == 2000
    for i in ids:
        u = uuid.UUID(hex=i)
        assert u.version == 4 and u.variant == uuid.RFC_4122 and u.hex == i
    tag = new_uuid()
    assert str(uuid.UUID(tag)) == tag and uuid.UUID(tag).version == 4
