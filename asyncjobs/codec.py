"""JSON encoding and timestamps: the one module that imports orjson."""

from __future__ import annotations

import functools
import hashlib
import math
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

JSONDecodeError = orjson.JSONDecodeError
Fragment = orjson.Fragment


def dumps(obj: Any) -> bytes:
    """Encode to compact JSON bytes (``Fragment`` values are embedded as they are)."""
    return orjson.dumps(obj)


def scrubbed(obj: Any) -> Any:
    """``obj`` with every string made valid Unicode: a client's bytes that were not UTF-8 (kept by aiohttp as
    lone surrogates, which no JSON encoder takes) become ``?``, so an answer that echoes them can be sent."""
    if isinstance(obj, str):
        return obj.encode("utf-8", "replace").decode("utf-8")
    if isinstance(obj, dict):
        return {scrubbed(k): scrubbed(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrubbed(v) for v in obj]
    return obj


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
    if ts >= 0:  # every job's times: the whole seconds by int(), the fraction exactly as modf gives it
        seconds = int(ts)
        micros = round((ts - seconds) * 1e6)  # rounded to the microsecond as datetime.fromtimestamp does
        if micros == 1_000_000:
            seconds, micros = seconds + 1, 0
    else:
        fraction, whole = math.modf(ts)
        seconds, micros = divmod(int(whole) * 1_000_000 + round(fraction * 1e6), 1_000_000)
    return f"{_utc_second(seconds)}.{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=4096)
def _utc_second(seconds: int) -> str:
    """The date and time of a whole second; a job's times fall in few distinct seconds, so this is cached."""
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")


def canonical(obj: Any) -> bytes:
    """RFC 8785 (JCS) canonical JSON: keys sorted by UTF-16 code units, numbers as ECMAScript prints
    them (``1`` and ``1.0`` alike), strings escaped minimally, no white space; so equal JSON values
    give equal bytes whatever their key order, spacing, escapes or number form."""
    return "".join(_canonical_parts(obj)).encode("utf-8")


def _canonical_parts(obj: Any) -> list[str]:
    out: list[str] = []
    stack: list[Any] = [obj]
    while stack:  # iterative: params are already depth-checked, but no recursion limit is relied on
        item = stack.pop()
        if isinstance(item, _Raw):
            out.append(item.text)
        elif isinstance(item, dict):
            keys = sorted(item, key=lambda k: k.encode("utf-16-be"))
            stack.append(_Raw("}"))
            for i, key in reversed(list(enumerate(keys))):
                stack.append(item[key])
                stack.append(_Raw(("," if i else "") + orjson.dumps(key).decode() + ":"))
            stack.append(_Raw("{"))
        elif isinstance(item, (list, tuple)):
            stack.append(_Raw("]"))
            for i, value in reversed(list(enumerate(item))):
                stack.append(value)
                if i:
                    stack.append(_Raw(","))
            stack.append(_Raw("["))
        elif isinstance(item, bool) or item is None or isinstance(item, str):
            out.append(orjson.dumps(item).decode())
        elif isinstance(item, (int, float)):
            out.append(_es_number(float(item)))
        else:
            raise TypeError(f"not a JSON value: {type(item).__name__}")
    return out


class _Raw:
    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _es_number(value: float) -> str:
    """A number as ECMAScript's Number.prototype.toString prints it (RFC 8785, 3.2.2.3)."""
    if not math.isfinite(value):
        raise ValueError("NaN and infinities are not JSON")
    if value == 0:
        return "0"
    if value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    sign, digit_tuple, exponent = Decimal(repr(value)).as_tuple()  # the shortest digits that round-trip
    digits = "".join(map(str, digit_tuple)).rstrip("0")
    exponent = int(exponent) + len(digit_tuple) - len(digits)
    n = len(digits) - 1 + exponent  # the power of ten of the first digit
    text: str
    if 0 <= n < 21:
        text = digits[:n + 1].ljust(n + 1, "0") + ("." + digits[n + 1:] if len(digits) > n + 1 else "")
    elif -7 < n < 0:
        text = "0." + "0" * (-n - 1) + digits
    else:
        text = digits[0] + ("." + digits[1:] if len(digits) > 1 else "") + f"e{'+' if n > 0 else '-'}{abs(n)}"
    return ("-" if sign else "") + text
