"""Unit tests: no servers started, no worker processes.

The tree mirrors the package: the tests of ``celery_ext/<path>/<module>.py`` are in
``tests/unit/<path>/test_<module>.py`` (a package's ``__init__.py`` in ``test_init.py``; a module
whose tests are long may add ``test_<module>_<aspect>.py``).  ``test_deploy.py`` checks ``deploy/``.
"""
