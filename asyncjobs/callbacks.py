"""Callbacks: a terminal job is POSTed to its ``callback_url``, signed per Standard Webhooks.

Deliveries are rows in the store, scheduled in the same transaction as the
job's terminal state, so they survive a restart; they are retried with
exponential backoff until a 2xx answer or the attempt budget is spent, on
their own task, so a slow receiver never holds up a worker.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import random
import re
import time
from collections.abc import Callable, Collection, Iterable
from urllib.parse import urlsplit

import aiohttp

from .errors import ConfigError
from .store import Delivery, Store

log = logging.getLogger("asyncjobs.callbacks")

WAIT_CAP_S = 1.0  # the longest the deliverer sleeps without looking at the store


def parse_secret(secret: str) -> bytes:
    """The key of a ``whsec_<base64>`` secret."""
    if not secret.startswith("whsec_"):
        raise ConfigError('callbacks.secret: expected "whsec_" followed by base64')
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("callbacks.secret: the part after whsec_ is not base64") from None
    if len(key) < 16:
        raise ConfigError("callbacks.secret: use at least 16 random bytes")
    return key


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``, as Standard Webhooks defines it."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


_DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST_NAME = re.compile(r"[\w.-]+")  # a DNS name (international too) or an IPv4 address; no wildcards


def allow_list(entries: Iterable[str]) -> tuple[str, ...]:
    """``callbacks.allow_hosts`` as ``host_allowed`` compares it: each entry a "host" or a "host:port" (an IPv6
    address in brackets, or bare without a port), lowercased. Anything else (a URL, a path, a bad port, an
    empty entry) is a ConfigError naming it."""
    allowed = []
    for entry in entries:
        normal = _allow_entry(entry)
        if normal is None:
            raise ConfigError(f'callbacks.allow_hosts: expected "host" or "host:port", got {entry!r}')
        allowed.append(normal)
    return tuple(allowed)


def _allow_entry(entry: str) -> str | None:
    """One allow-list entry as ``_host_port`` writes it; None when it is not a host or a host:port."""
    bare_ipv6 = entry.count(":") > 1 and not entry.startswith("[")
    try:
        parts = urlsplit(f"//[{entry}]" if bare_ipv6 else f"//{entry}")
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if host is None or not (":" in host or _HOST_NAME.fullmatch(host)) or "@" in entry:
        return None
    return None if parts.path or parts.query or parts.fragment or "#" in entry else _host_port(host, port)


def _host_port(host: str, port: int | None) -> str:
    """``host`` (lowercased, an IPv6 address in brackets), with ``:port`` when given."""
    host = f"[{host.lower()}]" if ":" in host else host.lower()
    return host if port is None else f"{host}:{port}"


def host_allowed(url: str, allow_hosts: Collection[str]) -> bool:
    """Only http(s) URLs whose "host" or "host:port" (the scheme's port when the URL names none) is in the
    allow-list (as ``allow_list`` gives it)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        return False
    port = _DEFAULT_PORTS[parts.scheme] if port is None else port
    return _host_port(parts.hostname, None) in allow_hosts or _host_port(parts.hostname, port) in allow_hosts


class Deliverer:
    """Delivers due callbacks, a few at a time, until each gets a 2xx or runs out of attempts."""

    def __init__(self, *, store: Store, wakeup: asyncio.Event, key: bytes, max_attempts: int,
                 retry_delay_s: float = 1.0, timeout_s: float = 10.0, concurrency: int = 4,
                 allow_hosts: Collection[str], clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.allow_hosts = allow_hosts  # checked at the submit, and again at each attempt
        self.wakeup = wakeup
        self.key = key
        self.max_attempts = max_attempts
        self.retry_delay_s = retry_delay_s
        self.timeout_s = timeout_s
        self.concurrency = concurrency
        self.clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._finished: set[str] = set()  # attempts that ended since the last read of due deliveries

    @property
    def in_flight(self) -> frozenset[str]:
        """The jobs whose callback is being delivered now."""
        return frozenset(self._in_flight)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        self._task = asyncio.create_task(self._loop(), name="asyncjobs-callbacks")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._in_flight.values()):
            task.cancel()
        await asyncio.gather(*self._in_flight.values(), return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _loop(self) -> None:
        """Keep up to ``concurrency`` deliveries in flight; a slow receiver holds only its own slot."""
        while True:
            self.wakeup.clear()
            next_at: float | None = None
            try:
                room = self.concurrency - len(self._in_flight)
                if room > 0:
                    self._finished.clear()
                    # Taken (held from other nodes) only as many as can start now.
                    due = await self.store.due_deliveries(now=self.clock(), limit=room,
                                                          hold_s=self.timeout_s + 30.0, busy=self.in_flight)
                    # An attempt that ended during the read may be listed as it was before: skip it.
                    busy = self._in_flight.keys() | self._finished
                    for delivery in [d for d in due if d.job_id not in busy][:room]:
                        self._start(delivery)
                    next_at = await self.store.next_delivery_at(busy=self.in_flight)
            except Exception as exc:  # the store may be briefly unavailable; try again soon
                log.error("callback deliveries: %s", exc)
                next_at = self.clock() + 1.0
            # Even with nothing due, look again after a while: a delivery may have been scheduled unseen.
            timeout = WAIT_CAP_S if next_at is None else min(WAIT_CAP_S, max(0.05, next_at - self.clock()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.wakeup.wait()

    def _start(self, delivery: Delivery) -> None:
        task = asyncio.create_task(self._deliver(delivery), name=f"asyncjobs-callback-{delivery.job_id}")
        self._in_flight[delivery.job_id] = task

        def done(_: asyncio.Task[None]) -> None:
            self._in_flight.pop(delivery.job_id, None)
            self._finished.add(delivery.job_id)
            self.wakeup.set()

        task.add_done_callback(done)

    def backoff_s(self, attempts: int) -> float:
        return min(3600.0, self.retry_delay_s * 2 ** (attempts - 1) * random.uniform(0.75, 1.25))

    async def _deliver(self, delivery: Delivery) -> None:
        if not host_allowed(delivery.url, self.allow_hosts):
            # Allowed at its submit, but the allow-list in force now no longer names the host: given up.
            log.warning("callback for job %s given up: its host is no longer in callbacks.allow_hosts",
                        delivery.job_id)
            with contextlib.suppress(Exception):
                await self.store.delivery_attempted(delivery.job_id, ok=False, next_at=None,
                                                    error="the host is no longer in callbacks.allow_hosts")
            return
        timestamp = int(self.clock())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": delivery.message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self.key, delivery.message_id, timestamp, delivery.payload),
        }
        assert self._session is not None
        try:
            async with self._session.post(delivery.url, data=delivery.payload, headers=headers,
                                          allow_redirects=False) as resp:
                ok, error = 200 <= resp.status < 300, f"answered {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            ok, error = False, f"{exc.__class__.__name__}: {exc}"
        attempts = delivery.attempts + 1
        next_at = None if ok or attempts >= self.max_attempts else self.clock() + self.backoff_s(attempts)
        try:
            await self.store.delivery_attempted(delivery.job_id, ok=ok, next_at=next_at,
                                                error=None if ok else error)
        except Exception as exc:
            log.error("callback for job %s: attempt not recorded: %s", delivery.job_id, exc)
            return
        if ok:
            log.info("callback for job %s delivered (attempt %d)", delivery.job_id, attempts)
        elif next_at is None:
            log.warning("callback for job %s given up after %d attempts: %s", delivery.job_id, attempts, error)
        else:
            log.info("callback for job %s failed (%s); retrying in %.1fs", delivery.job_id, error,
                     next_at - self.clock())
