"""Collector selection (``build_metrics``)."""

from __future__ import annotations

import pytest

from celery_ext.config import Config, parse_config
from celery_ext.errors import ConfigError
from celery_ext.metrics import NullMetrics, build_metrics
from celery_ext.metrics.prometheus import PrometheusMetrics


def test_collector_selection() -> None:
    assert isinstance(build_metrics(Config()), NullMetrics)
    with_plugin = parse_config({"plugins": [{"name": "metrics"}]})
    assert isinstance(build_metrics(with_plugin), PrometheusMetrics)
    with pytest.raises(ConfigError, match="metrics.type: no metrics collector 'prom'"):
        build_metrics(parse_config({"metrics": {"type": "prom"}}))
    with pytest.raises(ConfigError, match="metrics.config.buckets"):
        PrometheusMetrics({"buckets": "fast"})
