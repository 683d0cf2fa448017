"""The job record, its statuses and the pure transitions between them."""

from __future__ import annotations

import base64
import dataclasses
import operator
import os
import weakref
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .errors import InvalidTransition


class Status(StrEnum):
    """A job's status; the values are the wire strings."""

    QUEUED = "queued"  # stored, waiting for a worker (or for its run_at)
    RUNNING = "running"  # a worker runs its handler
    SUCCEEDED = "succeeded"  # terminal: the handler returned
    FAILED = "failed"  # terminal: raised, timed out, or was interrupted too often
    CANCELED = "canceled"  # terminal: canceled by a client or by expiry


class CancelReason(StrEnum):
    """Why a running handler is being stopped; each ends the job differently (see the worker)."""

    REQUEST = "request"  # a client canceled it: canceled
    DELETE = "delete"  # a client deleted it: canceled, then forgotten (by its runner, or by the next sweep)
    SHUTDOWN = "shutdown"  # the server stops: queued again, the attempt refunded
    EXPIRED = "expired"  # its expires_at passed: canceled and gone
    LEASE_LOST = "lease"  # this node's lease ended (not renewed in time): another node may run it now

    @property
    def message(self) -> str:
        return _CANCEL_MESSAGES[self]


_CANCEL_MESSAGES = {
    CancelReason.REQUEST: "canceled by request",
    CancelReason.DELETE: "canceled by request",
    CancelReason.SHUTDOWN: "the server is shutting down",
    CancelReason.EXPIRED: "expired before it finished",
    CancelReason.LEASE_LOST: "this node's lease on the job ended; another node may run it",
}

TERMINAL_STATUSES = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELED})
PENDING_STATUSES = frozenset({Status.QUEUED, Status.RUNNING})

# (from, to) pairs a job may take; anything else is a bug in the caller.
ALLOWED_TRANSITIONS = frozenset(
    {
        (Status.QUEUED, Status.RUNNING),
        (Status.QUEUED, Status.CANCELED),
        (Status.RUNNING, Status.SUCCEEDED),
        (Status.RUNNING, Status.FAILED),
        (Status.RUNNING, Status.CANCELED),
        (Status.RUNNING, Status.QUEUED),  # retry, or requeue after a restart
    }
)


class JobIds:
    """New job ids: 128 random bits from the OS's CSPRNG, URL-safe (22 characters), read 4 KiB at
    a time (one system call per 256 ids instead of one per id). A forked child reads afresh."""

    _SIZE = 4096

    def __init__(self) -> None:
        self._pool = b""
        self._at = self._SIZE
        me = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _drain(me()))

    def __call__(self) -> str:
        if self._at >= self._SIZE:
            self._pool, self._at = os.urandom(self._SIZE), 0
        chunk = self._pool[self._at:self._at + 16]
        self._at += 16
        return base64.urlsafe_b64encode(chunk).rstrip(b"=").decode()


def _drain(ids: JobIds | None) -> None:
    if ids is not None:
        ids._pool, ids._at = b"", ids._SIZE


@dataclass(frozen=True, slots=True)
class Job:
    """One submission of a task. ``params`` and ``result`` are encoded bytes."""

    id: str
    task: str
    params: bytes
    status: Status
    priority: int
    created_at: float
    expires_at: float
    run_at: float
    max_attempts: int
    seq: int = 0  # submission order, assigned by the store
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    version: int = 1
    progress: dict[str, Any] | None = None
    result: bytes | None = None  # JSON, or raw bytes when result_type is set
    result_type: str | None = None  # content type of a bytes result
    error: dict[str, str] | None = None
    owner: str = ""  # the principal that submitted it ("" with auth off)
    idempotency_key: str | None = None
    request_hash: str | None = None  # of the submit that carried the idempotency key
    unique_key: str | None = None  # hash of the params, for tasks declared unique
    callback_url: str | None = None
    files: dict[str, Any] | None = None  # {"inputs": {param: file}, "result": file or None}; None: no files
    vt: int = 0  # virtual start time: equal-priority jobs run in (vt, seq) order, so principals take turns
    lease_owner: str | None = None  # the node running it (while running)
    lease_until: float | None = None  # when another node may take it over; None: while its owner lives

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


def _set_slots_directly(cls: type) -> None:
    """Give a frozen, slotted dataclass an ``__init__`` that sets each slot through its descriptor.

    The ``__init__`` that ``dataclass`` writes for a frozen class looks ``object.__setattr__`` up and
    calls it for every field, 27 times for a Job, and a job is built five or six times in its life (at
    the submit, by the store on insert and claim, at each change of status). This one has the same
    parameters and defaults and does the same, in about half the time. The class stays frozen: only
    ``__init__`` sets its fields.
    """
    fields = dataclasses.fields(cls)
    assert all(f.init and f.default_factory is dataclasses.MISSING for f in fields), "plain defaults only"
    scope: dict[str, Any] = {f"_set_{f.name}": cls.__dict__[f.name].__set__ for f in fields}
    scope.update({f"_default_{f.name}": f.default for f in fields if f.default is not dataclasses.MISSING})
    params = ", ".join(f.name if f.default is dataclasses.MISSING else f"{f.name}=_default_{f.name}"
                       for f in fields)
    body = "".join(f"    _set_{f.name}(self, {f.name})\n" for f in fields)
    exec(f"def __init__(self, {params}):\n{body}", scope)  # the source: field names and their defaults
    init = scope["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__doc__ = cls.__dict__["__init__"].__doc__
    cls.__init__ = init  # type: ignore[misc]


_set_slots_directly(Job)

# In the order of Job's __init__, which takes every field (_set_slots_directly checks it): evolve relies on it.
_FIELDS = tuple(f.name for f in dataclasses.fields(Job))
_FIELD_INDEX = {name: i for i, name in enumerate(_FIELDS)}
_field_values = operator.attrgetter(*_FIELDS)


def evolve(job: Job, **changes: Any) -> Job:
    """``dataclasses.replace`` for a Job in about half its time: every job changes several times in its
    life, on the event loop and on the store's writer thread, so this is on every job's path."""
    values = list(_field_values(job))
    for name, value in changes.items():
        values[_FIELD_INDEX[name]] = value
    return Job(*values)


def _move(job: Job, to: Status, **changes: Any) -> Job:
    if (job.status, to) not in ALLOWED_TRANSITIONS:
        raise InvalidTransition(f"job {job.id}: {job.status} -> {to} is not allowed")
    if to is not Status.RUNNING:  # a lease is held only while running
        changes = {"lease_owner": None, "lease_until": None, **changes}
    return evolve(job, status=to, version=job.version + 1, **changes)


def start(job: Job, now: float, *, node: str = "", lease_until: float | None = None) -> Job:
    """A worker takes the job: one more attempt, leased to ``node`` until ``lease_until`` (None: for as
    long as the node lives)."""
    return _move(job, Status.RUNNING, started_at=now, attempts=job.attempts + 1, error=None,
                 lease_owner=node, lease_until=lease_until)


def succeed(job: Job, now: float, *, result: bytes | None, result_type: str | None, retention_s: float,
            result_file: dict[str, Any] | None = None) -> Job:
    """Done; ``result_file`` (the file's name, size, content type and digest) for a file result."""
    files = job.files
    if result_file is not None:
        files = {"inputs": (job.files or {}).get("inputs", {}), "result": result_file}
    return _move(
        job,
        Status.SUCCEEDED,
        finished_at=now,
        expires_at=now + retention_s,
        result=result,
        result_type=result_type,
        files=files,
    )


def fail(job: Job, now: float, *, error_type: str, message: str, retention_s: float) -> Job:
    return _move(
        job,
        Status.FAILED,
        finished_at=now,
        expires_at=now + retention_s,
        error={"type": error_type, "message": message},
    )


def cancel(job: Job, now: float, *, retention_s: float, message: str = "canceled by request") -> Job:
    return _move(
        job,
        Status.CANCELED,
        finished_at=now,
        expires_at=now + retention_s,
        error={"type": "canceled", "message": message},
    )


def expire(job: Job, now: float) -> Job:
    """A queued job whose expires_at passed: canceled, and gone (410) at once."""
    return cancel(job, now, retention_s=job.expires_at - now, message="expired before it could run")


def requeue(job: Job, *, run_at: float, refund_attempt: bool = False) -> Job:
    """Back to the queue: a retry (after a backoff) or a job interrupted by shutdown."""
    attempts = job.attempts - 1 if refund_attempt else job.attempts
    return _move(job, Status.QUEUED, run_at=run_at, started_at=None, progress=None, attempts=attempts)


def with_progress(job: Job, progress: dict[str, Any]) -> Job:
    if job.status is not Status.RUNNING:
        raise InvalidTransition(f"job {job.id}: progress while {job.status}")
    return evolve(job, progress=progress, version=job.version + 1)


def is_expired(job: Job, now: float) -> bool:
    """Past ``expires_at`` the job answers 410: retention ran out, or it never finished in time."""
    return now >= job.expires_at
