"""Typed configuration: config.yaml loading, ``${ENV}`` interpolation, validation, and watching.

Sections: ``app``, ``broker``, ``scheduler``, ``worker``, ``executors``, ``plugins``, ``storage``,
``events``, ``metrics``, ``api``, ``schedules``.  Every model is frozen and forbids unknown keys; a
validation error names the YAML path, e.g. ``worker.capacity: must be >= 1 (got 0)``.
"""

from __future__ import annotations

import abc
import difflib
import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from celery_ext.errors import ConfigError
from celery_ext.registry import CONFIG_LOADERS
from celery_ext.schedules.model import cron_problem, name_problem, timezone_problem, timing_problem

logger = logging.getLogger(__name__)

ENV_VAR = "CELERY_EXT_CONFIG"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def parse_duration(value: Any) -> Any:
    """``100ms``, ``30s``, ``5m``, ``1h``, ``2d`` or a number of seconds -> float seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 30s or 5m (got {value!r})")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNITS[match.group(2)]
    raise ValueError(f"expected a duration such as 100ms, 30s or 5m (got {value!r})")


Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _version_text(value: Any) -> Any:
    # ``version: 1.0`` is a float in YAML: keep what was written.
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


class AppConfig(Model):
    name: str = Field("celery_ext", pattern=r"^[A-Za-z0-9_.-]+$")
    # The deployment's own version: in each worker's registry entry (``celery-ext workers``).
    version: Annotated[str | None, BeforeValidator(_version_text)] = None
    data_dir: str = ".celery_ext"
    max_payload_bytes: int = Field(256 * 1024, ge=1)
    # Levels of nesting a payload may have ({} is one); celery_ext/validation.py.
    max_payload_depth: int = Field(32, ge=1, le=100)
    log_level: str = "INFO"


class BrokerConfig(Model):
    url: str | None = None
    visibility_timeout: PositiveDuration = 3600.0
    transport_options: dict[str, Any] = Field(default_factory=dict)


class SchedulerConfig(Model):
    # false: ``celery -A celery_ext scheduler`` with this config runs no scheduler (says so, exits 0)
    enabled: bool = True
    load_balance_strategy: str = "least_task"
    load_balance_config: dict[str, Any] = Field(default_factory=dict)
    # shared: stateful strategies keep their state in the registry's Redis for every producer;
    # local: each process keeps its own (routing/shared.py).
    load_balance_state: Literal["shared", "local"] = "shared"
    registry_url: str | None = None
    routing_cache: Duration = 0.2
    interval: PositiveDuration = 1.0
    # A dead leader is replaced within this (and a round): three renewals at the default interval.
    leader_lease: PositiveDuration = 3.0
    publish_grace: PositiveDuration = 30.0
    # A QUEUED record older than this whose message is in no queue (a queue purged on its own) is
    # published again; the oldest ``lost_batch`` are checked each time, unless this app's queues
    # hold more than ``lost_scan_limit`` messages (routing/presence.py).
    lost_after: PositiveDuration = 300.0
    lost_batch: int = Field(500, ge=1, le=100_000)
    lost_scan_limit: int = Field(20_000, ge=1)
    retention_interval: PositiveDuration = 300.0
    # Delays (submit delay/run_at, retry backoffs) up to this are published at once with a
    # Celery countdown and wait in a worker; longer ones wait in storage (SCHEDULED/RETRYING with
    # run_at) and the leader publishes them when due, this far ahead with the rest as countdown.
    max_countdown: Duration = 1.0
    # Due records published per batch (one query, one conditional update, one producer batch).
    due_batch: int = Field(1000, ge=1, le=100_000)
    # Run a scheduler thread inside each worker (it leads only when elected): "auto" does so
    # when the broker is the embedded default, so delayed tasks need no extra command there.
    in_worker: bool | Literal["auto"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _scan_interval(cls, data: Any) -> Any:
        """``scan_interval`` (the design's name) is ``interval``."""
        if isinstance(data, Mapping) and "scan_interval" in data:
            data = dict(data)
            if "interval" in data:
                raise ValueError("scan_interval is an alias of interval: give one of them (got both)")
            data["interval"] = data.pop("scan_interval")
        return data


class WorkerConfig(Model):
    # false: ``celery -A celery_ext worker`` with this config runs no worker (says so, exits 0)
    enabled: bool = True
    capacity: int = Field(4, ge=1)
    weight: int = Field(1, ge=1)
    supported_types: list[str] = Field(default_factory=list)
    pool: str = Field("prefork", pattern=r"^(prefork|threads|solo)$")
    heartbeat_interval: PositiveDuration = 1.0
    offline_after: PositiveDuration | None = None
    task_lease: PositiveDuration = 12.0
    # A worker whose consumer took no message for this long while messages wait in its queues
    # and pool slots are free is reported unhealthy in the registry (0: never).
    stall_after: Duration = 60.0
    default_max_retries: int = Field(3, ge=0)
    default_timeout: PositiveDuration | None = None
    hard_timeout_grace: Duration = 5.0
    retry_backoff: Duration = 1.0
    retry_backoff_max: Duration = 300.0
    retry_jitter: bool = True
    max_log_lines_per_task: int = Field(1000, ge=0)
    max_log_line_bytes: int = Field(8192, ge=64)
    # Where a plain Celery producer's send_task lands when it names no queue: every worker also
    # consumes it and hands a type it does not run to that type's queue.  Empty: not consumed.
    celery_queue: str = "celery"

    @property
    def offline_threshold(self) -> float:
        return self.offline_after if self.offline_after is not None else 3 * self.heartbeat_interval


class ExecutorEntry(Model):
    type: str
    enabled: bool = True
    config: dict[str, Any] = Field(default_factory=dict)


class PluginEntry(Model):
    name: str
    enabled: bool = True
    config: dict[str, Any] = Field(default_factory=dict)


class RetentionConfig(Model):
    """How long finished tasks (per terminal status), log lines and saved groups are kept; unset keeps
    forever."""

    succeeded: PositiveDuration | None = None
    failed: PositiveDuration | None = None
    cancelled: PositiveDuration | None = None
    dead: PositiveDuration | None = None
    logs: PositiveDuration | None = None
    groups: PositiveDuration | None = None  # groups saved by Celery's GroupResult.save(), after saving
    batch_size: int = Field(1000, ge=1)


class StorageConfig(Model):
    type: str = "sqlite"
    config: dict[str, Any] = Field(default_factory=dict)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)


class EventsConfig(Model):
    type: str = "local"
    config: dict[str, Any] = Field(default_factory=dict)


class MetricsConfig(Model):
    type: str = "null"
    config: dict[str, Any] = Field(default_factory=dict)


def _default_executors() -> list[ExecutorEntry]:
    return [ExecutorEntry(type="python")]


class ApiConfig(Model):
    """``celery-ext api`` (the REST API)."""

    host: str = "127.0.0.1"
    port: int = Field(8808, ge=1, le=65535)
    token: str | None = None
    max_body_bytes: int = Field(1_048_576, ge=1024)


class ScheduleEntry(Model):
    """One periodic schedule (celery_ext/schedules): ``task_type`` fired on ``cron`` or ``every``."""

    name: str
    task_type: str = Field(min_length=1, max_length=128)
    payload: dict[str, Any] = Field(default_factory=dict)
    cron: str | None = None  # 5 fields: minute hour day-of-month month day-of-week
    every: PositiveDuration | None = None
    timezone: str = "UTC"  # IANA name; cron times are wall-clock times there
    catch_up: Literal["skip", "once"] = "skip"  # fire times missed while no scheduler ran
    paused: bool = False
    priority: int = Field(0, ge=0, le=9)
    max_retries: int | None = Field(None, ge=0)
    timeout: PositiveDuration | None = None

    @field_validator("name", "cron", "timezone")
    @classmethod
    def _schedule_field(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Checked as an API schedule is (celery_ext/schedules/model.py)."""
        check = {"name": name_problem, "cron": cron_problem, "timezone": timezone_problem}[str(info.field_name)]
        problem = None if value is None else check(value)
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _one_timing(self) -> ScheduleEntry:
        problem = timing_problem(self.cron, self.every)
        if problem:
            raise ValueError(problem)
        return self


def _unique_names(entries: list[ScheduleEntry]) -> list[ScheduleEntry]:
    names = [e.name for e in entries]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"schedule names must be unique (got {', '.join(twice)} more than once)")
    return entries


class Config(Model):
    app: AppConfig = Field(default_factory=AppConfig)
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    executors: list[ExecutorEntry] = Field(default_factory=_default_executors)
    plugins: list[PluginEntry] = Field(default_factory=list)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    schedules: Annotated[list[ScheduleEntry], AfterValidator(_unique_names)] = Field(default_factory=list)
    source: str | None = Field(None, exclude=True)

    @property
    def data_dir(self) -> Path:
        # A file's directory; the working directory for defaults and loaders that are not files.
        base = Path(self.source).parent if self.source and "://" not in self.source else Path.cwd()
        return (base / self.app.data_dir).resolve()


# --- error rendering -----------------------------------------------------------------------

# Pydantic error types in plain words (also the REST API's, which adds its own).
ERROR_MESSAGES = {
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "extra_forbidden": "unknown key",
    "missing": "required",
    "string_pattern_mismatch": "does not match {pattern}",
}


def format_path(loc: tuple[int | str, ...], prefix: str = "") -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def format_errors(exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> list[str]:
    """One line per error, ``<yaml path>: <problem>``; with ``model`` (the one validated), an
    unknown key also gets the closest known key of its section (``did you mean 'capacity'?``)."""
    lines = []
    for err in exc.errors():
        template = ERROR_MESSAGES.get(err["type"])
        ctx = err.get("ctx") or {}
        if template:
            message = template.format(**ctx)
        else:
            message = str(ctx.get("error") or err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and model is not None and err["loc"]:
            message += _suggestion(str(err["loc"][-1]), keys_at(model, tuple(err["loc"][:-1])))
        if err["type"] not in ("missing", "extra_forbidden") and "(got" not in message:
            message += f" (got {err.get('input')!r})"
        lines.append(f"{format_path(tuple(err['loc']), prefix)}: {message}")
    return lines


def _suggestion(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def keys_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The keys a model accepts at a YAML location (list indexes skipped); empty if not a model."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        cls = _model_in(current)
        field = cls.model_fields.get(part) if cls is not None else None
        if field is None:
            return []
        current = field.annotation
    cls = _model_in(current)
    return sorted(cls.model_fields) if cls is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model in an annotation such as ``Model``, ``list[Model]`` or ``Model | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


M = TypeVar("M", bound=BaseModel)


def validate_section(model: type[M], data: Mapping[str, Any], path: str) -> M:
    """Validate one extension's ``config`` mapping; errors are prefixed with its YAML path."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, path, model)) from None


# --- loading -------------------------------------------------------------------------------


def interpolate(value: Any, env: Mapping[str, str], path: str = "", missing: list[str] | None = None) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of a parsed YAML tree."""
    missing = [] if missing is None else missing
    if isinstance(value, dict):
        return {k: interpolate(v, env, format_path((str(k),), path), missing) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, f"{path}[{i}]", missing) for i, v in enumerate(value)]
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            missing.append(f"{path}: environment variable {name} is not set")
            return ""

        return _ENV_REF.sub(sub, value)
    return value


def parse_config(data: Any, *, source: str | None = None, env: Mapping[str, str] | None = None) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"(top level): expected a mapping of sections (got {type(data).__name__})")
    missing: list[str] = []
    data = interpolate(data, os.environ if env is None else env, "", missing)
    if missing:
        raise ConfigError(missing)
    try:
        return Config.model_validate({**data, "source": source})
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, model=Config)) from None


def read_yaml(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    return parse_yaml(raw, path)


def parse_yaml(raw: bytes, where: object) -> Any:
    """A config document (YAML, or JSON, which is YAML) as a tree; errors name ``where``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: not a UTF-8 text file (byte {exc.start}: {exc.reason})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: invalid YAML: {exc}") from None


def find_config_file(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """``--config``, then ``$CELERY_EXT_CONFIG``, then ``./config.yaml``; None means defaults."""
    if explicit:
        return Path(explicit)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    local = Path("config.yaml")
    return local if local.is_file() else None


def config_version(config: Config) -> str:
    """Names a config: equal configs, equal versions, in every process (the worker registry's
    ``config_version``, ``celery-ext config apply`` and ``config status``)."""
    return hashlib.sha1(config.model_dump_json().encode()).hexdigest()[:12]  # noqa: S324 - a name, not a secret


class ConfigLoader(abc.ABC):
    """Where a process's config comes from: the ``celery_ext.config_loaders`` extension point.

    ``--config`` / ``$CELERY_EXT_CONFIG`` is a path (the YAML file loader) or a URL whose scheme
    names a loader (``redis://host:6379/0#key``: the Redis key loader, ``celery_ext.config_store``).
    A loader implements ``read``; ``load`` and ``watch`` (a poll of ``read``'s version every
    ``poll_interval``) come with it.
    """

    def __init__(self, location: str, poll_interval: float = 1.0) -> None:
        self.location = location
        self.poll_interval = poll_interval

    @abc.abstractmethod
    def read(self) -> tuple[Any, str]:
        """The config tree as parsed, before ``${ENV}`` interpolation (None: empty), and a version
        (an ETag) that changes whenever the tree does.  ``ConfigError`` when it cannot be read."""

    def version(self) -> str:
        """The version ``read`` would return, maybe cheaper (what ``watch`` polls)."""
        return self.read()[1]

    @property
    def source(self) -> str | None:
        """``Config.source`` of what this loader loads (shown in logs, never a password)."""
        from kombu.utils.url import maybe_sanitize_url

        url, hash_, fragment = self.location.partition("#")
        return f"{maybe_sanitize_url(url)}{hash_}{fragment}"

    def load(self) -> Config:
        return parse_config(self.read()[0], source=self.source)

    def watch(self, callback: Callable[[Config], None]) -> Callable[[], None]:
        """Call ``callback`` with each new valid config; returns a function that stops watching.
        An invalid or unreadable change is logged and the running config stays."""
        stop = threading.Event()

        def version() -> str | None:
            try:
                return self.version()
            except Exception:  # noqa: BLE001 - unreadable (a file being replaced, Redis away): next round
                return None

        seen = version()  # before returning: a change made once watch() returned is seen
        settle = min(0.1, self.poll_interval)

        def loop() -> None:
            nonlocal seen
            while not stop.wait(self.poll_interval):
                current = version()
                if current is None or current == seen:
                    continue
                # A file being written (not renamed into place) changes twice in a row: wait
                # until it holds still, never apply a half-written one.
                if stop.wait(settle) or version() != current:
                    continue
                seen = current
                # Nothing may end this thread (a later valid change must still apply): any
                # failure to read, parse or apply a change is logged and the running config stays.
                try:
                    data = self.read()[0]
                    if data is None:
                        logger.error("config %s is empty, keeping the last good config", self.source)
                        continue
                    config = parse_config(data, source=self.source)
                except ConfigError as exc:
                    logger.error("config %s is invalid, keeping the last good config:\n%s", self.source, exc)
                    continue
                except Exception as exc:  # noqa: BLE001 - e.g. RecursionError from a pathological YAML
                    logger.error(
                        "config %s could not be read (%s: %s), keeping the last good config",
                        self.source,
                        exc.__class__.__name__,
                        exc,
                    )
                    continue
                try:
                    callback(config)
                except Exception:  # noqa: BLE001
                    logger.exception("config %s: applying the new config failed; keeping the running one", self.source)

        threading.Thread(target=loop, name="celery_ext-config-watch", daemon=True).start()
        return stop.set


class YamlConfigLoader(ConfigLoader):
    """The ``file`` loader: a YAML file with ``${ENV}`` interpolation, versioned by its content
    (not its mtime: two edits within a filesystem's mtime granularity would look like one)."""

    def __init__(self, path: str | os.PathLike[str] | None = None, poll_interval: float = 1.0) -> None:
        if isinstance(path, str) and path.startswith("file://"):
            path = path.removeprefix("file://")
        self.path = find_config_file(path)
        super().__init__(str(self.path or ""), poll_interval)

    @property
    def source(self) -> str | None:
        return str(self.path.resolve()) if self.path is not None else None

    def read(self) -> tuple[Any, str]:
        if self.path is None:
            return None, ""
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot read config file ({exc.strerror})") from None
        return parse_yaml(raw, self.path), hashlib.sha1(raw).hexdigest()  # noqa: S324 - an ETag

    def version(self) -> str:
        if self.path is None:
            return ""
        return hashlib.sha1(self.path.read_bytes()).hexdigest()  # noqa: S324 - an ETag


def loader_for(location: str | os.PathLike[str] | None = None, poll_interval: float = 1.0) -> ConfigLoader:
    """The loader of ``--config`` (``location``), else ``$CELERY_EXT_CONFIG``, else ``./config.yaml``:
    a path or ``file://`` is the YAML file loader; ``<scheme>://...`` the loader registered for
    that scheme (built-in: ``redis``, ``rediss``, ``unix``; then the ``celery_ext.config_loaders`` group)."""
    text = str(location) if location else os.environ.get(ENV_VAR) or None
    scheme = text.split("://", 1)[0] if text and "://" in text else ""
    if text is None or not scheme or scheme == "file":
        return YamlConfigLoader(text, poll_interval)
    from kombu.utils.url import maybe_sanitize_url

    cls = CONFIG_LOADERS.resolve(scheme, f"config location {maybe_sanitize_url(text)!r}")
    loader: ConfigLoader = cls(text, poll_interval)
    return loader


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    return loader_for(path).load()
