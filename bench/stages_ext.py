"""celery_ext's app with ``bench/stages.py``'s marks: ``celery -A bench.stages_ext worker``."""

from __future__ import annotations

from bench import stages
from celery_ext import app

if stages.PATH:
    stages.install_ext()

__all__ = ["app"]
