"""The composition root: an ``App`` wires store, hub, queue, workers and web from a ``Config``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

from aiohttp import web

from . import callbacks, codec, protocol
from .config import Config
from .errors import ConfigError, StoreUnreachable
from .files import FileStore, default_dir
from .hub import Feed, Hub, LocalFeed
from .limits import Rates, SharedSubmitRates
from .models import Job
from .queue import JobQueue, new_node_id
from .store import SQLiteStore, Store
from .tasks import TaskRegistry
from .web import WebSettings, make_web_app
from .web.common import METRICS_KEY
from .web.metrics import Metrics
from .worker import Workers

log = logging.getLogger("asyncjobs")


def _callback_key(config: Config) -> bytes | None:
    """Callbacks need both an allow-list and a secret to sign with; either alone is a mistake."""
    if not config.callbacks.allow_hosts:
        if config.callbacks.secret:
            callbacks.parse_secret(config.callbacks.secret)  # still refuse a malformed one
        return None
    if not config.callbacks.secret:
        raise ConfigError("callbacks.secret: callbacks are allowed (callbacks.allow_hosts) but unsigned;"
                          ' set a "whsec_<base64>" secret')
    return callbacks.parse_secret(config.callbacks.secret)


def _admins(config: Config) -> frozenset[str]:
    unknown = sorted(set(config.auth.admins) - set(config.auth.tokens))
    if unknown:
        raise ConfigError(f"auth.admins: {', '.join(unknown)} has no token in auth.tokens")
    return frozenset(config.auth.admins)


def _tokens(config: Config) -> tuple[tuple[str, bytes], ...]:
    seen: dict[str, str] = {}
    for principal, token in config.auth.tokens.items():
        if len(token) < 16:
            raise ConfigError(f"auth.tokens.{principal}: a token needs at least 16 characters")
        if token in seen:
            raise ConfigError(f"auth.tokens.{principal}: the same token as {seen[token]}")
        seen[token] = principal
    return tuple((p, t.encode()) for p, t in config.auth.tokens.items())


def is_server_url(value: str) -> bool:
    """``--db`` and ``store.url``: a PostgreSQL URL, as opposed to a SQLite path."""
    return value.startswith(("postgresql://", "postgres://"))


def open_store(config: Config, *, node: str = "") -> Store:
    """The store backend the configuration names (SQLite unless ``store.url`` names a server); ``node``
    names this process in what a shared store announces."""
    if config.store.url:
        if not is_server_url(config.store.url):
            raise ConfigError(f"store.url: expected postgresql://..., got {config.store.url!r}")
        try:
            from .postgres import PostgresStore
        except ImportError:
            raise ConfigError("store.url: PostgreSQL needs the asyncpg package: pip install 'asyncjobs[postgres]'"
                              ) from None
        # A node idle inside a transaction for a whole lease is as gone as one whose lease ended: the
        # database ends its session, so its locks do not outlast its leases.
        return PostgresStore(config.store.url, node=node, idle_in_transaction_s=config.cluster.lease)
    return SQLiteStore(config.store.path, synchronous=config.store.synchronous)


def store_name(config: Config) -> str:
    """The store for a log line: the SQLite path, or the server URL without its password."""
    if not config.store.url:
        return config.store.path
    parts = urlsplit(config.store.url)
    host = parts.hostname or ""
    return parts._replace(netloc=f"{parts.username + '@' if parts.username else ''}{host}"
                                 f"{':' + str(parts.port) if parts.port else ''}").geturl()


def callback_body(job: Job) -> bytes:
    """What a callback POSTs: the job's representation, as every other answer about it carries."""
    return codec.dumps(protocol.job_body(job))


def heartbeat_s(config: Config) -> float:
    """Seconds between lease renewals: ``cluster.heartbeat``, but at most a third of the lease, so a lease is
    renewed twice before it could end (a lease of 3 s with the default heartbeat of 10 still works)."""
    return min(config.cluster.heartbeat, config.cluster.lease / 3)


# A node whose database is away at its start tries again after this long, twice as long each time, up to the
# most; it listens meanwhile and answers 503.
CONNECT_RETRY_FIRST_S = 0.5
CONNECT_RETRY_MOST_S = 5.0


def sweep_interval_s(config: Config, *, shared: bool = False) -> float:
    """Often enough that retention and expiry are honoured within a fraction of the shortest of them; on a
    shared store at least every second, since the same loop rescues jobs whose lease ended and reads the
    queue's counts again."""
    shortest = min(config.jobs.retention, config.jobs.tombstone_retention, config.jobs.max_age)
    return max(0.05, min(1.0 if shared else 10.0, shortest / 4))


class App:
    """Everything one asyncjobs service holds; no module-level state, so two can share a process."""

    def __init__(self, config: Config, *, registry: TaskRegistry | None = None, store: Store | None = None) -> None:
        callback_key = _callback_key(config)
        self.config = config
        self.registry = registry or TaskRegistry.from_modules(config.tasks.modules, config.tasks.overrides)
        self.node = new_node_id()
        self.store = store or open_store(config, node=self.node)
        self.files = FileStore(config.files.dir or default_dir(config.store.path),
                               max_upload_bytes=config.files.max_upload_bytes,
                               max_total_bytes=config.files.max_total_bytes, shared=self.store.shared)
        self.hub = Hub()
        self.metrics = Metrics()
        self.hub.add_listener(self.metrics.observe_job)
        self.store.on_commit = self.metrics.observe_commit
        self.queue = JobQueue(
            store=self.store,
            files=self.files,
            hub=self.hub,
            registry=self.registry,
            workers=config.queue.workers,
            max_queued=config.queue.max_queued,
            retention_s=config.jobs.retention,
            tombstone_retention_s=config.jobs.tombstone_retention,
            max_age_s=config.jobs.max_age,
            cancel_grace_s=config.jobs.cancel_grace,
            max_queued_per_owner=config.limits.max_queued_per_principal,
            node=self.node,
            feed=self._feed(),
            lease_s=config.cluster.lease if self.store.shared else None,
            callback_payload=callback_body,
        )
        self.workers = Workers(self.queue, count=config.queue.workers, heartbeat_s=heartbeat_s(config),
                               sweep_interval_s=sweep_interval_s(config, shared=self.store.shared))
        callback_hosts = callbacks.allow_list(config.callbacks.allow_hosts)
        self.deliverer = None if callback_key is None else callbacks.Deliverer(
            store=self.store, wakeup=self.queue.deliveries, key=callback_key,
            max_attempts=config.callbacks.max_attempts, retry_delay_s=config.callbacks.retry_delay,
            timeout_s=config.callbacks.timeout, allow_hosts=callback_hosts)
        self.web = make_web_app(self.queue, WebSettings(
            monitor_style=protocol.MonitorStyle(config.protocol.monitor),
            max_body_bytes=config.server.max_body_bytes,
            max_upload_bytes=config.files.max_upload_bytes,
            upload_read_timeout_s=config.files.read_timeout,
            max_wait_s=config.server.max_wait,
            tokens=_tokens(config),
            admins=_admins(config),
            session_ttl_s=config.auth.session_ttl,
            callback_hosts=callback_hosts,
            submit_rate=config.limits.submit_rate,
            submit_burst=config.limits.submit_burst,
        ), rates=self._shared_rates())
        self.web[METRICS_KEY] = self.metrics
        self.web.cleanup_ctx.append(self._lifecycle)
        self._started = False
        self._connecting: asyncio.Task[None] | None = None  # a start waiting for the database to answer
        # What stopped a start that had waited for the database (else None), and whom to tell: it ends the
        # node as the same failure at once would have (asyncjobs serve exits with its message).
        self.start_failure: Exception | None = None
        self.on_start_failure: Callable[[], None] | None = None

    def _feed(self) -> Feed:
        """The change feed that goes with the store: the hub alone, unless other processes share the store."""
        if not self.store.shared:
            return LocalFeed(self.hub)
        from .cluster import ClusterFeed
        from .postgres import PostgresStore

        assert isinstance(self.store, PostgresStore)
        # A node whose listener is silent for a whole lease is as gone as one whose lease ended.
        return ClusterFeed(self.store, self.hub, node=self.node, on_queued=lambda: self.queue.wakeup.set(),
                           silent_s=self.config.cluster.lease)

    def _shared_rates(self) -> Rates | None:
        """With a submit rate on a store other processes share, the buckets live in the store, so the rate
        holds across every node together (else the web layer keeps them in this process)."""
        if not (self.config.limits.submit_rate and self.store.shared):
            return None
        from .postgres import PostgresStore

        assert isinstance(self.store, PostgresStore)
        return SharedSubmitRates(self.config.limits.submit_rate, self.config.limits.submit_burst,
                                 bucket=self.store.rate_bucket)

    async def _lifecycle(self, _app: web.Application) -> AsyncIterator[None]:
        await self.start()
        yield
        await self.stop()

    async def start(self) -> None:
        """Open the store and start the queue, workers and deliveries. A database that is away (a shared
        store) does not stop the start: the node answers 503 meanwhile and starts once it can connect, as
        it reconnects after the database went away later on (PROTOCOL: nodes reconnect on their own). A
        database that refuses (a wrong password, a missing database) raises StoreError at once; once
        waited for, it sets ``start_failure`` and calls ``on_start_failure``."""
        if self._started or self._connecting is not None:
            return
        try:
            await self.store.open()
        except StoreUnreachable as exc:
            log.warning("%s; this node answers 503 until the database answers", exc)
            self._connecting = asyncio.create_task(self._start_once_reachable(), name="asyncjobs-connect")
            return
        await self._start_on_open_store()

    async def _start_once_reachable(self) -> None:
        delay = CONNECT_RETRY_FIRST_S
        while True:
            await asyncio.sleep(delay)
            try:
                await self.store.open()
                await self._start_on_open_store()
            except StoreUnreachable as exc:  # still away, or away again
                delay = min(delay * 2, CONNECT_RETRY_MOST_S)
                log.info("%s; trying again in %.1fs", exc, delay)
                continue
            except Exception as exc:  # a refusal, or anything else a start at once would have stopped on
                log.error("asyncjobs cannot start: %s", exc)
                self.start_failure = exc
                if self.on_start_failure is not None:
                    self.on_start_failure()
            return

    async def _start_on_open_store(self) -> None:
        try:
            await self.queue.feed.start()
            await self.queue.start()
            await self.workers.start()
            if self.deliverer is not None:
                await self.deliverer.start()
        except BaseException:
            await self.queue.feed.stop()
            await self.store.close()
            raise
        self._started = True
        log.info("asyncjobs started: %d workers, tasks %s, store %s", self.config.queue.workers,
                 ", ".join(self.registry.names()), store_name(self.config))

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop accepting submits (503) and let running jobs finish within the grace period."""
        self.queue.close_intake()
        if self._started:
            await self.workers.stop(self.config.queue.shutdown_grace if grace_s is None else grace_s)

    async def stop(self) -> None:
        connecting, self._connecting = self._connecting, None
        if connecting is not None:  # (done once the node has started; else the start is given up)
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
        if not self._started:
            return
        await self.drain()
        if self.deliverer is not None:
            await self.deliverer.stop()
        await self.queue.feed.stop()
        await self.store.close()
        self._started = False
        log.info("asyncjobs stopped")
