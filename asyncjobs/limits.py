"""Per-principal submit rates: a token bucket each, refilled continuously; kept in this process
(``SubmitRates``), or in a store many processes share (``SharedSubmitRates``), so the rate holds across
every node together. The arithmetic is the pure functions ``refill`` and ``spend``, used by both."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

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


def refill(tokens: float, at: float, now: float, *, rate: float, burst: int) -> float:
    """A bucket's tokens at ``now``, from ``tokens`` at ``at``: refilled at ``rate``, never above ``burst``."""
    return min(float(burst), tokens + max(0.0, now - at) * rate)


def spend(tokens: float, cost: float, *, rate: float, burst: int) -> tuple[float, float]:
    """(tokens after, seconds to wait): a token is spent if one is there (0 to wait), else nothing is and the
    wait is until one is; a negative ``cost`` gives tokens back (a refund), never above ``burst``."""
    if cost <= 0:
        return min(float(burst), tokens - cost), 0.0
    if tokens >= cost:
        return tokens - cost, 0.0
    return tokens, (cost - tokens) / rate


def state_of(tokens: float, *, rate: float, burst: int) -> BucketState:
    missing = 1.0 - (tokens - math.floor(tokens))
    full = tokens >= burst
    return BucketState(burst=burst, window_s=math.ceil(burst / rate), left=math.floor(tokens),
                       next_s=0 if full else math.ceil(missing / rate))


def default_burst(rate: float, burst: int) -> int:
    return burst or max(1, math.ceil(rate))


class Rates(Protocol):
    """What the web layer needs of submit rates, wherever the buckets are kept."""

    rate: float
    burst: int

    async def take_token(self, principal: str) -> tuple[float, BucketState]:
        """Spend a token: (0.0, the bucket after), or (seconds until one is free, the bucket) with nothing spent."""
        ...

    async def give_back(self, principal: str) -> BucketState:
        """Refund a token that bought nothing (a replay, a reused job, a refused submit); the bucket after."""
        ...

    async def peek(self, principal: str) -> BucketState:
        """The bucket as it stands, nothing spent (for a submit refused before it came to the bucket)."""
        ...


# (principal, cost, rate, burst) -> tokens after and seconds to wait, applied atomically where it is kept
SharedBucket = Callable[[str, float, float, int], Awaitable[tuple[float, float]]]


class SharedSubmitRates:
    """Token buckets kept in a store that many processes share: ``bucket`` applies ``spend`` to one
    principal's bucket in a transaction, by the store's clock, so the rate holds across all nodes."""

    def __init__(self, rate: float, burst: int, *, bucket: SharedBucket) -> None:
        self.rate = rate
        self.burst = default_burst(rate, burst)
        self._bucket = bucket

    async def take_token(self, principal: str) -> tuple[float, BucketState]:
        tokens, wait_s = await self._bucket(principal, 1.0, self.rate, self.burst)
        return wait_s, state_of(tokens, rate=self.rate, burst=self.burst)

    async def give_back(self, principal: str) -> BucketState:
        tokens, _ = await self._bucket(principal, -1.0, self.rate, self.burst)
        return state_of(tokens, rate=self.rate, burst=self.burst)

    async def peek(self, principal: str) -> BucketState:
        tokens, _ = await self._bucket(principal, 0.0, self.rate, self.burst)
        return state_of(tokens, rate=self.rate, burst=self.burst)


class SubmitRates:
    """``rate`` submits per second per principal, in bursts of at most ``burst``.

    ``take`` spends a token or says how long until one is free; ``refund`` gives back a token
    that bought nothing (a replay, a reused job, a refused submit).
    """

    def __init__(self, rate: float, burst: int = 0, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = default_burst(rate, burst)
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
            bucket.tokens = refill(bucket.tokens, bucket.at, now, rate=self.rate, burst=self.burst)
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
        bucket.tokens, wait_s = spend(bucket.tokens, 1.0, rate=self.rate, burst=self.burst)
        return wait_s, self._state(bucket)

    def refund(self, principal: str) -> None:
        bucket = self._bucket(principal)
        bucket.tokens, _ = spend(bucket.tokens, -1.0, rate=self.rate, burst=self.burst)

    def state(self, principal: str) -> BucketState:
        return self._state(self._bucket(principal))

    def _state(self, bucket: _Bucket) -> BucketState:
        return state_of(bucket.tokens, rate=self.rate, burst=self.burst)

    async def take_token(self, principal: str) -> tuple[float, BucketState]:
        return self.take(principal)

    async def give_back(self, principal: str) -> BucketState:
        self.refund(principal)
        return self.state(principal)

    async def peek(self, principal: str) -> BucketState:
        return self.state(principal)
