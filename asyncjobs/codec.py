"""JSON encoding and timestamps: the one module that imports orjson."""

from __future__ import annotations

import functools
import hashlib
import math
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
    """RFC 3339 UTC with millisecond precision and a ``Z`` (milliseconds truncated, as ``datetime`` does)."""
    if ts is None:
        return None
    fraction, whole = math.modf(ts)  # rounded to the microsecond as datetime.fromtimestamp does
    seconds, micros = divmod(int(whole) * 1_000_000 + round(fraction * 1e6), 1_000_000)
    return f"{_utc_second(seconds)}.{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=4096)
def _utc_second(seconds: int) -> str:
    """The date and time of a whole second; a job's times fall in few distinct seconds, so this is cached."""
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
