"""The hub: an in-process change feed of jobs, with bounded queues per subscriber; and the ``Feed`` seam,
through which changes and cancels from other processes reach the hub (``LocalFeed``: there are none)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from .models import CancelReason, Job, Status


class Subscription:
    """Receives the jobs published for the ids it watches (or for all, with ``everything``).

    The buffer is bounded: when a slow consumer lets it fill, ``overflowed``
    is set and the subscription stops buffering, so its owner can close it.
    """

    def __init__(self, hub: Hub, job_ids: Iterable[str], *, everything: bool, maxsize: int,
                 conflate: bool) -> None:
        self._hub = hub
        self.job_ids: set[str] = set(job_ids)
        self.everything = everything
        self._buffer: deque[Job] = deque()
        self._maxsize = maxsize
        self._conflate = conflate
        self._ready = asyncio.Event()
        self.overflowed = False
        self.ended = False  # set by end(): its owner stops waiting (the stream's session ended)
        self.vanished: set[str] = set()  # watched ids whose job is no longer stored (deleted on another node)
        self.on_overflow: Callable[[], None] | None = None  # told once, when the buffer overflows

    def _push(self, job: Job) -> None:
        if self.overflowed or self.ended:
            return
        if self._conflate:
            # Only the latest state matters to this subscriber: keep one job per id.
            for i, queued in enumerate(self._buffer):
                if queued.id == job.id:
                    del self._buffer[i]
                    break
        if len(self._buffer) >= self._maxsize:
            self.overflowed = True
            self._buffer.clear()
            if self.on_overflow is not None:
                self.on_overflow()
        else:
            self._buffer.append(job)
        self._ready.set()

    def _vanish(self, job_id: str) -> None:
        if not self.ended:
            self.vanished.add(job_id)
            self._ready.set()

    def end(self) -> None:
        """Wake a waiting ``get`` with None, now and from now on (see ``ended``)."""
        self.ended = True
        self._ready.set()

    async def get(self, timeout_s: float | None = None) -> Job | None:
        """The next job published, or None after ``timeout_s``, on overflow, once ended, or while a watched
        job has vanished (``vanished``, which its owner empties)."""
        if not self._buffer and not self.overflowed and not self.ended and not self.vanished:
            self._ready.clear()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._ready.wait()
            except TimeoutError:
                return None
        return self._buffer.popleft() if self._buffer else None

    def watch_everything(self) -> None:
        self.everything = True
        self._hub._everything.add(self)

    def unwatch_everything(self) -> None:
        self.everything = False
        self._hub._everything.discard(self)

    def add(self, job_ids: Iterable[str]) -> None:
        self._hub._add(self, job_ids)

    def remove(self, job_ids: Iterable[str]) -> None:
        self._hub._remove(self, job_ids)

    def close(self) -> None:
        self._hub._remove(self, list(self.job_ids))
        self._hub._everything.discard(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Hub:
    """Publishes each change of a job once to every subscription that watches it."""

    def __init__(self, *, maxsize: int = 1024) -> None:
        self._by_job: dict[str, set[Subscription]] = {}
        self._everything: set[Subscription] = set()
        self._maxsize = maxsize
        self._listeners: list[Callable[[Job], None]] = []
        self._running: dict[str, Job] = {}  # the latest state published of each running job
        self._cancel_listeners: list[Callable[[str, CancelReason], None]] = []

    def latest(self, job_id: str) -> Job | None:
        """The newest state published of a running job (its progress, ahead of the store), or None."""
        return self._running.get(job_id)

    def forget(self, job_id: str) -> None:
        """Drop a running job's latest state (its runner is done with it, though nothing was published)."""
        self._running.pop(job_id, None)

    def end_all(self) -> None:
        """End every subscription (the server stops): a long poll answers with the job as it is, a stream ends."""
        for sub in {s for subs in self._by_job.values() for s in subs} | self._everything:
            sub.end()

    def add_cancel_listener(self, callback: Callable[[str, CancelReason], None]) -> None:
        """Call ``callback(job_id, reason)`` on every cancel request (the runners of jobs listen)."""
        self._cancel_listeners.append(callback)

    def request_cancel(self, job_id: str, reason: CancelReason) -> None:
        """Ask whoever runs ``job_id`` to stop it: a cancel travels through the feed, not a map of runners."""
        for callback in self._cancel_listeners:
            callback(job_id, reason)

    def add_listener(self, callback: Callable[[Job], None]) -> None:
        """Call ``callback`` with every published job, synchronously and unbuffered (e.g. for metrics)."""
        self._listeners.append(callback)

    def subscribe(self, job_ids: Iterable[str] = (), *, everything: bool = False,
                  maxsize: int | None = None, conflate: bool = False) -> Subscription:
        """Watch ``job_ids`` (or every job). With ``conflate``, a newer state replaces an unread older one."""
        sub = Subscription(self, (), everything=everything, maxsize=maxsize or self._maxsize, conflate=conflate)
        self._add(sub, job_ids)
        if everything:
            self._everything.add(sub)
        return sub

    def publish(self, job: Job, *, remote: bool = False) -> None:
        """Tell every subscription that watches ``job``. A ``remote`` change (made by another node, read
        back by the feed) reaches subscribers but not the listeners, which count this node's own changes."""
        if job.status is Status.RUNNING:
            self._running[job.id] = job
        else:
            self._running.pop(job.id, None)
        if not remote:
            for listener in self._listeners:
                listener(job)
        for sub in self._by_job.get(job.id, ()):
            sub._push(job)
        for sub in self._everything:
            if job.id not in sub.job_ids:
                sub._push(job)

    def vanish(self, job_id: str) -> None:
        """Tell the subscriptions that watch ``job_id`` by name that it is no longer stored: it was deleted
        (or expired) where the change feed could not read its last state."""
        self._running.pop(job_id, None)
        for sub in self._by_job.get(job_id, ()):
            sub._vanish(job_id)

    def watched(self, job_id: str) -> bool:
        """Whether a subscription watches ``job_id`` (or every job)."""
        return job_id in self._by_job or bool(self._everything)

    def watched_ids(self) -> list[str]:
        """The ids subscriptions watch by name (a feed re-reads these after it missed changes)."""
        return list(self._by_job)

    @property
    def subscriptions(self) -> int:
        return len({s for subs in self._by_job.values() for s in subs} | self._everything)

    def _add(self, sub: Subscription, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            sub.job_ids.add(job_id)
            self._by_job.setdefault(job_id, set()).add(sub)

    def _remove(self, sub: Subscription, job_ids: Iterable[str]) -> None:
        for job_id in list(job_ids):
            sub.job_ids.discard(job_id)
            subs = self._by_job.get(job_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_job[job_id]


class Feed(Protocol):
    """How changes and cancel requests made by other processes reach this one's hub (this one's are recorded
    by the store, ``JobQueue._request_cancel``). Chosen with the store (``App``)."""

    @property
    def up(self) -> bool:
        """Whether changes from other processes arrive now (for /healthz)."""
        ...

    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class LocalFeed:
    """The feed of a store that one process holds (SQLite): every change is made here, so the hub is all."""

    up = True

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass
