"""Unit tests: no worker processes; storage is SQLite in a temp dir (``conftest.py``).  A few talk to
the shared Redis (``test_config_store.py``) or to an HTTP server thread (``executors/test_http.py``).

The tree mirrors the package: the tests of ``celery_ext/<path>/<module>.py`` are in
``tests/unit/<path>/test_<module>.py`` (a package's ``__init__.py`` in ``test_init.py``; a module
whose tests are long may add ``test_<module>_<aspect>.py``).  Two check more than a module:
``test_layers.py`` the package's import structure, ``test_deploy.py`` the files of ``deploy/``.
"""
