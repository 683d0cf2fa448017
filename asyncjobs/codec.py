"""JSON encoding and timestamps: the one module that imports orjson."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any

import orjson

JSONDecodeError = orjson.JSONDecodeError
Fragment = orjson.Fragment


def dumps(obj: Any) -> bytes:
    """Encode to compact JSON bytes (``Fragment`` values are embedded as they are)."""
    return orjson.dumps(obj)


def dumps_pretty(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2)


def fingerprint(obj: Any) -> str:
    """A stable hash of a JSON value (object keys sorted), for comparing requests and params."""
    return hashlib.sha256(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)).hexdigest()


def loads(data: bytes | str) -> Any:
    """Decode JSON; raises ``JSONDecodeError`` (a ``ValueError``) on bad input."""
    return orjson.loads(data)


def isotime(ts: float | None) -> str | None:
    """RFC 3339 UTC with millisecond precision and a ``Z``."""
    if ts is None:
        return None
    dt = datetime.fromtimestamp(ts, tz=timezone.utc)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{dt.microsecond // 1000:03d}Z"
