"""The codec's timestamps: the wire's RFC 3339 strings."""

import random
from datetime import datetime, timezone

import pytest

from asyncjobs.codec import isotime


def reference(ts: float) -> str:
    dt = datetime.fromtimestamp(ts, tz=timezone.utc)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{dt.microsecond // 1000:03d}Z"


@pytest.mark.parametrize("ts, text", [
    (0.0, "1970-01-01T00:00:00.000Z"),
    (1700000000.123456, "2023-11-14T22:13:20.123Z"),
    (1700000000.9999996, "2023-11-14T22:13:21.000Z"),  # rounds up into the next second, as datetime does
    (1700000000.0009, "2023-11-14T22:13:20.000Z"),  # milliseconds are truncated, not rounded
])
def test_isotime_known_values(ts, text):
    assert isotime(ts) == text


def test_isotime_matches_datetime_formatting():
    """The cached fast path gives exactly what formatting a datetime gives."""
    rng = random.Random(7)
    for _ in range(20_000):
        ts = rng.uniform(0, 4e9)
        if rng.random() < 0.2:
            ts = int(ts) + rng.choice([0.9999996, 0.0004999, 0.9995, 0.1235])
        assert isotime(ts) == reference(ts), ts


def test_isotime_none():
    assert isotime(None) is None


@pytest.mark.parametrize("ts", [-0.0004, -1.5, -86400.9999996, -1e-7])
def test_isotime_before_the_epoch_matches_datetime(ts):
    assert isotime(ts) == reference(ts)
