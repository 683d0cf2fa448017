"""Configuration: ``config.toml`` plus ``ASYNCJOBS_<SECTION>_<KEY>`` overrides, checked once."""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 1_048_576
    max_wait: float = 60.0  # longest long poll or Prefer: wait, seconds
    access_log: str = "off"  # "off", "text" or "json" (one JSON object a line)
    loop: str = "auto"  # uvloop when it is installed (pip install 'asyncjobs[speed]'), else asyncio; or either by name


@dataclass(frozen=True)
class StoreConfig:
    path: str = "asyncjobs.db"  # the SQLite file (when url is empty)
    synchronous: str = "full"  # "full" or "normal"
    url: str = ""  # "postgresql://...": a server database instead of the SQLite file


@dataclass(frozen=True)
class ClusterConfig:
    """Several nodes on one PostgreSQL database (ignored with SQLite)."""

    lease: float = 30.0  # seconds a running job is held without a heartbeat
    heartbeat: float = 10.0  # seconds between lease renewals


@dataclass(frozen=True)
class QueueConfig:
    workers: int = 8
    max_queued: int = 100_000
    shutdown_grace: float = 10.0


@dataclass(frozen=True)
class JobsConfig:
    retention: float = 86_400.0
    tombstone_retention: float = 604_800.0
    max_age: float = 86_400.0
    cancel_grace: float = 5.0


@dataclass(frozen=True)
class FilesConfig:
    dir: str = ""  # where files live; "": a folder beside store.path
    max_upload_bytes: int = 1_073_741_824  # one uploaded file, at most
    max_total_bytes: int = 0  # all files together, at most; 0: no limit
    read_timeout: float = 60.0  # seconds an upload may stall before it is given up (408)


@dataclass(frozen=True)
class ProtocolConfig:
    monitor: str = "rest"  # or "flow"


@dataclass(frozen=True)
class AuthConfig:
    tokens: dict[str, str] = field(default_factory=dict)
    admins: list[str] = field(default_factory=list)  # principals that see and manage every job
    session_ttl: float = 43_200.0  # seconds a browser session lasts


@dataclass(frozen=True)
class LimitsConfig:
    max_queued_per_principal: int = 0  # 0: no limit
    submit_rate: float = 0.0  # submits per second per principal; 0: no limit
    submit_burst: int = 0  # the token bucket's size; 0: the larger of 1 and the rate, rounded up


@dataclass(frozen=True)
class CallbacksConfig:
    allow_hosts: list[str] = field(default_factory=list)
    secret: str = ""
    max_attempts: int = 8
    retry_delay: float = 1.0  # seconds before the second attempt; doubles each time
    timeout: float = 10.0  # seconds one attempt may take


@dataclass(frozen=True)
class TaskOverride:
    timeout: float | None = None
    retries: int | None = None
    concurrency: int | None = None
    retry_delay: float | None = None
    reuse: float | None = None  # seconds a succeeded job answers equal submits


@dataclass(frozen=True)
class TasksConfig:
    modules: list[str] = field(default_factory=lambda: ["asyncjobs.builtin"])
    overrides: dict[str, TaskOverride] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    files: FilesConfig = field(default_factory=FilesConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "store": StoreConfig,
    "cluster": ClusterConfig,
    "queue": QueueConfig,
    "jobs": JobsConfig,
    "files": FilesConfig,
    "limits": LimitsConfig,
    "protocol": ProtocolConfig,
    "auth": AuthConfig,
    "callbacks": CallbacksConfig,
}

_CHOICES = {
    ("server", "access_log"): ("off", "text", "json"),
    ("server", "loop"): ("auto", "asyncio", "uvloop"),
    ("store", "synchronous"): ("full", "normal"),
    ("protocol", "monitor"): ("rest", "flow"),
}
_POSITIVE = {("server", "max_body_bytes"), ("server", "max_wait"), ("queue", "workers"), ("queue", "max_queued"),
             ("callbacks", "max_attempts"), ("callbacks", "timeout"), ("files", "max_upload_bytes"),
             ("files", "read_timeout"), ("auth", "session_ttl"), ("cluster", "lease"),
             ("cluster", "heartbeat")}
_TASK_POSITIVE = {"timeout", "concurrency"}  # of a [tasks.NAME] table: 0 would fail, or never run, every job
_AT_MOST = {("server", "port"): 65535}


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """Check one value against its field type; ints are accepted where floats are."""
    kind_s = str(kind)
    if kind_s in ("int", "int | None") and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind_s in ("float", "float | None") and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind_s == "str" and isinstance(value, str):
        return value
    if kind_s == "list[str]" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    if kind_s == "dict[str, str]" and isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        return dict(value)
    raise ConfigError(f"{name}: expected {kind_s}, got {value!r}")


def _build(cls: type, section: str, values: Mapping[str, Any]) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"[{section}]: expected a table, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{section}.{key}: unknown key (known: {', '.join(fields)})")
        name = f"{section}.{key}"
        kwargs[key] = _coerce(name, value, fields[key].type)
        choices = _CHOICES.get((section, key))
        if choices and kwargs[key] not in choices:
            raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")
        if isinstance(kwargs[key], float) and not math.isfinite(kwargs[key]):
            raise ConfigError(f"{name}: must be a finite number, got {value!r}")
        if isinstance(kwargs[key], (int, float)) and kwargs[key] < 0:
            raise ConfigError(f"{name}: must not be negative, got {value!r}")
        positive = (section, key) in _POSITIVE or (cls is TaskOverride and key in _TASK_POSITIVE)
        if positive and kwargs[key] is not None and kwargs[key] <= 0:
            raise ConfigError(f"{name}: must be positive, got {value!r}")
        most = _AT_MOST.get((section, key))
        if most is not None and kwargs[key] > most:
            raise ConfigError(f"{name}: must be at most {most}, got {value!r}")
    if cls is StoreConfig and "path" in kwargs and not Path(kwargs["path"]).name:
        raise ConfigError(f"{section}.path: must name a file, got {kwargs['path']!r}")
    return cls(**kwargs)


def _build_tasks(values: Mapping[str, Any]) -> TasksConfig:
    if not isinstance(values, Mapping):
        raise ConfigError(f"[tasks]: expected a table, got {values!r}")
    modules = TasksConfig().modules
    overrides = {}
    for key, value in values.items():
        if key == "modules":
            modules = _coerce("tasks.modules", value, "list[str]")
        elif isinstance(value, Mapping):
            overrides[key] = _build(TaskOverride, f"tasks.{key}", value)
        else:
            raise ConfigError(f"tasks.{key}: unknown key (use tasks.modules or a [tasks.NAME] table)")
    return TasksConfig(modules=modules, overrides=overrides)


def _parse_env_value(section: str, key: str, raw: str) -> Any:
    """An environment value, read as a TOML value when it is one (a number, a list, a table, a quoted string),
    else as a plain string (which the setting's check refuses, naming it, where it wants no text); a text
    setting takes anything but a quoted string as it is (a path of digits is still a path)."""
    fields = {f.name: str(f.type) for f in dataclasses.fields(_SECTIONS[section])} if section in _SECTIONS else {}
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
    if fields.get(key) == "str" and not isinstance(value, str):  # (a quoted one, from an env file, is read)
        return raw
    return value


def url_host(host: str) -> str:
    """A listening address as it stands in a URL: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


CLIENT_VARIABLES = frozenset({"ASYNCJOBS_URL", "ASYNCJOBS_TOKEN"})  # read by the client, not the server


def env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """``ASYNCJOBS_QUEUE_WORKERS=16`` -> ``{"queue": {"workers": 16}}``."""
    out: dict[str, dict[str, Any]] = {}
    sections = sorted([*_SECTIONS, "tasks"], key=len, reverse=True)
    for name, raw in environ.items():
        if not name.startswith("ASYNCJOBS_"):
            continue
        rest = name[len("ASYNCJOBS_"):].lower()
        section = next((s for s in sections if rest.startswith(s + "_")), None)
        if section is None:
            if name in CLIENT_VARIABLES:
                continue
            raise ConfigError(f"{name}: names no section of the configuration (known: "
                              f"{', '.join(s.upper() for s in sorted(sections))}; the client's: "
                              f"{', '.join(sorted(CLIENT_VARIABLES))})")
        key = rest[len(section) + 1:]
        out.setdefault(section, {})[key] = _parse_env_value(section, key, raw)
    return out


def merge(base: dict[str, Any], extra: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for section, values in extra.items():
        target = merged.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"[{section}]: expected a table")
        target.update(values)
    return merged


def from_dict(data: Mapping[str, Any]) -> Config:
    kwargs: dict[str, Any] = {}
    for section, values in data.items():
        if section == "tasks":
            kwargs["tasks"] = _build_tasks(values)
        elif section in _SECTIONS:
            kwargs[section] = _build(_SECTIONS[section], section, values)
        else:
            raise ConfigError(f"[{section}]: unknown section (known: {', '.join([*_SECTIONS, 'tasks'])})")
    return Config(**kwargs)


def load(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Read the file (``config.toml`` in the working directory if it exists), then env, then flags."""
    data: dict[str, Any] = {}
    if path is None and Path("config.toml").exists():
        path = "config.toml"
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except OSError as exc:  # a folder, say, or a file this user may not read
            raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    data = merge(data, env_overrides(os.environ if environ is None else environ))
    data = merge(data, overrides or {})
    return from_dict(data)
