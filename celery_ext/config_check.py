"""``check_config``: what a worker, a scheduler and the API would check at start, in one run.

``celery-ext config validate`` prints its report.  Every problem is reported, not the first of
each kind: the schema (unknown keys with the closest known key, bad values, missing
``${VAR}``s), then each extension on its own, whatever else failed (a key that does not
validate is checked with its default, a list entry that does not validate is skipped):

* executors: the type resolves, its ``config`` validates, no task type is claimed twice;
  what only a worker needs (the python executor's modules import) is a warning;
* plugins: the name resolves, its ``config`` validates, a name is given once;
* the balancer (``scheduler.load_balance_strategy`` and its settings), the storage backend, the
  event bus and the metrics collector, as they are built at start;
* ``worker.supported_types``: an entry that no configured executor provides is a warning with
  the closest provided type (the users' modules may define it where this runs unimported).

Problems of a disabled executor or plugin are warnings: nothing starts it.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from celery_ext.config import (
    Config,
    ExecutorEntry,
    PluginEntry,
    format_errors,
    interpolate,
    loader_for,
)
from celery_ext.embedded import socket_path
from celery_ext.errors import ConfigError
from celery_ext.events import build_event_bus
from celery_ext.executors.pool import ExecutorSet
from celery_ext.metrics import build_metrics
from celery_ext.plugins.manager import check_plugins
from celery_ext.registry import EXECUTORS, STORAGE
from celery_ext.routing.router import build_balancer

M = TypeVar("M", bound=BaseModel)
_DISABLED = " (the entry is disabled)"


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    config: Config | None = None  # set when the whole file validates
    source: str | None = None


def check_file(path: str | os.PathLike[str] | None = None) -> Report:
    """Check what ``--config`` would load: a file or a loader's URL (built-in defaults when
    there is none)."""
    try:
        loader = loader_for(path)
    except ConfigError as exc:
        return Report(errors=list(exc.errors))
    try:
        data = loader.read()[0]
    except ConfigError as exc:
        return Report(errors=list(exc.errors), source=loader.source)
    return check_config(data, source=loader.source)


def check_config(data: Any, *, source: str | None = None, env: Mapping[str, str] | None = None) -> Report:
    report = Report(source=source)
    data = {} if data is None else data
    if not isinstance(data, dict):
        report.errors.append(f"(top level): expected a mapping of sections (got {type(data).__name__})")
        return report
    missing: list[str] = []
    data = interpolate(data, os.environ if env is None else env, "", missing)
    report.errors.extend(missing)
    try:
        report.config = Config.model_validate({**data, "source": source})
    except ValidationError as exc:
        report.errors.extend(format_errors(exc, model=Config))
    executors = _entries(data, "executors", ExecutorEntry)
    plugins = _entries(data, "plugins", PluginEntry)
    config = report.config or _best_effort(data, source, [e for _, e in executors], [p for _, p in plugins])
    known_types = _check_executors(executors, report)
    _check_plugins(plugins, report)
    _check_parts(config, report)
    _check_supported_types(config, known_types, report)
    if missing:
        report.config = None
    return report


def _entries(data: Mapping[str, Any], key: str, model: type[M]) -> list[tuple[int, M]]:
    """The entries of a list section that validate on their own, with their indexes."""
    if key not in data:
        return list(enumerate(getattr(Config(), key)))  # the defaults
    raw = data[key]
    out = []
    for i, entry in enumerate(raw if isinstance(raw, list) else []):
        try:
            out.append((i, model.model_validate(entry)))
        except ValidationError:
            pass  # reported by the schema check
    return out


def _best_effort(
    data: Mapping[str, Any], source: str | None, executors: list[ExecutorEntry], plugins: list[PluginEntry]
) -> Config:
    """A config of what validates: each section without its keys in error (defaults for them)."""
    parts: dict[str, Any] = {"executors": executors, "plugins": plugins, "source": source}
    for name, info in Config.model_fields.items():
        model = info.annotation
        if name in parts or name not in data or not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        section = _section(model, data[name])
        if section is not None:
            parts[name] = section
    return Config.model_validate(parts)


def _section(model: type[M], raw: Any) -> M | None:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        if not isinstance(raw, dict):
            return None
        bad = {err["loc"][0] for err in exc.errors() if err["loc"]}
        try:
            return model.model_validate({k: v for k, v in raw.items() if k not in bad})
        except ValidationError:
            return None  # reported by the schema check


def _check_executors(entries: list[tuple[int, ExecutorEntry]], report: Report) -> list[str]:
    """Checks each executor; returns the task types the enabled ones provide."""
    built, paths = [], []
    for i, entry in entries:
        path = f"executors[{i}]"
        try:
            cls = EXECUTORS.resolve(entry.type, f"{path}.type")
            executor = cls(cls.parse_settings(entry.config, f"{path}.config"))
        except ConfigError as exc:
            _report(report, entry.enabled, exc.errors)
            continue
        except Exception as exc:  # noqa: BLE001 - a third-party executor may raise anything
            _report(report, entry.enabled, [f"{path}: {exc.__class__.__name__}: {exc}"])
            continue
        if entry.enabled:
            built.append(executor)
            paths.append(f"{path}.config")
    try:
        executors = ExecutorSet(built, paths)
    except ConfigError as exc:
        report.errors.extend(exc.errors)
        return []
    # What only a worker needs: this host may be a client that cannot import the users' code.
    report.warnings.extend(
        f"{problem} (a worker with this config would refuse to start)" for problem in executors.worker_problems()
    )
    return executors.task_types


def _check_plugins(entries: list[tuple[int, PluginEntry]], report: Report) -> None:
    errors, warnings = check_plugins(entries)
    report.errors.extend(errors)
    report.warnings.extend(warnings)


def _check_parts(config: Config, report: Report) -> None:
    """The balancer, storage, event bus and metrics collector, built as at start (no I/O)."""
    checks = (
        lambda: build_balancer(config),
        lambda: STORAGE.resolve(config.storage.type, "storage.type").from_config(
            config.storage.type, config.storage.config, config.data_dir
        ),
        lambda: build_event_bus(config, _broker_url(config)),
        lambda: build_metrics(config),
    )
    for check in checks:
        try:
            check()
        except ConfigError as exc:
            report.errors.extend(exc.errors)


def _broker_url(config: Config) -> str:
    """The broker URL a process would use, without starting the embedded broker."""
    return config.broker.url or f"redis+socket://{socket_path(config.data_dir)}"


def _check_supported_types(config: Config, known: list[str], report: Report) -> None:
    for i, task_type in enumerate(config.worker.supported_types):
        if task_type in known:
            continue
        close = difflib.get_close_matches(task_type, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        report.warnings.append(
            f"worker.supported_types[{i}]: no configured executor provides {task_type!r}{hint} "
            f"(a worker refuses to start unless its modules define it; provided: {', '.join(known) or 'none'})"
        )


def _report(report: Report, enabled: bool, problems: list[str]) -> None:
    if enabled:
        report.errors.extend(problems)
    else:
        report.warnings.extend(p + _DISABLED for p in problems)
