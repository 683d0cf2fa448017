"""The change feed of many nodes on one PostgreSQL: what other nodes change reaches this node's hub.

Every statement that inserts jobs or changes their version announces them (``NOTIFY``, delivered at
commit; see ``postgres``) as ``node|id:version:s,...``. A dedicated connection listens; for the ids
this node's clients wait on (or every id, while someone watches every job) the feed reads the rows in
one query per batch and publishes the newer ones to the hub, so a long poll, SSE stream or WebSocket
here learns of a change made anywhere. A queued job announced by another node wakes this node's
dispatcher. Cancel requests travel on their own channel to the node that runs the job (and its
heartbeat reads them from the row, should the notification be missed).

Nothing here is trusted to be complete: the connection may drop, and a notification that did not fit
says only "re-read". So the feed re-reads every watched job after it reconnects, and once a second
whatever happens (the polling fallback, always on): a completion is late at worst, never missed.

A listener that stops reading (its node frozen) would hold the database's queue of notifications until
it filled; every node ends the listeners of others silent for a lease (``Listening.end_silent``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable

from .errors import StoreError
from .hub import Hub
from .models import CancelReason, Job
from .postgres import Listening, PostgresStore

log = logging.getLogger("asyncjobs.cluster")

SEEN_MAX = 100_000  # versions remembered, to publish only what is newer than what this node has seen
READ_BATCH = 1000  # ids read in one query


class ClusterFeed:
    """The ``Feed`` of a ``PostgresStore`` shared by many nodes."""

    def __init__(self, store: PostgresStore, hub: Hub, *, node: str, on_queued: Callable[[], None],
                 poll_s: float = 1.0, ping_s: float = 5.0, max_backoff_s: float = 5.0,
                 silent_s: float = 30.0) -> None:
        self.store = store
        self.hub = hub
        self.node = node
        self.on_queued = on_queued  # a job became due somewhere: this node's dispatcher looks
        self.poll_s = poll_s
        self.ping_s = ping_s  # how long the connection has to answer (at the start, and a ping)
        # Another node's listener that has not pinged for silent_s is ended (Listening.end_silent); this
        # node pings three times in that time.
        self.silent_s = silent_s
        self.ping_every_s = min(ping_s, silent_s / 3)
        self.max_backoff_s = max_backoff_s
        self.up = False
        self.reconnects = 0  # times the listening connection was made again after a loss (for tests)
        self._seen: OrderedDict[str, int] = OrderedDict()
        self._pending: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        hub.add_listener(self._record)

    # -- lifecycle -------------------------------------------------------
    async def start(self) -> None:
        connected = asyncio.Event()
        self._tasks = [asyncio.create_task(self._listen_loop(connected), name="asyncjobs-feed-listener"),
                       asyncio.create_task(self._read_loop(), name="asyncjobs-feed-reader")]
        with contextlib.suppress(TimeoutError):  # start without it if the database is slow: it comes later
            async with asyncio.timeout(self.ping_s):
                await connected.wait()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self.up = False

    # -- the listening connection ------------------------------------------
    async def _listen_loop(self, connected: asyncio.Event) -> None:
        backoff = 0.1
        while True:
            lost = asyncio.Event()
            try:
                listening = await self.store.listen(self._on_change, self._on_cancel, lost.set)
            except StoreError as exc:
                if self.up or not connected.is_set():
                    log.warning("change feed: cannot listen (%s); retrying", exc)
                self.up = False
                await asyncio.sleep(backoff)
                backoff = min(self.max_backoff_s, backoff * 2)
                continue
            if connected.is_set():
                self.reconnects += 1
                log.info("change feed: listening again")
            self.up = True
            connected.set()
            backoff = 0.1
            self.resync()  # whatever changed while nobody listened
            try:
                await self._hold(listening, lost)
            finally:
                self.up = False
                await listening.close()
            log.warning("change feed: the listening connection is lost; reconnecting")

    async def _hold(self, listening: Listening, lost: asyncio.Event) -> None:
        """Return when the connection is lost, or stops answering its periodic ping. After each ping, end
        the listeners of other nodes silent for ``silent_s``."""
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.ping_every_s):
                    await lost.wait()
            if not lost.is_set():
                try:
                    await listening.ping(self.ping_s)
                except StoreError:
                    return
                try:
                    ended = await listening.end_silent(self.node, self.silent_s)
                except StoreError as exc:  # (a lost connection: the next ping says so)
                    log.warning("change feed: %s", exc)
                    continue
                for name, blocked in ended:
                    log.warning("change feed: ended the listening session %r, silent for %gs%s (its node is"
                                " stopped or cut off); it listens again once back", name, self.silent_s,
                                " and blocked sending to its node" if blocked else "")

    def _on_change(self, payload: str) -> None:
        node, _, body = payload.partition("|")
        if node == self.node:
            return  # published here already
        if body == "*":
            self.resync()
            self.on_queued()
            return
        queued = False
        for item in body.split(","):
            job_id, _, rest = item.partition(":")
            version, _, status = rest.partition(":")
            queued = queued or status == "q"
            try:
                newer = int(version) > self._seen.get(job_id, 0)
            except ValueError:
                continue
            if newer and self.hub.watched(job_id):
                self._pending.add(job_id)
        if queued:
            self.on_queued()
        if self._pending:
            self._wake.set()

    def _on_cancel(self, payload: str) -> None:
        job_id, _, reason = payload.partition("|")
        try:
            self.hub.request_cancel(job_id, CancelReason(reason))
        except ValueError:
            log.warning("change feed: a cancel with an unknown reason %r", reason)

    def resync(self) -> None:
        """Re-read every job a client here waits on by id (after notifications may have been missed)."""
        self._pending.update(self.hub.watched_ids())
        self._wake.set()

    # -- reading what changed ----------------------------------------------
    async def _read_loop(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.poll_s):
                    await self._wake.wait()
            except TimeoutError:
                self._pending.update(self.hub.watched_ids())  # the polling fallback
            self._wake.clear()
            ids, self._pending = list(self._pending), set()
            try:
                for at in range(0, len(ids), READ_BATCH):
                    batch = ids[at:at + READ_BATCH]
                    jobs = await self.store.jobs(batch)
                    for job in jobs:
                        self._publish(job)
                    self._vanished(set(batch).difference(job.id for job in jobs))
            except StoreError as exc:
                log.debug("change feed: cannot read changed jobs (%s); the next poll retries", exc)
                await asyncio.sleep(self.poll_s)

    def _vanished(self, job_ids: set[str]) -> None:
        """Jobs gone from the store (deleted, or expired to a tombstone) before their last change was read:
        their waiters here must not wait on for a change that cannot come."""
        for job_id in job_ids:
            self._seen.pop(job_id, None)
            self.hub.vanish(job_id)

    def _publish(self, job: Job) -> None:
        if job.version > self._seen.get(job.id, 0) and self.hub.watched(job.id):
            self._remember(job)
            self.hub.publish(job, remote=True)

    def _record(self, job: Job) -> None:
        """A hub listener: the versions this node published itself."""
        self._remember(job)

    def _remember(self, job: Job) -> None:
        self._seen[job.id] = job.version
        self._seen.move_to_end(job.id)
        if len(self._seen) > SEEN_MAX:
            self._seen.popitem(last=False)
