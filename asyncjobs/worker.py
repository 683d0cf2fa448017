"""Workers: the dispatcher that claims due jobs and the coroutines that run their handlers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mimetypes
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import codec, rules
from .errors import Canceled, RequestError, StoreError
from .files import sanitize_name
from .models import CancelReason, Job, Status, cancel, fail, requeue, succeed, with_progress
from .queue import JobQueue
from .tasks import Blob, FileResult, InputFile, Retry, TaskFailure, TaskSpec

log = logging.getLogger("asyncjobs.worker")

MAX_BACKOFF_S = 3600.0
WAIT_CAP_S = 1.0  # the longest the dispatcher sleeps without looking at the store
BLOB_FILE_BYTES = 256 * 1024  # bytes results larger than this are stored as files, not in the job's row
PROGRESS_PERSIST_INTERVAL_S = 0.5  # progress reaches waiters at once, the store at most this often
# On a shared store the other nodes learn of progress from the store: it is written at most this often, so a
# report reaches them within the 100 ms the protocol promises (this, the write, the notification, a read).
SHARED_PROGRESS_PERSIST_INTERVAL_S = 0.02
OUTCOME_RETRY_S = 0.5  # an outcome the store refused (a full disk, a lost connection) is tried again after this,
OUTCOME_RETRY_MAX_S = 5.0  # then twice as long each time, up to this
PENDING_CANCELS = 1024  # cancel requests remembered for jobs not (yet) running here


@dataclass(eq=False)
class Execution:
    """A job this process runs: its live record, how to stop it, and what of it is stored."""

    job: Job
    stored_version: int
    stop: Callable[[], None] = lambda: None  # set by the worker once the handler runs
    cancel_reason: CancelReason | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    last_persist: float = 0.0
    leased_at: float = field(default_factory=time.monotonic)  # when its lease was last taken or renewed
    pending_write: asyncio.Task[None] | None = None
    trailing: asyncio.TimerHandle | None = None  # the store write planned for a report inside the interval
    finishing: bool = False  # its outcome is being stored: no more progress writes
    has_work_dir: bool = False  # the handler asked for an output path: its folder goes after the attempt
    handling: bool = False  # the worker waits for the handler now (its outcome is not being made yet)
    handed_back: bool = False  # queued again at shutdown while its handler ignored the stop: no outcome stored
    held_report: dict[str, Any] | None = None  # the latest progress, held until a write lands (see progress)
    outcome_refused: bool = False  # the store refused its outcome: tried again until stored, or the stop

    def request_cancel(self, reason: CancelReason) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason
            self.stop()
        elif self.cancel_reason is CancelReason.REQUEST and reason is CancelReason.DELETE:
            self.cancel_reason = reason  # stopping already, and canceled either way: forgotten once stopped


class JobContext:
    """What a handler gets as ``ctx``: its job's id and attempt, progress reports, cancel checks.

    ``progress`` works from the event loop (await it) and from a sync handler's
    thread (call it); in a thread it raises ``Canceled`` once the job is canceled.
    """

    def __init__(self, workers: Workers, execution: Execution, loop: asyncio.AbstractEventLoop, *,
                 loop_thread: int, report_lock: threading.Lock) -> None:
        self._workers = workers
        self._execution = execution
        self._loop = loop
        self._loop_thread = loop_thread
        self._canceled = False  # read by a sync handler's thread; set once, from the loop
        self._report_lock = report_lock  # shared by the contexts of one Workers: held only for a swap
        self._report: tuple[float | None, str | None] | None = None  # latest from a thread, not yet applied
        self.job_id = execution.job.id
        self.attempt = execution.job.attempts
        self._work_dir: Path | None = None
        self.outputs: list[Path] = []

    @property
    def work_dir(self) -> Path:
        """This attempt's own folder (made by ``output_path``); worked out when first asked for."""
        if self._work_dir is None:
            self._work_dir = self._workers.queue.files.work_dir(self.job_id, self.attempt)
        return self._work_dir

    def output_path(self, name: str) -> Path:
        """A fresh path for a file the handler writes: its own folder, removed after this attempt.

        Return ``FileResult(path, ...)`` to make it the result; a handler that returns ``None``
        after asking for exactly one output path that it wrote gets that file as its result.
        """
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._execution.has_work_dir = True
        path = self.work_dir / sanitize_name(name).lstrip(".")
        if path == self.work_dir or path.parent != self.work_dir:
            path = self.work_dir / "output"
        self.outputs.append(path)
        return path

    @property
    def canceled(self) -> bool:
        return self._canceled

    def check_canceled(self) -> None:
        """Raise ``Canceled`` if the job was canceled (for sync handlers)."""
        if self._canceled:
            reason = self._execution.cancel_reason
            raise Canceled(reason.message if reason is not None else "canceled")

    def progress(self, fraction: float | None = None, message: str | None = None) -> asyncio.Future[None]:
        if fraction is not None:
            fraction = min(1.0, max(0.0, float(fraction)))
        # (a text from the file system may hold lone surrogates, which no JSON encoder takes: they become "?")
        message = None if message is None else codec.scrubbed(str(message)[:1000])
        if threading.get_ident() == self._loop_thread:
            self._workers.progress(self._execution, fraction, message)
            done = self._loop.create_future()
            done.set_result(None)
            return done
        self.check_canceled()
        with self._report_lock:
            flush_pending = self._report is not None
            self._report = (fraction, message)
        if not flush_pending:  # reports from a busy thread are coalesced: one loop wake-up at a time
            self._loop.call_soon_threadsafe(self._apply_report)
        return _DONE

    def _apply_report(self) -> None:
        with self._report_lock:
            report, self._report = self._report, None
        if report is not None:
            self._workers.progress(self._execution, *report)


class _Done:
    """An awaitable that is already finished, returned to sync callers of ``progress``."""

    def __await__(self) -> Iterator[None]:  # pragma: no cover - sync callers do not await
        return iter(())


_DONE: Any = _Done()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def backoff_s(spec: TaskSpec, attempts: int) -> float:
    """Exponential backoff with jitter before attempt ``attempts + 1``."""
    base = spec.retry_delay * 2 ** max(0, attempts - 1)
    return min(MAX_BACKOFF_S, base * random.uniform(0.75, 1.25))


class Workers:
    """Runs up to ``count`` jobs at once; async handlers on the loop, sync ones in threads."""

    def __init__(self, queue: JobQueue, *, count: int, sweep_interval_s: float = 1.0,
                 heartbeat_s: float = 10.0) -> None:
        self.queue = queue
        self.count = count
        self.sweep_interval_s = sweep_interval_s
        self.heartbeat_s = heartbeat_s  # between lease renewals, when leases end (queue.lease_s)
        self.persist_interval_s = SHARED_PROGRESS_PERSIST_INTERVAL_S if queue.store.shared \
            else PROGRESS_PERSIST_INTERVAL_S
        # Twice the workers: a sync handler that ignores its timeout's cancel keeps its thread to the end, and up
        # to ``count`` of those do not hold the next sync jobs back.
        self._executor = ThreadPoolExecutor(max_workers=2 * count, thread_name_prefix="asyncjobs-handler")
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.running: dict[str, Execution] = {}  # the jobs this process runs, by id
        self._pending_cancels: dict[str, CancelReason] = {}  # asked before the job was registered here
        queue.hub.add_cancel_listener(self._cancel_requested)
        self._busy = 0  # handlers running now; a job whose outcome is being stored no longer holds a worker
        self._loop_thread = 0  # the event loop's thread, known in start()
        self._report_lock = threading.Lock()
        self._dispatcher: asyncio.Task[None] | None = None
        self._stopping = False  # set by stop(): the dispatcher claims no more
        self._stopped: asyncio.Task[None] | None = None  # stop()'s work, done once however often it is asked
        self.abandoned = 0  # handlers still running after stop() (they ignored it): their jobs were handed back
        self._sweeper: asyncio.Task[None] | None = None
        self._heart: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._loop_thread = threading.get_ident()
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="asyncjobs-dispatcher")
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="asyncjobs-sweeper")
        if self.queue.lease_s is not None:
            self._heart = asyncio.create_task(self._heartbeat_loop(), name="asyncjobs-heartbeat")

    async def stop(self, grace_s: float) -> None:
        """Stop taking jobs; give running ones ``grace_s``; put the rest back in the queue."""
        if self._stopped is None:
            self._stopped = asyncio.create_task(self._stop(grace_s), name="asyncjobs-workers-stop")
        await asyncio.shield(self._stopped)

    async def _stop(self, grace_s: float) -> None:
        # The dispatcher is let finish, not cancelled: a claim in flight commits all the same, and its jobs,
        # started in the store but never run, must be handed back.
        self._stopping = True
        self.queue.wakeup.set()
        if self._dispatcher is not None:
            await asyncio.wait({self._dispatcher}, timeout=max(1.0, grace_s))
        for task in (self._dispatcher, self._sweeper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._tasks:
            log.info("waiting up to %.1fs for %d running jobs", grace_s, len(self._tasks))
            await asyncio.wait(list(self._tasks.values()), timeout=grace_s)
        for execution in list(self.running.values()):
            execution.request_cancel(CancelReason.SHUTDOWN)
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=1.0)
        await self._hand_back_ignored()
        await self._give_up_outcomes()
        if self._heart is not None:  # the leases are renewed until the last job is handed back
            self._heart.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heart
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- dispatch --------------------------------------------------------
    async def _dispatch_loop(self) -> None:
        queue = self.queue
        while not self._stopping:
            timeout = WAIT_CAP_S  # even with nothing due, look again: a wake-up may have been missed
            if queue.next_due is not None and self._busy < self.count:  # (a worker that frees wakes it)
                timeout = min(timeout, max(0.0, queue.next_due - queue.clock()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await queue.wakeup.wait()
            queue.wakeup.clear()
            free = self.count - self._busy
            if free <= 0 or self._stopping:
                continue
            try:
                jobs = await queue.claim(free)
                if self._stopping:
                    await self._hand_back(jobs)
                    return
                for job in jobs:
                    self._launch(job)
                if queue.next_due is not None and queue.next_due <= queue.clock():
                    # A due time passed, maybe while the claim ran (it read the queue before): look again now.
                    await queue.refresh_next_due()
                    queue.wakeup.set()
            except StoreError as exc:
                log.error("cannot claim jobs: %s", exc)
                await asyncio.sleep(1.0)
                queue.wakeup.set()
                continue
            if len(jobs) == free:
                queue.wakeup.set()  # there may be more

    async def _hand_back_ignored(self) -> None:
        """Jobs whose handler still runs after it was asked to stop (a sync handler that never checks, whose
        thread cannot be ended): queued again, their attempt refunded, as if they had stopped; what the handler
        returns later is discarded. The process need not wait for their threads (``abandoned``)."""
        for execution in [e for e in self.running.values() if e.handling]:
            job = execution.job
            execution.handed_back = True
            self.abandoned += 1
            try:
                if await self.queue.finish(requeue(job, run_at=self.queue.clock(), refund_attempt=True),
                                           expected_version=execution.stored_version):
                    log.warning("job %s: its handler ignored the stop; queued again for the next start", job.id)
            except StoreError as exc:
                log.error("job %s: its handler ignored the stop, and the job was not handed back (%s); it is"
                          " recovered at the next start", job.id, exc)

    async def _give_up_outcomes(self) -> None:
        """Outcomes the store still refuses at the end of a stop are left to the recovery of the next start (or
        of another node): the job stays running in the store until then."""
        retrying = [self._tasks[e.job.id] for e in self.running.values()
                    if e.outcome_refused and e.job.id in self._tasks]
        for task in retrying:
            task.cancel()
        if retrying:
            await asyncio.wait(retrying)

    async def _hand_back(self, jobs: list[Job]) -> None:
        """Jobs claimed as the server stops: queued again, their attempt refunded (no handler ran)."""
        for job in jobs:
            try:
                await self.queue.finish(requeue(job, run_at=self.queue.clock(), refund_attempt=True),
                                        expected_version=job.version)
            except StoreError as exc:
                log.error("job %s: claimed as the server stopped and not handed back (%s); it is recovered"
                          " at the next start", job.id, exc)

    def _launch(self, job: Job) -> None:
        """Register a claimed job (before any await, so no cancel request misses it) and run it."""
        execution = Execution(job=job, stored_version=job.version)
        self.running[job.id] = execution
        reason = self._pending_cancels.pop(job.id, None)
        if reason is not None:
            execution.request_cancel(reason)
        self._busy += 1
        self._tasks[job.id] = asyncio.create_task(self._run(execution), name=f"asyncjobs-job-{job.id}")

    def _cancel_requested(self, job_id: str, reason: CancelReason) -> None:
        """A cancel from the feed: stop the job if it runs here, or remember it for a moment in case its
        claim has committed and its registration is still to come."""
        execution = self.running.get(job_id)
        if execution is not None:
            execution.request_cancel(reason)
            return
        self._pending_cancels[job_id] = reason
        while len(self._pending_cancels) > PENDING_CANCELS:
            del self._pending_cancels[next(iter(self._pending_cancels))]

    # -- progress reports --------------------------------------------------
    def progress(self, execution: Execution, fraction: float | None, message: str | None) -> None:
        """A handler's progress: to waiters at once, to the store at most every ``persist_interval_s``. Once
        ``rules.UNSTORED_VERSIONS`` reports went out unstored, the latest waits for the write under way."""
        report: dict[str, Any] = {"fraction": fraction, "message": message}
        if execution.job.status is not Status.RUNNING or execution.job.progress == report:
            return
        if execution.job.version - execution.stored_version >= rules.UNSTORED_VERSIONS:
            execution.held_report = report  # shown once a write lands (the next one, in its time), or stored
            self._persist_soon(execution)  # with the outcome (``_take_held``)
            return
        execution.held_report = None
        execution.job = with_progress(execution.job, report)
        self.queue.publish(execution.job)
        self._persist_soon(execution)

    def _persist_soon(self, execution: Execution) -> None:
        """Store the latest report now if none was stored in the last interval, else once it is over: the
        last report of a burst is stored too (other nodes, and a restart, read progress from the store)."""
        if execution.finishing or execution.pending_write is not None or execution.trailing is not None:
            return  # the write under way looks again when it is done; the one planned takes the latest
        wait = execution.last_persist + self.persist_interval_s - time.monotonic()
        if wait > 0:
            execution.trailing = asyncio.get_running_loop().call_later(wait, self._persist_now, execution)
        else:
            self._persist_now(execution)

    def _persist_now(self, execution: Execution) -> None:
        execution.trailing = None
        if execution.finishing or execution.pending_write is not None \
                or execution.job.version == execution.stored_version:
            return
        execution.last_persist = time.monotonic()
        execution.pending_write = asyncio.create_task(self._persist_progress(execution))

    async def _persist_progress(self, execution: Execution) -> None:
        job = execution.job
        try:  # (a write the store refused is logged there, and returns False: the next report tries again)
            stored = await self.queue.save_progress(job, expected_version=execution.stored_version)
            if stored:
                execution.stored_version = job.version
        finally:
            execution.pending_write = None
        if execution.finishing:
            return
        if stored and execution.held_report is not None:  # held back while too many went out unstored
            held, execution.held_report = execution.held_report, None
            self.progress(execution, held["fraction"], held["message"])
        elif execution.job.version != job.version:  # reported while this one was being stored
            self._persist_soon(execution)

    @staticmethod
    def _take_held(execution: Execution) -> None:
        """The handler is done: a report still held back (see ``progress``) goes into the job's outcome, stored
        with it and never shown before, so the last report before the job ends is kept."""
        held, execution.held_report = execution.held_report, None
        if held is not None and execution.job.status is Status.RUNNING:
            execution.job = with_progress(execution.job, held)

    async def _sweep_loop(self) -> None:
        shared = self.queue.store.shared
        while True:
            try:
                await self.queue.sweep()
                if shared:  # other processes change the queue, and may die holding jobs
                    await self.queue.rescue()
                    await self.queue.refresh_counts()
            except StoreError as exc:
                log.error("sweep failed: %s", exc)
            await asyncio.sleep(self.sweep_interval_s)

    # -- leases ------------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            await self.heartbeat()

    async def heartbeat(self) -> None:
        """Renew the leases of the jobs running here. A job whose lease is gone (ended before it was renewed,
        or taken over) is stopped, and its outcome is not stored; a cancel asked through the store is
        applied. While the store does not answer, a job whose lease has run out by this node's clock is
        stopped too: another node may take it over now."""
        lease_s = self.queue.lease_s
        assert lease_s is not None
        executions = list(self.running.values())
        if not executions:
            return
        asked = time.monotonic()
        try:
            held = await self.queue.renew([e.job.id for e in executions])
        except StoreError as exc:
            log.warning("cannot renew %d leases: %s", len(executions), exc)
            for execution in executions:
                if time.monotonic() - execution.leased_at >= lease_s:
                    execution.request_cancel(CancelReason.LEASE_LOST)
            return
        for execution in executions:
            if execution.job.id not in held:
                if execution.cancel_reason is None:
                    log.warning("job %s: this node's lease ended; stopping it here", execution.job.id)
                execution.request_cancel(CancelReason.LEASE_LOST)
                continue
            execution.leased_at = asked
            reason = held[execution.job.id]
            if reason is not None:
                with contextlib.suppress(ValueError):
                    execution.request_cancel(CancelReason(reason))

    # -- running one job -------------------------------------------------
    async def _run(self, execution: Execution) -> None:
        job = execution.job
        spec = self.queue.registry.get(job.task)
        started = time.monotonic()
        try:
            try:
                if spec is None:
                    new = self._failed(execution, None, "exception", f"task {job.task!r} is no longer registered")
                else:
                    new = await self._outcome(spec, execution)
                    if new.status in (Status.SUCCEEDED, Status.FAILED):
                        self.queue.run_times.record(job.task, time.monotonic() - started)
            finally:
                # The worker is free while the outcome is stored: the next claim can share its commit.
                self._busy -= 1
                self.queue.wakeup.set()
            execution.finishing = True  # the outcome carries the last report; no progress write may race it
            if execution.trailing is not None:
                execution.trailing.cancel()
                execution.trailing = None
            if execution.pending_write is not None:
                await execution.pending_write
            retry_s = OUTCOME_RETRY_S
            while not await self._store_outcome(execution, new):  # the store refused the write: try again
                execution.outcome_refused = True
                if execution.has_work_dir:  # the handler's scratch space goes now: a full disk may need it
                    execution.has_work_dir = False
                    await asyncio.get_running_loop().run_in_executor(
                        None, self.queue.files.remove_work, job.id, job.attempts)
                await asyncio.sleep(retry_s)  # (a stop cancels this: then a restart, or another node, recovers it)
                retry_s = min(retry_s * 2, OUTCOME_RETRY_MAX_S)
        finally:
            self.running.pop(job.id, None)
            self._tasks.pop(job.id, None)
            execution.done.set()
            self.queue.wakeup.set()
            if execution.has_work_dir:  # known without a look at the disk for every job
                await asyncio.get_running_loop().run_in_executor(
                    None, self.queue.files.remove_work, job.id, job.attempts)

    async def _store_outcome(self, execution: Execution, new: Job) -> bool:
        """Store the job's outcome ``new``, or discard it when the job is no longer this runner's (its lease
        ended, or it was handed back at shutdown). False when the store could not be written."""
        job = execution.job
        try:
            if execution.cancel_reason is CancelReason.LEASE_LOST:
                log.warning("job %s: its outcome is discarded (the lease ended)", job.id)
                self.queue.hub.forget(job.id)
            elif execution.handed_back:
                log.warning("job %s: its handler returned after the job was handed back; its outcome is"
                            " discarded", job.id)
            else:
                if new.status is not Status.CANCELED and self._cancel_wins(execution, None):
                    # A cancel accepted while the outcome was made (its result file stored, say) stands.
                    if new.files is not None and new.files.get("result"):
                        await self.queue.files.remove_job(job.id)
                    new = self._canceled(execution)
                if await self.queue.finish(new, expected_version=execution.stored_version,
                                           forget=execution.cancel_reason is CancelReason.DELETE):
                    execution.stored_version = new.version
            if execution.stored_version != new.version and new.files is not None and new.files.get("result"):
                await self.queue.files.remove_result(job.id, job.attempts)  # its outcome was discarded
            execution.job = new
            return True
        except StoreError as exc:
            log.error("job %s: outcome not stored (%s); trying again while this process runs (else a restart,"
                      " or another node once its lease ends, recovers it)", job.id, exc)
            return False

    async def _outcome(self, spec: TaskSpec, execution: Execution) -> Job:
        """Run the handler and turn what happened into the job's next state."""
        loop = asyncio.get_running_loop()
        ctx = JobContext(self, execution, loop, loop_thread=self._loop_thread, report_lock=self._report_lock)
        params = codec.loads(execution.job.params)
        params.update(self._input_files(execution.job))
        if spec.wants_context:
            params["ctx"] = ctx
        if spec.is_async:
            return await self._outcome_async(spec, execution, ctx, params)
        started = loop.create_future()

        def call() -> Any:  # in a handler thread
            loop.call_soon_threadsafe(_resolve, started)
            ctx.check_canceled()  # stopped while it waited for a thread: it never starts
            return spec.fn(**params)

        handler = loop.run_in_executor(self._executor, call)

        def stop() -> None:
            ctx._canceled = True

        execution.stop = stop
        if execution.cancel_reason is not None:
            stop()
        # The timeout runs from the handler's start: a thread still held by a timed-out handler that ignored
        # its cancel is no time of this job's.
        execution.handling = True
        try:
            await asyncio.wait({started, handler}, return_when=asyncio.FIRST_COMPLETED)
            done, _ = await asyncio.wait({handler}, timeout=spec.timeout)
        finally:
            execution.handling = False
        self._take_held(execution)  # (a thread's last report was applied before its handler's end was seen)
        if not done:
            stop()
            return self._timed_out(execution, spec)
        value: Any = None
        error: BaseException | None = None
        try:
            value = handler.result()
        except BaseException as exc:
            error = exc
        if self._cancel_wins(execution, error):
            return self._canceled(execution)
        if error is not None:
            return self._raised(execution, spec, error)
        return await self._succeeded(execution, ctx, value)

    @staticmethod
    def _cancel_wins(execution: Execution, error: BaseException | None) -> bool:
        """Whether a stop asked for decides the outcome over what the handler did. A cancel (by request, by
        expiry, a lost lease) stands even if the handler then returned; a shutdown only stops a handler
        that stopped: one that returned or failed on its own keeps that outcome, so it is not run again."""
        reason = execution.cancel_reason
        if reason is None:
            return False
        return reason is not CancelReason.SHUTDOWN or isinstance(error, (asyncio.CancelledError, Canceled))

    async def _outcome_async(self, spec: TaskSpec, execution: Execution, ctx: JobContext,
                             params: dict[str, Any]) -> Job:
        """An async handler runs in this job's own task: no second task and no wait set per job.

        A cancel request cancels this task only while the handler is being awaited, never
        while the outcome is being stored.
        """
        task = asyncio.current_task()
        assert task is not None
        cancelled = False

        def stop() -> None:
            nonlocal cancelled
            ctx._canceled = True
            if execution.handling:
                cancelled = True
                task.cancel()

        execution.stop = stop
        if execution.cancel_reason is not None:
            ctx._canceled = True
            return self._canceled(execution)
        deadline = asyncio.timeout(spec.timeout)
        value: Any = None
        error: BaseException | None = None
        try:
            execution.handling = True
            async with deadline:
                value = await spec.fn(**params)
        except BaseException as exc:  # sorted out below, with the cancel request and the deadline
            error = exc
        finally:
            execution.handling = False
        self._take_held(execution)
        if cancelled:
            task.uncancel()  # the cancel was ours and is handled here (even if the handler swallowed it)
        if self._cancel_wins(execution, error):
            return self._canceled(execution)
        if isinstance(error, asyncio.CancelledError) and task.cancelling():
            raise error  # cancelled from outside (the loop is closing): not the job's outcome
        if deadline.expired():
            return self._timed_out(execution, spec)
        if error is not None:
            return self._raised(execution, spec, error)
        return await self._succeeded(execution, ctx, value)

    def _timed_out(self, execution: Execution, spec: TaskSpec) -> Job:
        return self._failed(execution, spec, "timeout", f"the handler ran longer than its {spec.timeout:g}s timeout")

    def _raised(self, execution: Execution, spec: TaskSpec, exc: BaseException) -> Job:
        """The next state after the handler raised ``exc``."""
        if isinstance(exc, TaskFailure):
            return self._failed(execution, spec, exc.type, exc.message)
        if isinstance(exc, Retry):
            return self._failed(execution, spec, "exception", exc.message, delay_s=exc.delay_s)
        if isinstance(exc, (asyncio.CancelledError, Canceled)):
            return self._canceled(execution)
        if isinstance(exc, SystemExit):  # a wrapped program's sys.exit(): the job's failure, not the server's
            return self._failed(execution, spec, "exception", f"SystemExit: {exc.code}")
        if not isinstance(exc, Exception):
            raise exc  # KeyboardInterrupt: not a job's outcome
        log.info("job %s: handler raised %s", execution.job.id, exc.__class__.__name__, exc_info=exc)
        return self._failed(execution, spec, "exception", f"{exc.__class__.__name__}: {exc}")

    def _input_files(self, job: Job) -> dict[str, InputFile]:
        """The handler's file params: each upload, already in the job's folder."""
        inputs = (job.files or {}).get("inputs") or {}
        return {name: InputFile(path=self.queue.files.input_path(job.id, name), name=f["name"], size=f["size"],
                                content_type=f["content_type"], sha256=f["sha256"])
                for name, f in inputs.items()}

    async def _succeeded(self, execution: Execution, ctx: JobContext, value: Any) -> Job:
        now = self.queue.clock()
        if value is None and len(ctx.outputs) == 1 and ctx.outputs[0].is_file():
            value = ctx.outputs[0]
        if isinstance(value, Path):
            value = FileResult(value, mimetypes.guess_type(value.name)[0] or "application/octet-stream")
        if isinstance(value, FileResult):
            return await self._file_succeeded(execution, ctx, Path(value.path), value.content_type, value.name)
        if isinstance(value, (bytes, bytearray)):
            value = Blob(bytes(value))
        if isinstance(value, Blob) and len(value.data) > BLOB_FILE_BYTES:
            return await self._file_succeeded(execution, ctx, value.data, value.content_type, None)
        if isinstance(value, Blob):
            result, result_type = value.data, value.content_type
        else:
            try:
                result, result_type = codec.dumps(value), None
            except TypeError as exc:
                return fail(execution.job, now, error_type="exception",
                            message=f"the handler returned a value that is not JSON: {exc}",
                            retention_s=self.queue.retention_s)
        return succeed(execution.job, now, result=result, result_type=result_type,
                       retention_s=self.queue.retention_s)

    async def _file_succeeded(self, execution: Execution, ctx: JobContext, source: Path | bytes,
                              content_type: str, name: str | None) -> Job:
        """Store the file (fsynced, in place) before the job may say ``succeeded``; else fail as storage.

        A file in the handler's work folder is moved; any other path is copied; bytes are written.
        """
        job = execution.job
        if isinstance(source, bytes):
            name = name or f"result{mimetypes.guess_extension(content_type) or '.bin'}"
        elif not source.is_file():
            return fail(job, self.queue.clock(), error_type="exception", retention_s=self.queue.retention_s,
                        message=f"the handler returned the file {source.name!r}, which does not exist")
        else:
            name = name or source.name
        owned = isinstance(source, Path) and source.resolve().parent == ctx.work_dir.resolve()
        try:
            stored = await asyncio.get_running_loop().run_in_executor(None, lambda: self.queue.files.store_result(
                job.id, job.attempts, source, owned=owned, content_type=content_type, name=name or "result"))
        except RequestError as exc:
            return fail(job, self.queue.clock(), error_type="storage", retention_s=self.queue.retention_s,
                        message=f"the result could not be stored: {exc.detail}")
        return succeed(job, self.queue.clock(), result=None, result_type=None, retention_s=self.queue.retention_s,
                       result_file=stored.as_dict())

    def _failed(self, execution: Execution, spec: TaskSpec | None, error_type: str, message: str,
                delay_s: float | None = None) -> Job:
        """Another attempt after a backoff while attempts remain; else the job fails."""
        job, now = execution.job, self.queue.clock()
        if spec is not None and job.attempts < job.max_attempts:
            return requeue(job, run_at=now + (backoff_s(spec, job.attempts) if delay_s is None else delay_s))
        return fail(job, now, error_type=error_type, message=message, retention_s=self.queue.retention_s)

    def _canceled(self, execution: Execution) -> Job:
        job, now = execution.job, self.queue.clock()
        reason = execution.cancel_reason or CancelReason.REQUEST
        if reason is CancelReason.SHUTDOWN:
            return requeue(job, run_at=now, refund_attempt=True)
        if reason is CancelReason.EXPIRED:
            return cancel(job, now, retention_s=job.expires_at - now, message=reason.message)
        return cancel(job, now, retention_s=self.queue.retention_s, message=reason.message)
