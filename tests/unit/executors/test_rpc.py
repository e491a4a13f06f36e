"""``RpcExecutor``: JSON-RPC 2.0 payload checks."""

from __future__ import annotations

import pytest

from celery_ext.errors import ExecutorError
from celery_ext.executors.rpc import RpcExecutor
from celery_ext.model import Task


def test_rpc_payload_names_the_field() -> None:
    ex = RpcExecutor(RpcExecutor.parse_settings({"endpoints": {"main": "http://rpc.test/"}}))
    ex.initialize(ex.settings)
    with pytest.raises(ExecutorError) as info:
        ex.execute(Task("t1", "rpc_call", {"endpoint": "main", "params": 3}))
    assert info.value.reason == "invalid_payload"
    assert "payload.method" in str(info.value) and "payload.params" in str(info.value)
    ex.close()
