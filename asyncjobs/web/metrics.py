"""Prometheus metrics of one App: a registry of its own, fed by the hub and the store, read by ``/metrics``."""

from __future__ import annotations

import bisect
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from .. import codec
from ..models import Job, Status

log = logging.getLogger("asyncjobs.metrics")

_TIME_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_COMMIT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_SEEN_MAX = 65_536  # jobs whose last status is remembered, so a repeated publish is not counted twice


class Metrics:
    """The metrics of one service; no global registry, so two Apps can live in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Gauge("asyncjobs_jobs", "Jobs in the store, by status (read at scrape time).",
                          ["status"], registry=r)
        self._by_task: dict[str, _TaskCounts] = {}
        r.register(_TaskCollector(self._by_task))
        self.waiting = Gauge("asyncjobs_waiting_clients", "Clients waiting now, by channel.", ["channel"], registry=r)
        self.commit_latency = Histogram("asyncjobs_store_commit_seconds",
                                        "Time of one store transaction (group commit), begin to commit.",
                                        buckets=_COMMIT_BUCKETS_S, registry=r)
        self.commit_batch = Histogram("asyncjobs_store_commit_batch_size", "Writes grouped in one commit.",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.file_bytes = Gauge("asyncjobs_files_bytes", "Bytes of job files (inputs and results) on disk.",
                                registry=r)
        self.files = Gauge("asyncjobs_files", "Job files (inputs and results) on disk.", registry=r)
        self.history = History()
        self._seen: dict[str, Status] = {}
        for status in Status:
            self.jobs.labels(status.value)
        for channel in ("long_poll", "event_stream", "websocket"):
            self.waiting.labels(channel)

    def observe_job(self, job: Job) -> None:
        """A hub listener: count each change of status once (progress publishes change nothing)."""
        try:
            self._observe(job)
        except Exception:  # metrics must never break the publish of a change
            log.exception("metrics: cannot count job %s", job.id)

    def _observe(self, job: Job) -> None:
        previous = self._seen.pop(job.id, None)
        self._seen[job.id] = job.status  # re-inserted: the dict's order is the eviction order
        if len(self._seen) > _SEEN_MAX:
            del self._seen[next(iter(self._seen))]
        if previous is job.status:
            return
        task = self._by_task.get(job.task)
        if task is None:
            task = self._by_task[job.task] = _TaskCounts()
        if job.status is Status.QUEUED and job.version == 1:
            task.submitted += 1
        elif job.status is Status.RUNNING and job.started_at is not None and job.progress is None:  # a claim
            task.queue_wait.observe(max(0.0, job.started_at - max(job.created_at, job.run_at)))
        elif job.terminal:
            task.ended[job.status] += 1
            self.history.finished(job.status is not Status.SUCCEEDED)
            if job.started_at is not None and job.finished_at is not None:
                task.run_time.observe(max(0.0, job.finished_at - job.started_at))

    def observe_commit(self, seconds: float, batch_size: int) -> None:
        """A store listener: one group commit took ``seconds`` for ``batch_size`` writes."""
        self.commit_latency.observe(seconds)
        self.commit_batch.observe(batch_size)

    def exposition(self, counts: Mapping[str, int], waiting: Mapping[str, int], files: tuple[int, int] = (0, 0)
                   ) -> bytes:
        """The text format, with the gauges read just now (``files``: bytes and count on disk)."""
        self.file_bytes.set(files[0])
        self.files.set(files[1])
        for status, n in counts.items():
            self.jobs.labels(status).set(n)
        for channel, n in waiting.items():
            self.waiting.labels(channel).set(n)
        return generate_latest(self.registry)


class _Histogram:
    """A histogram counted in plain numbers: each observation lands in the first bucket whose bound it does
    not exceed (the last bucket is +Inf)."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(_TIME_BUCKETS_S) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(_TIME_BUCKETS_S, value)] += 1
        self.sum += value


class _TaskCounts:
    """One task's counters and histograms, kept as plain numbers on the event loop and read at scrape time.

    Each change of a job's status is counted here, three or more times a job: prometheus_client's own
    metric objects take a lock and call several functions per update, which cost about 4% of a short job's
    instructions; these cost a few additions."""

    __slots__ = ("created", "ended", "queue_wait", "run_time", "submitted")

    def __init__(self) -> None:
        self.created = time.time()
        self.submitted = 0
        self.ended = {Status.SUCCEEDED: 0, Status.FAILED: 0, Status.CANCELED: 0}
        self.queue_wait = _Histogram()
        self.run_time = _Histogram()


_COUNTERS = (  # name, help, which count of a task
    ("asyncjobs_jobs_submitted", "Jobs accepted, by task.", None),
    ("asyncjobs_jobs_completed", "Jobs that succeeded, by task.", Status.SUCCEEDED),
    ("asyncjobs_jobs_failed", "Jobs that failed, by task.", Status.FAILED),
    ("asyncjobs_jobs_canceled", "Jobs canceled (by request or expiry), by task.", Status.CANCELED),
)
_HISTOGRAMS = (
    ("asyncjobs_queue_wait_seconds", "From when a job was due to when a worker started it, by task.", "queue_wait"),
    ("asyncjobs_run_seconds", "From start to finish of a job's last attempt, by task.", "run_time"),
)
_GO_FLOAT: Callable[[float], str] = floatToGoString  # (prometheus_client's own spelling of a bucket's bound)
_BOUNDS = [_GO_FLOAT(b) for b in _TIME_BUCKETS_S] + ["+Inf"]


class _TaskCollector:
    """Exposes the per-task counts as prometheus_client's Counter and Histogram would: the same names,
    samples (``_total``, ``_created``, ``_bucket``, ``_count``, ``_sum``) and labels."""

    def __init__(self, by_task: dict[str, _TaskCounts]) -> None:
        self._by_task = by_task

    def collect(self) -> Iterator[Metric]:
        tasks = list(self._by_task.items())  # one C call: safe beside the event loop adding a task
        for name, doc, status in _COUNTERS:
            counter = Metric(name, doc, "counter")
            for task, counts in tasks:
                value = counts.submitted if status is None else counts.ended[status]
                counter.add_sample(f"{name}_total", {"task": task}, float(value))
                counter.add_sample(f"{name}_created", {"task": task}, counts.created)
            yield counter
        for name, doc, attribute in _HISTOGRAMS:
            histogram = Metric(name, doc, "histogram")
            for task, counts in tasks:
                observed: _Histogram = getattr(counts, attribute)
                cumulative = 0
                for bound, count in zip(_BOUNDS, list(observed.counts)):
                    cumulative += count
                    histogram.add_sample(f"{name}_bucket", {"task": task, "le": bound}, float(cumulative))
                histogram.add_sample(f"{name}_count", {"task": task}, float(cumulative))
                histogram.add_sample(f"{name}_sum", {"task": task}, observed.sum)
                histogram.add_sample(f"{name}_created", {"task": task}, counts.created)
            yield histogram


class History:
    """The last hour of this process, minute by minute, for the dashboard's charts.

    Per minute: ``completed`` (jobs that reached a terminal state), ``failed`` (of those, the failed and
    canceled ones) and ``queued`` (the highest queue depth sampled in that minute; None when nothing was
    sampled, e.g. before the server started). A ring of ``minutes`` buckets: bounded, whatever the load.
    """

    def __init__(self, minutes: int = 60, clock: Any = time.time) -> None:
        self.minutes = minutes
        self.clock = clock
        self._buckets: deque[list[Any]] = deque(maxlen=minutes)  # [minute, completed, failed, queued]

    def _bucket(self, now: float) -> list[Any]:
        minute = int(now // 60)
        if self._buckets and self._buckets[-1][0] == minute:
            return self._buckets[-1]
        if self._buckets and self._buckets[-1][0] > minute:  # the clock went back: count it in the newest
            return self._buckets[-1]
        bucket = [minute, 0, 0, None]
        self._buckets.append(bucket)
        return bucket

    def finished(self, failed: bool = False, now: float | None = None) -> None:
        bucket = self._bucket(self.clock() if now is None else now)
        bucket[1] += 1
        if failed:
            bucket[2] += 1

    def sample_queued(self, depth: int, now: float | None = None) -> None:
        bucket = self._bucket(self.clock() if now is None else now)
        bucket[3] = depth if bucket[3] is None else max(bucket[3], depth)

    def snapshot(self, now: float | None = None) -> list[dict[str, Any]]:
        """One entry per minute of the last ``minutes`` (oldest first, the current minute last)."""
        current = int((self.clock() if now is None else now) // 60)
        known = {b[0]: b for b in self._buckets}
        out = []
        for minute in range(current - self.minutes + 1, current + 1):
            b = known.get(minute, [minute, 0, 0, None])
            out.append({"t": codec.isotime(minute * 60.0), "completed": b[1], "failed": b[2], "queued": b[3]})
        return out
