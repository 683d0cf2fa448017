"""Tasks: the decorator, schemas derived from signatures, validation and the registry."""

from typing import Any, Literal

import pytest

from asyncjobs import TaskRegistry, task
from asyncjobs.config import TaskOverride
from asyncjobs.errors import ConfigError
from asyncjobs.tasks import schema_from_signature, validate


@task()
async def typed(ctx: Any, name: str, count: int, ratio: float = 1.0, mode: Literal["a", "b"] = "a",
                tags: list[str] | None = None) -> None:
    return None


def test_schema_from_signature():
    """Required params, defaults, types, Literal and Optional come from the signature; ctx is left out."""
    schema = schema_from_signature(typed)
    assert schema["required"] == ["name", "count"]
    assert schema["additionalProperties"] is False
    props = schema["properties"]
    assert "ctx" not in props
    assert props["count"] == {"type": "integer"}
    assert props["ratio"] == {"type": "number", "default": 1.0}
    assert props["mode"]["enum"] == ["a", "b"]
    assert props["tags"]["anyOf"] == [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]


@pytest.mark.parametrize("params,fields", [
    ({"name": "x", "count": 1}, []),
    ({"name": "x", "count": 1, "ratio": 2, "tags": ["a"], "mode": "b"}, []),
    ({"count": 1}, ["name"]),
    ({"name": "x", "count": 1.5}, ["count"]),
    ({"name": "x", "count": True}, ["count"]),
    ({"name": "x", "count": 1, "mode": "c"}, ["mode"]),
    ({"name": "x", "count": 1, "tags": [1]}, ["tags"]),
    ({"name": "x", "count": 1, "extra": 1}, ["extra"]),
    ({}, ["name", "count"]),
])
def test_validation_names_each_field(params, fields):
    """Each invalid param is reported by name; valid params give no errors."""
    errors = validate(params, schema_from_signature(typed))
    assert sorted(e["field"] for e in errors) == sorted(fields)
    assert all(e["message"] for e in errors)


def test_validation_of_bounds_and_nesting():
    """minimum/maximum, lengths and nested objects and arrays are checked with paths."""
    schema = {"type": "object", "properties": {
        "n": {"type": "number", "minimum": 0, "maximum": 10},
        "s": {"type": "string", "maxLength": 3},
        "inner": {"type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"]},
        "xs": {"type": "array", "items": {"type": "integer"}},
    }}
    errors = validate({"n": -1, "s": "long", "inner": {}, "xs": [1, "a"]}, schema)
    assert sorted(e["field"] for e in errors) == ["inner.k", "n", "s", "xs[1]"]


def test_registry_overrides_and_errors():
    """Overrides change a task's settings; an override of an unknown task is a config error."""
    registry = TaskRegistry()
    registry.add(typed)
    registry.apply({"typed": TaskOverride(timeout=3.0, retries=2)})
    spec = registry.get("typed")
    assert spec.timeout == 3.0 and spec.max_attempts == 3 and spec.wants_context
    with pytest.raises(ConfigError, match="nothere"):
        registry.apply({"nothere": TaskOverride(timeout=1.0)})


def test_registry_from_modules():
    """The built-in module registers the protocol's eight tasks; a missing module is a config error."""
    registry = TaskRegistry.from_modules(["asyncjobs.builtin"])
    assert registry.names() == ["bytes", "digest", "echo", "fail", "gzip", "hash", "noop", "sleep"]
    assert not registry.get("hash").is_async and registry.get("sleep").is_async
    with pytest.raises(ConfigError, match="no.such.module"):
        TaskRegistry.from_modules(["no.such.module"])


def test_routes_are_parsed_and_checked():
    """A route is 'METHOD /path'; anything else is refused at decoration time."""

    @task(route="delete /items/{item_id}")
    async def remove(item_id: str) -> None: ...

    assert remove.__asyncjobs_task__.route == ("DELETE", "/items/{item_id}")
    with pytest.raises(ValueError):
        task(route="FETCH items")(remove)
