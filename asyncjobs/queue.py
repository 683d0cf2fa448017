"""The queue: the one writer of jobs. Every change is persisted, then published, then logged."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import codec, protocol, rules
from .errors import (
    InvalidRequest,
    JobGone,
    JobNotFound,
    KeyReused,
    QuotaExceeded,
    RequestError,
    StateConflict,
    StoreError,
    Unavailable,
)
from .files import FileStore, Upload
from .hub import Feed, Hub, LocalFeed
from .models import CancelReason, Job, JobIds, Status, cancel, expire, is_expired
from .store import Inserted, Store
from .tasks import TaskRegistry, validate

log = logging.getLogger("asyncjobs.queue")



def new_node_id() -> str:
    """A name for this process that no other process, here or on another host, shares."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def equality_key(params: Any, digests: dict[str, str]) -> str:
    """What makes two submits equal (RFC 8785 canonical params, and the files' SHA-256): a hash."""
    return hashlib.sha256(codec.canonical([params, digests])).hexdigest()


class RunTimes:
    """A moving estimate (EWMA) of each task's run time, for ETAs."""

    def __init__(self, *, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self._mean: dict[str, float] = {}

    def record(self, task: str, seconds: float) -> None:
        old = self._mean.get(task)
        self._mean[task] = seconds if old is None else old + self.alpha * (seconds - old)

    def mean(self, task: str) -> float | None:
        return self._mean.get(task)

    def snapshot(self) -> dict[str, float]:
        return dict(self._mean)


@dataclass(frozen=True)
class JobView:
    """A job with what is derived at read time: its ETA and queue position."""

    job: Job
    eta: float | None = None
    queue_position: int | None = None


class JobQueue:
    """Submit, read, cancel, delete and list jobs; the workers report through it."""

    def __init__(
        self,
        *,
        store: Store,
        files: FileStore,
        hub: Hub,
        registry: TaskRegistry,
        workers: int,
        max_queued: int,
        retention_s: float,
        tombstone_retention_s: float,
        max_age_s: float,
        cancel_grace_s: float,
        max_queued_per_owner: int = 0,
        node: str = "",
        feed: Feed | None = None,
        lease_s: float | None = None,
        callback_payload: Callable[[Job], bytes] = lambda job: b"",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.files = files
        self.hub = hub
        self.registry = registry
        self.workers = workers
        self.max_queued = max_queued
        self.retention_s = retention_s
        self.tombstone_retention_s = tombstone_retention_s
        self.max_age_s = max_age_s
        self.cancel_grace_s = cancel_grace_s
        self.max_queued_per_owner = max_queued_per_owner  # 0: no limit
        self.callback_payload = callback_payload  # what a callback POSTs (the App gives the wire form)
        self.node = node or new_node_id()  # this process, as the holder of its running jobs' leases
        self.feed: Feed = feed or LocalFeed(hub)  # changes and cancels from and to other processes
        self.lease_s = lease_s  # how long a claim holds a job without renewal (None: while this process lives)
        self.clock = clock
        # The vt of the latest job claimed, per priority: a new principal's first job of that priority starts
        # here (a claim of another priority moves only its own, so it sends no newcomer behind a backlog).
        self.virtual_time: dict[int, int] = {}
        # The place (vt, seq) of the last queued job of each priority (or a place past it): a new job there is
        # the last of its priority, so its position is the count of queued jobs at its priority or above.
        self._last_place: dict[int, tuple[int, int]] = {}
        # Queued jobs waiting to fall due before they take a place (rules.WAITING), by priority, as far as this
        # process knows (read again with the counts): the in-memory counts include them, though they are
        # behind every placed job, so a new job's position leaves them out.
        self._waiting: Counter[int] = Counter()
        self._new_id = JobIds()
        self.run_times = RunTimes()
        self.wakeup = asyncio.Event()  # set when there may be work for the dispatcher
        self.accepting = True  # False once the server stops taking submits (close_intake)
        # Jobs queued in the store by priority, kept in memory: backpressure, and the position of a new job.
        self._queued_by_priority: Counter[int] = Counter()
        # Every priority a queued job has had here (never forgotten): where delayed jobs may wait to be placed.
        # (On a shared store the counts above are read again each second and may miss a job just inserted.)
        self._priorities: set[int] = set()
        self.next_due: float | None = None  # earliest run_at of a delayed job, if any
        self._noted_during_refresh: list[float] | None = None  # due times noted while the store is re-read
        self.deliveries = asyncio.Event()  # set when a callback delivery was scheduled
        # The jobs a crash left running are not yet recovered (the store refused the writes at start, a full
        # disk say): each sweep tries again. (The jobs this process claims meanwhile are its own: held by its
        # node, the recovery leaves them alone.)
        self.unrecovered = False
        self.started = False  # until start() has read the store: on a shared store, requests get 503

    async def start(self) -> None:
        try:
            await self._recover_at_start()
        except StoreError as exc:
            self.unrecovered = True
            log.error("cannot recover the jobs left running (%s); each sweep tries again", exc)
        await self.files.open(alone=not await self.store.others_alive(self.node))
        await self.files.sweep_orphans(self.store.file_owners)
        await self.refresh_counts()
        if self._priorities:
            try:
                await self._place_due()  # what fell due while no process ran
            except StoreError as exc:  # (a full disk, say) the claims and the sweeps place them later
                log.error("cannot place the delayed jobs that fell due (%s); the next claim or sweep tries again",
                          exc)
        self.next_due = await self.store.next_run_at(after=self.clock())
        self.wakeup.set()
        self.deliveries.set()
        self.started = True

    async def _recover_at_start(self) -> None:
        """The jobs left running by the process before this one: queued again, or failed as interrupted."""
        recovered = await self.store.recover(now=self.clock(), retention_s=self.retention_s, node=self.node,
                                             payload=self.callback_payload, at_start=True,
                                             lease_s=self.lease_s or 0.0)
        self.unrecovered = False
        if recovered:
            requeued = self._published_recovered(recovered)
            log.warning("recovered %d interrupted jobs: %d queued again, %d failed", len(recovered),
                        requeued, len(recovered) - requeued)
            self.wakeup.set()

    async def refresh_counts(self) -> None:
        """Read the queued counts and the virtual time again: at start, and periodically when other
        processes share the store (their submits and claims change both)."""
        self._queued_by_priority = Counter(await self.store.queued_by_priority())
        self._priorities.update(self._queued_by_priority)
        for priority, (low, high) in (await self.store.queued_vts()).items():
            self.virtual_time[priority] = max(self.virtual_time.get(priority, 0), low)
            self._last_place[priority] = max(self._last_place.get(priority, (high, 0)), (high, 0))
        self._waiting = Counter(await self.store.count_waiting(sorted(self._priorities)))

    def close_intake(self) -> None:
        """Take no more submits (503): the server is stopping."""
        self.accepting = False

    # -- submit ------------------------------------------------------------
    def check_params(self, task_name: Any, params: Any) -> None:
        """Raise ``InvalidRequest`` (with ``errors``) unless task and params are acceptable."""
        if not isinstance(task_name, str) or not task_name:
            raise InvalidRequest("'task' must be a non-empty string naming a registered task",
                             errors=[{"field": "task", "message": "is required"}])
        spec = self.registry.get(task_name)
        if spec is None:
            raise InvalidRequest(f"unknown task {task_name!r}; GET /tasks lists the registered ones",
                             errors=[{"field": "task", "message": f"unknown task {task_name!r}"}])
        if not isinstance(params, dict):
            raise InvalidRequest("'params' must be a JSON object",
                             errors=[{"field": "params", "message": "expected object"}])
        errors = validate(params, spec.schema)
        if errors:
            raise InvalidRequest(f"invalid params for task {task_name!r}",
                             errors=[{**e, "field": f"params.{e['field']}" if e["field"] != "params" else "params"}
                                     for e in errors])

    def check_files(self, task_name: str, names: list[str]) -> None:
        """Raise ``InvalidRequest`` naming the field unless ``names`` are the task's file params, each once,
        with every required one present."""
        spec = self.registry.get(task_name)
        assert spec is not None
        errors = [{"field": name, "message": "is not a file param of this task" if spec.files
                   else f"task {task_name!r} takes no files"}
                  for name in names if spec.file_param(name) is None]
        errors += [{"field": name, "message": "is sent more than once"}
                   for name in sorted({n for n in names if names.count(n) > 1})]
        errors += [{"field": f.name, "message": "is a required file"}
                   for f in spec.files if f.required and f.name not in names]
        if errors:
            raise InvalidRequest("; ".join(f"{e['field']} {e['message']}" for e in errors), errors=errors)

    async def submit(self, task_name: Any, params: Any, *, priority: int = 0, delay_s: float = 0.0,
                     owner: str = "", idempotency_key: str | None = None, request_hash: str | None = None,
                     callback_url: str | None = None, uploads: list[Upload] | None = None,
                     fresh: bool = False, refuse_new: RequestError | None = None) -> Inserted:
        """Store a new job (committed before this returns), or find the one this submit repeats.

        A repeated ``idempotency_key`` with another ``request_hash`` is a 422 (a key first answered by an
        equal job is remembered with that job, and replays as a reuse); a unique task's live
        job with equal params is returned as a duplicate for the caller to redirect to. ``uploads``
        (finished, for the task's file params) are placed in the job's folder before the commit and
        removed again when no new job is stored. A task that is ``unique`` or has ``reuse`` answers an equal
        submit with the equal job ("reuse"), unless ``fresh`` (``Cache-Control: no-cache``); a submit with a
        delay or a callback is never equal to another. With ``refuse_new`` (the caller's submit rate is spent),
        only a replay or a reuse is answered: a submit that would store a new job raises it instead.
        """
        self.check_params(task_name, params)
        spec = self.registry.get(task_name)
        assert spec is not None
        if uploads or spec.files:
            self.check_files(task_name, [u.param for u in uploads or ()])
        if not self.accepting:
            raise Unavailable("the server is shutting down", retry_after_s=5)
        now = self.clock()
        inputs = {u.param: u.stored.as_dict() for u in uploads or () if u.stored is not None}
        digests = {name: f["sha256"] for name, f in inputs.items()}
        job = Job(
            id=self._new_id(), task=task_name, params=codec.dumps(params), status=Status.QUEUED,
            priority=priority, created_at=now, expires_at=now + self.max_age_s, run_at=now + delay_s,
            max_attempts=spec.max_attempts, owner=owner, idempotency_key=idempotency_key,
            request_hash=request_hash, callback_url=callback_url,
            unique_key=equality_key(params, digests) if (spec.unique or spec.reuse) and not (
                delay_s or callback_url) else None,
            files={"inputs": inputs, "result": None} if spec.files else None,
        )
        if refuse_new is not None and job.idempotency_key is None and (job.unique_key is None or fresh):
            raise refuse_new  # no key and no equal job to look for: it could only make a new job
        admit = self.queued < self.max_queued and refuse_new is None  # a replay or a twin is still answered
        if uploads and refuse_new is not None:
            for upload in uploads:  # no new job can come of it: its files are not needed
                upload.discard()
            uploads = None
        self._count_queued(job.priority, +1)
        try:
            if uploads:
                await self.files.place(job.id, uploads)
            inserted = await self.store.insert(job, admit=admit, reuse_s=spec.reuse, fresh=fresh,
                                               vt_floor=self.virtual_time.get(job.priority, 0),
                                               max_queued_for_owner=self.max_queued_per_owner)
        except BaseException:
            self._count_queued(job.priority, -1)
            if uploads:
                await self.files.remove_job(job.id)
            raise
        if inserted.duplicate is not None:
            self._count_queued(job.priority, -1)
            if uploads:
                await self.files.remove_job(job.id)
            if inserted.duplicate == "refused":
                if refuse_new is not None:
                    raise refuse_new
                raise Unavailable(f"the queue holds its maximum of {self.max_queued} jobs",
                                         retry_after_s=5)
            if inserted.duplicate == "quota":
                raise QuotaExceeded(
                    f"you have {self.max_queued_per_owner} queued jobs, the most one caller may have; wait for"
                    " one to start", retry_after_s=await self._owner_start_s(owner))
            if inserted.duplicate in ("idempotency", "key-reuse") and inserted.key_hash != request_hash:
                raise KeyReused(  # about the job the key names: its status, and its version for the ETag
                    "this Idempotency-Key was used before with a different request; use a new key",
                    job_status=inserted.job.status.value, job_version=inserted.job.version)
            return inserted
        place = (inserted.job.vt, inserted.job.seq)
        if rules.is_waiting(inserted.job):
            self._waiting[job.priority] += 1
        else:
            self._last_place[job.priority] = max(self._last_place.get(job.priority, place), place)
        self.hub.publish(inserted.job)
        self._due_at(inserted.job.run_at)
        log.debug("job %s submitted (%s)", inserted.job.id, inserted.job.task)
        return inserted

    async def store_up(self) -> bool:
        """Whether the store answers right now (for /healthz)."""
        try:
            await self.store.ping()
        except StoreError:
            return False
        return True

    async def counts(self, owner: str | None = None) -> dict[str, int]:
        """Jobs in the store by status: everyone's, or ``owner``'s."""
        return await self.store.counts(owner)

    async def _owner_start_s(self, owner: str) -> int:
        """Seconds until one of ``owner``'s queued jobs is likely to start: 1 to 60. Not before it is due
        (a delayed job), nor before the jobs ahead of it have run (from the mean run time, once known)."""
        now = self.clock()
        job = await self.store.next_queued(owner, now=now)
        if job is None:
            return 1
        view = await self.view(job)
        start = job.run_at
        if view.eta is not None:
            start = max(start, view.eta - (self.run_times.mean(job.task) or 0.0))
        return protocol.retry_after_s(start, now)

    # -- read --------------------------------------------------------------
    async def find(self, job_id: str, *, owner: str | None = None) -> Job:
        """The job as it is now (a running job's latest progress from the feed); ``JobNotFound`` or
        ``JobGone`` otherwise."""
        found = await self.store.lookup(job_id)
        if owner is not None and found.owner is not None and found.owner != owner:
            raise JobNotFound(f"no job {job_id}")
        if found.gone:
            raise JobGone(f"job {job_id} has expired")
        if found.job is None:
            raise JobNotFound(f"no job {job_id}")
        job = self._fresher(found.job)
        now = self.clock()
        if is_expired(job, now):
            raise _expired(job, now)
        return job

    async def wait(self, job_id: str, *, timeout_s: float, until: Callable[[Job], bool],
                   owner: str | None = None, expired_is_gone: bool = True) -> Job:
        """The first state of the job for which ``until`` holds, or its state when ``timeout_s`` runs out.
        A job that expired meanwhile raises ``JobGone``, unless not ``expired_is_gone`` (a submit's wait
        answers with the job it has just made, whatever became of it).

        Subscribes before reading, so a change between the read and the wait is not missed.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        with self.hub.subscribe([job_id], conflate=True) as sub:
            job = await self.find(job_id, owner=owner)
            while not until(job):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                newer = await sub.get(remaining)
                if newer is None:
                    if sub.vanished:  # deleted (or expired) on another node: answer as a read now would
                        job = await self.find(job_id, owner=owner)
                    break
                job = newer
        now = self.clock()
        if expired_is_gone and is_expired(job, now):
            raise _expired(job, now)
        return job

    @property
    def queued(self) -> int:
        return sum(self._queued_by_priority.values())

    def _count_queued(self, priority: int, delta: int) -> None:
        if delta > 0:
            self._priorities.add(priority)
        left = self._queued_by_priority[priority] + delta
        if left > 0:
            self._queued_by_priority[priority] = left
        else:
            del self._queued_by_priority[priority]

    async def view(self, job: Job, *, just_submitted: bool = False) -> JobView:
        """Add the ETA and, for a queued job, its position.

        A job just submitted whose vt is the highest of its priority is the last of it, so its position
        comes from the in-memory counts; any other queued job's from the store (a count that grows with the
        jobs ahead: few for a newcomer, whose turn comes soon, ahead of other backlogs).
        """
        position = None
        if job.status is Status.QUEUED:
            place = (job.vt, job.seq)
            waiting = rules.is_waiting(job)
            if just_submitted and (waiting or place >= self._last_place.get(job.priority, place)):
                # The last placed job of its priority: the placed jobs at its priority and above. (A job that
                # waits to fall due: all those queued now, a preview of its place if it were due.)
                position = sum(n - (0 if waiting else self._waiting.get(p, 0))
                               for p, n in self._queued_by_priority.items() if p >= job.priority)
            else:
                position = await self.store.queue_position(job)
        return self._estimate(job, position)

    async def views(self, jobs: list[Job]) -> list[JobView]:
        """``view`` for a page of jobs, with the positions of its queued jobs read in one query."""
        queued = [j for j in jobs if j.status is Status.QUEUED]
        positions = await self.store.queue_positions(queued) if queued else {}
        return [self._estimate(job, positions.get(job.id)) for job in jobs]

    def _estimate(self, job: Job, position: int | None) -> JobView:
        """The ETA from the task's mean run time, the position and the workers (or the progress)."""
        now = self.clock()
        mean = self.run_times.mean(job.task)
        if job.status is Status.QUEUED:
            eta = None
            if mean is not None and position is not None:
                waves = math.ceil(position / max(1, self.workers))
                eta = max(now, job.run_at) + waves * mean
            return JobView(job, eta, position)
        if job.status is Status.RUNNING and job.started_at is not None:
            elapsed = now - job.started_at
            fraction = (job.progress or {}).get("fraction")
            if isinstance(fraction, (int, float)) and 0.05 <= fraction <= 1:
                return JobView(job, job.started_at + elapsed / fraction)
            if mean is not None:
                return JobView(job, max(job.started_at + mean, now))
        return JobView(job)

    async def list_jobs(self, *, status: str | None = None, task: str | None = None, owner: str | None = None,
                   before_seq: int | None = None, limit: int = 50) -> tuple[list[Job], int | None]:
        """A page of jobs, newest first, and the cursor of the next page (None: this is the last)."""
        jobs = await self.store.list_jobs(status=status, task=task, owner=owner, before_seq=before_seq, limit=limit + 1)
        cursor = jobs[limit - 1].seq if len(jobs) > limit else None
        jobs = jobs[:limit]
        now = self.clock()
        live = [self._fresher(j) for j in jobs]
        return [j for j in live if not is_expired(j, now)], cursor

    def _fresher(self, job: Job) -> Job:
        """A running job's progress is stored at most every half second; the feed has the latest."""
        latest = self.hub.latest(job.id)
        return latest if latest is not None and latest.version > job.version else job

    # -- cancel and delete ---------------------------------------------------
    async def cancel(self, job_id: str, *, owner: str | None = None,
                     reason: CancelReason = CancelReason.REQUEST) -> tuple[Job, bool]:
        """Cancel; returns the job and whether it has stopped (False: still stopping after the grace)."""
        for _ in range(50):
            job = await self.find(job_id, owner=owner)
            if job.status is Status.CANCELED:
                return job, True
            if job.terminal:
                raise StateConflict(f"job {job_id} has already {job.status.value}", job_status=job.status.value,
                                    job_version=job.version)
            if job.status is Status.RUNNING:
                job, stopped = await self._stop_running(job, reason, owner=owner)
                if job.status in (Status.SUCCEEDED, Status.FAILED):  # its outcome was stored before the cancel
                    raise StateConflict(f"job {job_id} has already {job.status.value}", job_status=job.status.value,
                                        job_version=job.version)
                return job, stopped
            new = cancel(job, self.clock(), retention_s=self.retention_s)
            if await self.store.update(new, expected_version=job.version, deliver=self.callback_payload):
                if new.callback_url is not None:
                    self.deliveries.set()
                self._count_queued(job.priority, -1)
                self._left_waiting(job)
                self.hub.publish(new)
                await self._settle_files(new)
                log.info("job %s canceled while queued", job_id)
                return new, True
            await asyncio.sleep(0)  # claimed or changed meanwhile: look again
        raise Unavailable(f"job {job_id} kept changing; try again", retry_after_s=1)

    async def _stop_running(self, job: Job, reason: CancelReason, *, owner: str | None) -> tuple[Job, bool]:
        """Ask for the job to stop wherever it runs, and wait for it to end (``cancel_grace``)."""
        await self._request_cancel(job.id, reason)
        job = await self.wait(job.id, timeout_s=self.cancel_grace_s, until=lambda j: j.terminal, owner=owner)
        return job, job.terminal

    async def _request_cancel(self, job_id: str, reason: CancelReason) -> None:
        """Stop ``job_id``: here at once (the hub tells its runner, if it runs here), and recorded on its row,
        where another node's runner reads it (the store also announces it) and a restart after a crash
        finds it: an accepted cancel stands."""
        self.hub.request_cancel(job_id, reason)
        await self.store.request_cancel(job_id, reason.value)

    async def delete(self, job_id: str, *, owner: str | None = None) -> bool:
        """Forget the job (canceling it first); False while a running handler is still stopping.

        A running job's delete is recorded on its row (``CancelReason.DELETE``), wherever it runs: its runner
        forgets it once the handler has stopped, and a sweep forgets any that a crash or a race left behind
        (``Store.sweep``), so an accepted delete stands like an accepted cancel."""
        job = await self.find(job_id, owner=owner)
        if not job.terminal:
            try:
                job, stopped = await self.cancel(job_id, owner=owner, reason=CancelReason.DELETE)
            except JobNotFound:  # its runner stopped and forgot it (on another node) before its end was read here
                return True
            except StateConflict:  # it ended on its own meanwhile: forget it as the store has it, below
                stopped = False
            if not stopped:
                found = await self.store.lookup(job_id)
                if found.job is None:  # forgotten by its runner meanwhile
                    return True
                if not found.job.terminal:
                    return False
                job = found.job  # it ended meanwhile: forget it now
        await self._forget(job)
        return True

    async def _forget(self, job: Job) -> None:
        await self.store.delete(job.id)
        if job.files is not None:
            await self.files.remove_job(job.id)
        log.info("job %s deleted", job.id)

    async def _settle_files(self, job: Job) -> None:
        """Inputs go once their job is terminal: it can never run again."""
        if job.terminal and job.files is not None and job.files.get("inputs"):
            await self.files.remove_inputs(job.id)


    # -- reports from the workers -------------------------------------------
    def publish(self, job: Job) -> None:
        """Tell every waiter of a running job's new state (a progress report) before it is stored."""
        self.hub.publish(job)

    async def save_progress(self, job: Job, *, expected_version: int) -> bool:
        """Store a running job's progress if the stored version is still ``expected_version``; a lost report
        is logged, never raised (it is not worth failing the job)."""
        try:
            return await self.store.update(job, expected_version=expected_version, fence=self.node)
        except Exception as exc:
            log.warning("job %s: progress not stored: %s", job.id, exc)
            return False

    async def finish(self, new: Job, *, expected_version: int, forget: bool = False) -> bool:
        """Persist a running job's next state (terminal, or queued again), then publish it; with ``forget`` (a
        client deleted it), forget a terminal one then. False (and nothing published) when the stored job
        changed under its worker, or this node's lease on it ended."""
        deliver = new.terminal and new.callback_url is not None
        if not await self.store.update(new, expected_version=expected_version, fence=self.node,
                                       deliver=self.callback_payload if deliver else None):
            log.warning("job %s changed under its worker; its outcome %s was not stored", new.id, new.status)
            self.hub.forget(new.id)  # the store's state stands; this runner's last report must not shadow it
            return False
        if deliver:
            self.deliveries.set()
        if new.status is Status.QUEUED:
            self._count_queued(new.priority, +1)
            self._due_at(new.run_at)
        self.hub.publish(new)
        await self._settle_files(new)
        if forget and new.terminal:
            await self._forget(new)
        log.debug("job %s %s (attempt %d)", new.id, new.status.value, new.attempts)
        return True

    async def claim(self, limit: int) -> list[Job]:
        """Start up to ``limit`` due jobs, each task within its concurrency (counted by the store, across
        every process that shares it), leased to this node. The started jobs are published; the caller
        runs them."""
        concurrency = {spec.name: spec.concurrency for spec in self.registry}
        if self.next_due is not None and self.next_due <= self.clock() and self._may_wait():
            await self._place_due()
        jobs = await self.store.claim(now=self.clock(), limit=limit, tasks=concurrency, node=self.node,
                                      lease_s=self.lease_s)
        for job in jobs:
            self._count_queued(job.priority, -1)
            self.virtual_time[job.priority] = max(self.virtual_time.get(job.priority, 0), job.vt)
            self.hub.publish(job)
        return jobs

    async def _place_due(self, now: float | None = None) -> None:
        """Delayed jobs that have fallen due (by ``now``) take their place in the fair order (``Store.place_due``)."""
        placed = await self.store.place_due(now=self.clock() if now is None else now, floors={
            priority: self.virtual_time.get(priority, 0) for priority in self._priorities})
        for priority, vt, seq in placed:
            self._last_place[priority] = max(self._last_place.get(priority, (vt, seq)), (vt, seq))
            self._waiting[priority] = max(0, self._waiting[priority] - 1)

    def _may_wait(self) -> bool:
        """Whether delayed jobs may be waiting for their place: this process knows of some, or others submit
        to the same store."""
        return bool(self._priorities) and (any(self._waiting.values()) or self.store.shared)

    def _left_waiting(self, job: Job) -> None:
        """A queued job left the queue (canceled, expired): one waiting job fewer if it was one."""
        if rules.is_waiting(job):
            self._waiting[job.priority] = max(0, self._waiting[job.priority] - 1)

    def _due_at(self, run_at: float) -> None:
        if run_at > self.clock():
            self.next_due = run_at if self.next_due is None else min(self.next_due, run_at)
            if self._noted_during_refresh is not None:
                self._noted_during_refresh.append(run_at)
        self.wakeup.set()

    async def refresh_next_due(self) -> None:
        """After a claim: the next delayed job's time, or None if every queued job is due. A job delayed
        while the store is read may be missing from its answer: its time is kept all the same. The delayed
        jobs that fell due since the last look take their place first (the claim that follows may start them,
        though it began before they were due)."""
        now = self.clock()  # one time for both: a job due just after the placement stays the next due time
        if self.next_due is not None and self.next_due <= now and self._may_wait():
            await self._place_due(now)
        noted: list[float] = []
        self._noted_during_refresh = noted
        try:
            read = await self.store.next_run_at(after=now)
        finally:
            self._noted_during_refresh = None
        self.next_due = min([t for t in (read, *noted) if t is not None], default=None)

    # -- housekeeping --------------------------------------------------------
    async def sweep(self) -> None:
        """Expire jobs past ``expires_at`` and forget old tombstones; place the delayed jobs that fell due
        unseen (another process submitted them, and this one's next due time did not know of them). First, the
        jobs left running at start, if the store refused their recovery then."""
        if self.unrecovered:
            await self._recover_at_start()
            await self.refresh_counts()  # with the jobs it queued again
        if self._may_wait():
            await self._place_due()
        now = self.clock()
        result = await self.store.sweep(now=now, retention_s=self.retention_s,
                                        tombstone_retention_s=self.tombstone_retention_s,
                                        payload=self.callback_payload)
        for job in result.expired_queued:
            self._count_queued(job.priority, -1)
            self._left_waiting(job)
            self.hub.publish(job)
            if job.callback_url is not None:
                self.deliveries.set()
        if result.with_files:
            await self.files.remove_jobs(result.with_files)
        for job_id in result.expired_running:
            await self._request_cancel(job_id, CancelReason.EXPIRED)
        if result.tombstoned or result.forgotten:
            log.info("sweep: %d jobs expired to tombstones, %d tombstones forgotten",
                     result.tombstoned, result.forgotten)
        if result.deleted:
            log.info("sweep: %d jobs deleted while they ran forgotten now that they have ended", result.deleted)

    async def rescue(self) -> None:
        """Take over running jobs whose lease ended (their node died or was cut off): queued again while
        attempts remain, else failed as interrupted. Any node does it, periodically, for every node."""
        recovered = await self.store.recover(now=self.clock(), retention_s=self.retention_s, node=self.node,
                                             payload=self.callback_payload)
        if recovered:
            requeued = self._published_recovered(recovered)
            log.warning("rescued %d jobs whose lease ended: %d queued again, %d failed", len(recovered),
                        requeued, len(recovered) - requeued)
            self.wakeup.set()
            self.deliveries.set()
            for job in recovered:  # (at start, the orphan sweep that follows the recovery does this)
                await self._settle_files(job)

    def _published_recovered(self, recovered: list[Job]) -> int:
        """Tell this node's waiters of jobs taken over from a lost runner (other nodes learn of them from the
        store's change feed, which does not tell a node of its own changes); how many were queued again."""
        for job in recovered:
            self.hub.publish(job)
        return sum(job.status is Status.QUEUED for job in recovered)

    async def renew(self, job_ids: list[str]) -> dict[str, str | None]:
        """Extend this node's leases of ``job_ids``: the ones still held, each with any cancel asked of it."""
        assert self.lease_s is not None
        return await self.store.renew(job_ids, node=self.node, lease_s=self.lease_s)


def _expired(job: Job, now: float) -> JobGone:
    """The 410 of a job past ``expires_at``, with the status it has or, queued until the sweep comes by, the
    status the sweep will give it (canceled)."""
    if job.status is Status.QUEUED:
        job = expire(job, now)
    return JobGone(f"job {job.id} has expired", job_status=job.status.value, job_version=job.version)
