"""The router's balancer: built from config (``build_balancer``), started and stopped by ``TaskRouter``."""

from __future__ import annotations

import pytest

from celery_ext.config import parse_config
from celery_ext.errors import ConfigError
from celery_ext.routing.router import build_balancer


def test_unknown_strategy_lists_the_known_ones() -> None:
    config = parse_config({"scheduler": {"load_balance_strategy": "leastt"}})
    with pytest.raises(ConfigError) as err:
        build_balancer(config)
    text = str(err.value)
    assert "scheduler.load_balance_strategy" in text and "'leastt'" in text and "did you mean 'least_task'" in text
    assert "weighted_round_robin" in text and "consistent_hash" in text


def test_balancer_settings_are_validated_with_their_path() -> None:
    config = parse_config(
        {
            "scheduler": {
                "load_balance_strategy": "consistent_hash",
                "load_balance_config": {"replicas": 0, "colour": "red"},
            }
        }
    )
    with pytest.raises(ConfigError) as err:
        build_balancer(config)
    assert "scheduler.load_balance_config.replicas: must be >= 1" in str(err.value)
    assert "scheduler.load_balance_config.colour: unknown key" in str(err.value)


def test_the_router_starts_its_initial_balancer_and_stops_the_replaced_one() -> None:
    # Review bug (issue 11): only a balancer installed by set_balancer got startup().
    from celery_ext.routing.router import TaskRouter
    from tests.support.balancers import CountingBalancer

    first, second = CountingBalancer(), CountingBalancer()
    router = TaskRouter("p", ["t"], None, first)
    assert (first.started, first.stopped) == (1, 0)
    router.set_balancer(second)
    assert (first.stopped, second.started, second.stopped) == (1, 1, 0)
    router.close()
    assert second.stopped == 1
