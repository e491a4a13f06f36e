"""Bare Celery's app (``bench/bare_app.py``) with ``bench/stages.py``'s marks:
``celery -A bench.stages_bare worker``."""

from __future__ import annotations

from bench import stages
from bench.bare_app import app

if stages.PATH:
    stages.install_bare(app)

__all__ = ["app"]
