"""Task storage: the durable records (see ``base``) and their backends."""

from __future__ import annotations

from pathlib import Path

from celery_ext.config import StorageConfig
from celery_ext.registry import STORAGE
from celery_ext.storage.base import Storage, TaskLogRepository, TaskRepository

__all__ = ["Storage", "TaskLogRepository", "TaskRepository", "open_storage"]


def open_storage(config: StorageConfig, data_dir: Path) -> Storage:
    """Build the configured backend (no connection is made until first use)."""
    cls = STORAGE.resolve(config.type, "storage.type")
    storage: Storage = cls.from_config(config.type, config.config, data_dir)
    return storage
