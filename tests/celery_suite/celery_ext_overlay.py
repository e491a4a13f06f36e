"""pytest plugin ``-p celery_ext_overlay``: the celery_ext side of a run of Celery's canvas suite.

Celery's ``t/integration/conftest.py`` builds its apps from its ``celery_config`` fixture
(``celery.contrib.pytest``: ``celery_app`` per test, the producer; ``celery_session_app`` for the
one in-process ``celery_session_worker``).  A plugin's fixtures cannot override a conftest's, and
the suite's files stay as shipped, so this plugin swaps the conftest's fixture definitions for the
ones below when pytest registers that conftest (pytest reads a conftest's fixtures later, when it
collects its directory).

- ``celery_config``: ``celery_ext.factory.celery_settings(config, task_types)`` for the config in
  ``$CELERY_EXT_CONFIG``, plus what the suite itself sets (``result_extended``,
  ``task_create_missing_queues=False``) and ``result_backend = $TEST_BACKEND``
  (``celery_ext://``).  Every app of the run (producer and worker) gets it.
- ``celery_session_app`` (unless ``CELERY_EXT_SUITE_WORKER=settings``): the worker's app is built by
  ``celery_ext.factory.create_app(config)`` -- celery_ext's runtime, worker bootsteps and signal
  handlers -- then given the same ``celery_config``.  The suite's tasks are ``shared_task``s, so
  every app has them.  With ``settings`` the worker is a plain Celery app with that conf only.
- ``celery_worker_parameters``, only with ``CELERY_EXT_SUITE_PING_CHECK=0`` (a diagnostic, see
  run_canvas.py ``--ext-no-ping-check``): the session worker starts without its ``celery.ping``
  round trip, so the tests run even while ``AsyncResult.get()`` of that built-in task cannot.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from copy import deepcopy
from typing import Any

import pytest

SUITE_CONFTEST = "t.integration.conftest"


def _config() -> Any:
    from celery_ext.config import load_config

    return load_config(os.environ["CELERY_EXT_CONFIG"])


def _celery_config() -> dict[str, Any]:
    from celery_ext.factory import create_app
    from celery_ext.runtime import runtime_of

    # celery_ext's settings: what create_app gave the app's config (its router, in task_routes,
    # stays in use by the suite's app: only the storage this runtime opened is closed).
    rt = runtime_of(create_app(_config()))
    settings = {key: rt.celery.conf[key] for key in rt.celery.conf.changes if key != "deprecated_settings"}
    rt.storage.close()
    # The suite's own settings (t/integration/conftest.py), where celery_ext's don't say.
    # Not task_create_missing_queues=False: a celery_ext worker also consumes its direct queue.
    suite = {"result_backend": os.environ.get("TEST_BACKEND", "celery_ext://"), "result_extended": True}
    return {**suite, **settings}


def _celery_session_app(celery_config: Mapping[str, Any], use_celery_app_trap: bool) -> Iterator[Any]:
    from celery.contrib.testing import tasks  # noqa: F401 - celery.ping, as TestApp() imports it
    from celery.contrib.testing.app import DEFAULT_TEST_CONFIG, setup_default_app

    from celery_ext.factory import create_app

    app = create_app(_config())
    app.add_defaults(deepcopy(DEFAULT_TEST_CONFIG))  # below celery_ext's settings, as in TestApp
    app.conf.update(celery_config)
    with setup_default_app(app, use_trap=use_celery_app_trap):
        if not use_celery_app_trap:
            app.set_default()
            app.set_current()
        yield app


def _set_app_current(app: Any, celery_session_app: Any) -> Iterator[None]:
    """The suite's ``ZZZZ_set_app_current``, with its queue check adapted to celery_ext's layout.

    The suite fails any test whose apps use a queue other than ``celery`` (its hygiene rule for
    integration tests).  A celery_ext app, by design, also has its own default queue
    ``<app.name>.default`` (Celery's ``chord_unlock`` and the app's plain tasks) and each worker
    its direct queue ``<app.name>.worker.<hostname>`` (load-aware routing); nothing else passes.
    """
    app.set_current()
    app.set_default()
    yield
    prefix = _config().app.name
    for app_name, test_app in (("function app", app), ("session app", celery_session_app)):
        extra = {
            q
            for q in test_app.amqp.queues
            if q not in ("celery", f"{prefix}.default") and not q.startswith(f"{prefix}.worker.")
        }
        if extra:
            pytest.fail(
                f"Integration {app_name} must only use the shared celery queue and celery_ext's own "
                f"default and direct queues; found {sorted(extra)}"
            )


# Not module-level fixtures: those would also register globally (this module is a plugin).
OVERRIDES: dict[str, Any] = {
    "celery_config": pytest.fixture(scope="session")(_celery_config),
    "ZZZZ_set_app_current": pytest.fixture(autouse=True)(_set_app_current),
}
if os.environ.get("CELERY_EXT_SUITE_WORKER", "factory") == "factory":
    OVERRIDES["celery_session_app"] = pytest.fixture(scope="session")(_celery_session_app)
ADDED: dict[str, Any] = {}
if os.environ.get("CELERY_EXT_SUITE_PING_CHECK") == "0":
    ADDED["celery_worker_parameters"] = pytest.fixture(scope="session")(lambda: {"perform_ping_check": False})


@pytest.hookimpl(tryfirst=True)
def pytest_plugin_registered(plugin: object, plugin_name: str) -> None:
    if getattr(plugin, "__name__", None) == SUITE_CONFTEST:
        for name, fixture in OVERRIDES.items():
            if not hasattr(plugin, name):
                raise pytest.UsageError(f"{SUITE_CONFTEST} has no fixture {name!r} to override")
            setattr(plugin, name, fixture)
        for name, fixture in ADDED.items():
            setattr(plugin, name, fixture)
