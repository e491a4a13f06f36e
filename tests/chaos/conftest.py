"""Fixtures of the chaos suite: a private PostgreSQL for the session (a fresh database per
scenario), a private Redis per scenario, and ``chaos(name, ...)`` making a ``Chaos`` on them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.harness import Chaos
from tests.conftest import print_worker_state
from tests.support.private import REDIS_SERVER, PrivatePostgres, PrivateRedis, running_postgres


@pytest.fixture(scope="session")
def private_pg() -> Iterator[PrivatePostgres]:
    yield from running_postgres()


@pytest.fixture
def make_redis(tmp_path: Path) -> Iterator[Callable[..., PrivateRedis]]:
    if not Path(REDIS_SERVER).exists():
        pytest.skip("no system redis-server")
    servers: list[PrivateRedis] = []

    def make(aof: bool = False) -> PrivateRedis:
        directory = tmp_path / f"redis{len(servers)}"
        directory.mkdir()
        server = PrivateRedis(directory, aof=aof)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.kill()


@pytest.fixture
def chaos(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    make_redis: Callable[..., PrivateRedis],
    private_pg: PrivatePostgres,
) -> Iterator[Callable[..., Chaos]]:
    """``chaos(scenario, settings="tuned", aof=False, pg=None, **sections)``: a cluster on a
    private Redis (``aof``: with an append-only file) and a fresh database on the private
    PostgreSQL (or on ``pg``)."""
    made: list[Chaos] = []

    def make(scenario: str, *, aof: bool = False, pg: PrivatePostgres | None = None, **kwargs: Any) -> Chaos:
        directory = tmp_path / f"c{len(made)}"
        directory.mkdir()
        redis = make_redis(aof=aof)
        c = Chaos(scenario, directory, redis, pg or private_pg, **kwargs)
        made.append(c)
        return c

    yield make
    if not private_pg.running():
        private_pg.start()  # a scenario that failed while its server was stopped
    print_worker_state(request, [c.cluster for c in made])
    for c in made:
        c.close()
