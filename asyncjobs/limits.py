"""Per-principal submit rates: a token bucket each, refilled continuously (in this process)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_PRINCIPALS = 100_000  # buckets kept; a full bucket is forgotten first, as it holds nothing


@dataclass
class _Bucket:
    tokens: float
    at: float  # when ``tokens`` was last brought up to date


@dataclass(frozen=True)
class BucketState:
    """What the RateLimit header fields say: the policy and, for one principal, where its bucket stands."""

    burst: int
    window_s: int  # seconds to refill an empty bucket
    left: int  # whole tokens left
    next_s: int  # seconds until the next token (0 when the bucket is full)


class SubmitRates:
    """``rate`` submits per second per principal, in bursts of at most ``burst``.

    ``take`` spends a token or says how long until one is free; ``refund`` gives back a token
    that bought nothing (a replay, a reused job, a refused submit).
    """

    def __init__(self, rate: float, burst: int = 0, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst or max(1, math.ceil(rate))
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def _bucket(self, principal: str) -> _Bucket:
        now = self.clock()
        bucket = self._buckets.get(principal)
        if bucket is None:
            if len(self._buckets) >= MAX_PRINCIPALS:
                self._forget_full(now)
            bucket = self._buckets[principal] = _Bucket(float(self.burst), now)
        else:
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self.rate)
            bucket.at = now
        return bucket

    def _forget_full(self, now: float) -> None:
        full = [p for p, b in self._buckets.items() if b.tokens + (now - b.at) * self.rate >= self.burst]
        for principal in full or list(self._buckets)[:1]:
            del self._buckets[principal]

    def take(self, principal: str) -> tuple[float, BucketState]:
        """Spend a token: 0.0 if one was free, else the seconds until one is (nothing is spent); and the
        bucket as it stands after, read at the same moment (so a refusal never says a token is left)."""
        bucket = self._bucket(principal)
        wait_s = 0.0
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
        else:
            wait_s = (1.0 - bucket.tokens) / self.rate
        return wait_s, self._state(bucket)

    def refund(self, principal: str) -> None:
        bucket = self._bucket(principal)
        bucket.tokens = min(float(self.burst), bucket.tokens + 1.0)

    def state(self, principal: str) -> BucketState:
        return self._state(self._bucket(principal))

    def _state(self, bucket: _Bucket) -> BucketState:
        missing = 1.0 - (bucket.tokens - math.floor(bucket.tokens))
        full = bucket.tokens >= self.burst
        return BucketState(burst=self.burst, window_s=math.ceil(self.burst / self.rate),
                           left=math.floor(bucket.tokens), next_s=0 if full else math.ceil(missing / self.rate))
