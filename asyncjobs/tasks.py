"""Tasks: the ``@task`` decorator, the registry built from modules, and params validation."""

from __future__ import annotations

import importlib
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from .config import TaskOverride
from .errors import ConfigError

_ATTR = "__asyncjobs_task__"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
CONTEXT_PARAM = "ctx"  # a handler parameter of this name receives the JobContext


class TaskFailure(Exception):
    """Raise in a handler to fail the job with an error type of your choosing."""

    def __init__(self, message: str, *, type: str = "exception") -> None:
        super().__init__(message)
        self.type = type
        self.message = message


class Retry(Exception):
    """Raise in a handler to ask for another attempt, after ``delay_s`` (default: the task's backoff).

    Without attempts left (``retries`` spent), the job fails with the given message.
    """

    def __init__(self, message: str = "the handler asked for a retry", *, delay_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.delay_s = delay_s


@dataclass(frozen=True)
class Blob:
    """Return from a handler for a bytes result served with its own content type."""

    data: bytes
    content_type: str = "application/octet-stream"


@dataclass(frozen=True)
class InputFile:
    """A file param's upload, on local disk before the handler runs (read it; never move or change it)."""

    path: Path
    name: str  # the client's file name, sanitised: for display only
    size: int
    content_type: str
    sha256: str  # lowercase hex


@dataclass(frozen=True)
class FileResult:
    """Return from a handler for a file result: the file at ``path`` is moved (or copied) into the store.

    ``name`` is the download name (default: the file's own name).
    """

    path: str | Path
    content_type: str = "application/octet-stream"
    name: str | None = None


@dataclass(frozen=True)
class FileParam:
    """A handler parameter annotated ``InputFile``: sent as a file, not in the JSON params."""

    name: str
    required: bool = True
    accept: tuple[str, ...] = ()  # content types (``video/*`` patterns); empty: any

    def accepts(self, content_type: str) -> bool:
        if not self.accept:
            return True
        kind = content_type.split(";", 1)[0].strip().lower()
        return any(kind == pattern or (pattern.endswith("/*") and kind.startswith(pattern[:-1]))
                   for pattern in self.accept)

    def describe(self) -> dict[str, Any]:
        return {"required": self.required, "content_types": list(self.accept) or ["*/*"]}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    fn: Callable[..., Any]
    schema: dict[str, Any]
    route: tuple[str, str] | None = None  # (method, path)
    timeout: float | None = None  # seconds; None: no limit
    retries: int = 0
    retry_delay: float = 1.0  # seconds before the first retry; doubles each time
    concurrency: int | None = None  # jobs of this task running at once; None: any
    unique: bool = False
    reuse: float | None = None  # seconds a succeeded job answers equal submits (and live ones always do)
    description: str = ""
    files: tuple[FileParam, ...] = ()
    is_async: bool = field(default=False)
    wants_context: bool = field(default=False)

    @property
    def max_attempts(self) -> int:
        return 1 + self.retries

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "route": {"method": self.route[0], "path": self.route[1]} if self.route else None,
            "params_schema": self.schema,
            "timeout": self.timeout,
            "retries": self.retries,
            "concurrency": self.concurrency,
            "unique": self.unique,
            "reuse": self.reuse,
            "file_params": {f.name: f.describe() for f in self.files},
        }

    def file_param(self, name: str) -> FileParam | None:
        return next((f for f in self.files if f.name == name), None)


def task(
    name: str | None = None,
    *,
    route: str | None = None,
    timeout: float | None = None,
    retries: int = 0,
    retry_delay: float = 1.0,
    concurrency: int | None = None,
    unique: bool = False,
    reuse: float | None = None,
    schema: dict[str, Any] | None = None,
    accept: Mapping[str, Sequence[str]] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a function as a task handler; modules listed in ``tasks.modules`` are scanned for them.

    ``unique``: an equal submit (same principal, task, params and files) while a job is queued or
    running gets that job (``303``); ``reuse=N`` also gets an equal job that succeeded in the last N
    seconds. ``route`` mounts the task on its own path, e.g. ``"POST /thumbnails"`` or
    ``"DELETE /items/{item_id}"``. ``schema`` (a JSON Schema subset) replaces
    the one derived from the signature. Parameters annotated ``InputFile`` are file
    params; ``accept`` maps one to the content types it takes (``"video/*"`` patterns).
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        task_name = name or fn.__name__
        if not _NAME_RE.match(task_name):
            raise ValueError(f"task name {task_name!r}: use letters, digits, '_', '.', '-'")
        files = file_params_of(fn, accept or {})
        setattr(fn, _ATTR, TaskSpec(
            name=task_name,
            fn=fn,
            schema=schema if schema is not None else schema_from_signature(fn),
            route=_parse_route(route) if route else None,
            timeout=timeout,
            retries=retries,
            retry_delay=retry_delay,
            concurrency=concurrency,
            unique=unique,
            reuse=reuse,
            description=inspect.getdoc(fn) or "",
            files=files,
            is_async=inspect.iscoroutinefunction(fn),
            wants_context=CONTEXT_PARAM in inspect.signature(fn).parameters,
        ))
        return fn

    return decorate


def _parse_route(route: str) -> tuple[str, str]:
    method, _, path = route.strip().partition(" ")
    method = method.upper()
    if method not in _METHODS or not path.startswith("/"):
        raise ValueError(f"route {route!r}: expected 'METHOD /path', METHOD one of {', '.join(_METHODS)}")
    return method, path.strip()


# -- schema from a signature ----------------------------------------------

def _type_schema(annotation: Any) -> dict[str, Any]:
    if annotation is inspect.Parameter.empty or annotation is Any:
        return {}
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_type_schema(a) for a in args]}
    if origin is Literal:
        return {"enum": list(args)}
    if annotation is type(None):
        return {"type": "null"}
    simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if annotation in simple:
        return {"type": simple[annotation]}
    if annotation is list or origin is list:
        return {"type": "array", **({"items": _type_schema(args[0])} if args else {})}
    if annotation is dict or origin is dict:
        return {"type": "object"}
    return {}


def _is_file_annotation(annotation: Any) -> bool:
    """``InputFile``, or ``InputFile | None`` for an optional file."""
    if annotation is InputFile:
        return True
    args = typing.get_args(annotation)
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and InputFile in args \
        and all(a in (InputFile, type(None)) for a in args)


def _signature_params(fn: Callable[..., Any]) -> Iterator[tuple[inspect.Parameter, Any]]:
    hints = typing.get_type_hints(fn)
    for param in inspect.signature(fn).parameters.values():
        if param.name != CONTEXT_PARAM:
            yield param, hints.get(param.name, param.annotation)


def file_params_of(fn: Callable[..., Any], accept: Mapping[str, Sequence[str]]) -> tuple[FileParam, ...]:
    files = tuple(
        FileParam(param.name, required=param.default is inspect.Parameter.empty,
                  accept=tuple(p.lower() for p in accept.get(param.name, ())))
        for param, annotation in _signature_params(fn) if _is_file_annotation(annotation))
    unknown = set(accept) - {f.name for f in files}
    if unknown:
        raise ValueError(f"accept names {sorted(unknown)}, which are not InputFile parameters")
    return files


def schema_from_signature(fn: Callable[..., Any]) -> dict[str, Any]:
    """The JSON params' schema; ``InputFile`` parameters are files and not part of it."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    extra_allowed = False
    for param, annotation in _signature_params(fn):
        if _is_file_annotation(annotation):
            continue
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            extra_allowed = True
            continue
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        prop = _type_schema(annotation)
        if param.default is inspect.Parameter.empty:
            required.append(param.name)
        else:
            prop = {**prop, "default": param.default}
        properties[param.name] = prop
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": extra_allowed}
    if required:
        schema["required"] = required
    return schema


# -- validation (a JSON Schema subset) --------------------------------------

_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def validate(value: Any, schema: Mapping[str, Any], path: str = "") -> list[dict[str, str]]:
    """Errors as ``[{"field", "message"}]``; empty when ``value`` fits ``schema``."""
    here = path or "params"
    if "anyOf" in schema and not any(not validate(value, s, path) for s in schema["anyOf"]):
        return [{"field": here, "message": "does not match any allowed form"}]
    kind = schema.get("type")
    if kind is not None:
        kinds = [kind] if isinstance(kind, str) else list(kind)
        if not any(_JSON_TYPES[k](value) for k in kinds):
            return [{"field": here, "message": f"expected {' or '.join(kinds)}, got {_json_type_name(value)}"}]
    if "enum" in schema and value not in schema["enum"]:
        return [{"field": here, "message": f"expected one of {schema['enum']}"}]
    errors: list[dict[str, str]] = []
    if _JSON_TYPES["number"](value):
        bounds: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
            ("minimum", lambda b: value >= b, "at least"),
            ("maximum", lambda b: value <= b, "at most"),
            ("exclusiveMinimum", lambda b: value > b, "more than"),
            ("exclusiveMaximum", lambda b: value < b, "less than"),
        )
        for key, ok, words in bounds:
            if key in schema and not ok(schema[key]):
                errors.append({"field": here, "message": f"must be {words} {schema[key]}"})
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append({"field": here, "message": f"must have at least {schema['minLength']} characters"})
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append({"field": here, "message": f"must have at most {schema['maxLength']} characters"})
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += validate(item, schema["items"], f"{path}[{i}]" if path else f"[{i}]")
    if isinstance(value, dict):
        errors += _validate_object(value, schema, path)
    return errors


def _validate_object(value: dict[str, Any], schema: Mapping[str, Any], path: str) -> list[dict[str, str]]:
    errors: list[dict[str, str]] = []
    properties = schema.get("properties", {})
    for name in schema.get("required", ()):
        if name not in value:
            errors.append({"field": _join(path, name), "message": "is required"})
    for name, item in value.items():
        if name in properties:
            errors += validate(item, properties[name], _join(path, name))
        elif schema.get("additionalProperties", True) is False:
            errors.append({"field": _join(path, name), "message": "is not a parameter of this task"})
    return errors


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _json_type_name(value: Any) -> str:
    return next((k for k in ("null", "boolean", "integer", "number", "string", "array", "object")
                 if _JSON_TYPES[k](value)), type(value).__name__)


# -- the registry ---------------------------------------------------------

class TaskRegistry:
    """The tasks one App runs, by name; built from modules, then per-task overrides."""

    def __init__(self, specs: Mapping[str, TaskSpec] | None = None) -> None:
        self._specs: dict[str, TaskSpec] = dict(specs or {})

    def add(self, fn_or_spec: Callable[..., Any] | TaskSpec) -> TaskSpec:
        spec = fn_or_spec if isinstance(fn_or_spec, TaskSpec) else getattr(fn_or_spec, _ATTR, None)
        if spec is None:
            raise ValueError(f"{fn_or_spec!r} is not decorated with @task")
        if spec.name in self._specs and self._specs[spec.name].fn is not spec.fn:
            raise ConfigError(f"task {spec.name!r} is defined twice")
        self._specs[spec.name] = spec
        return spec

    @classmethod
    def from_modules(cls, modules: list[str], overrides: Mapping[str, TaskOverride] | None = None) -> TaskRegistry:
        registry = cls()
        for module_name in modules:
            try:
                module = importlib.import_module(module_name)
            except (ImportError, ValueError, TypeError) as exc:  # ValueError, TypeError: not a module's name
                raise ConfigError(f"tasks.modules: cannot import {module_name!r}: {exc}") from None
            for value in vars(module).values():
                if callable(value) and hasattr(value, _ATTR):
                    registry.add(value)
        registry.apply(overrides or {})
        return registry

    def apply(self, overrides: Mapping[str, TaskOverride]) -> None:
        for name, override in overrides.items():
            if name not in self._specs:
                raise ConfigError(f"[tasks.{name}]: no such task (known: {', '.join(sorted(self._specs))})")
            changes = {k: v for k, v in vars(override).items() if v is not None}
            self._specs[name] = replace(self._specs[name], **changes)

    def get(self, name: str) -> TaskSpec | None:
        return self._specs.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[TaskSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def names(self) -> list[str]:
        return sorted(self._specs)
