"""The rules of a job's life that every store backend applies: pure functions over job records.

A backend reads rows, calls these, and writes what they return; it decides nothing itself,
so two backends cannot drift on what a claim, a recovery, an expiry or a dedupe means.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum

from .models import CancelReason, Job, Status, cancel, evolve, expire, fail, requeue, start

INTERRUPTED = "the server stopped while the job ran, and it has no attempts left"


class Dedupe(StrEnum):
    """Why a submit stored no new job (the values are what ``Inserted.duplicate`` says)."""

    IDEMPOTENCY = "idempotency"  # the same Idempotency-Key: the earlier job answers (or 422)
    REUSE = "reuse"  # an equal job answers (303)
    KEY_REUSE = "key-reuse"  # the Idempotency-Key was first answered by an equal job: it answers again (or 422)
    REFUSED = "refused"  # the queue holds its maximum (503)
    QUOTA = "quota"  # the owner's queued jobs are at their limit (429)


def pick_claimable(candidates: Iterable[Job], room: Mapping[str, int | None], limit: int, now: float, *,
                   node: str = "", lease_until: float | None = None) -> list[Job]:
    """Start up to ``limit`` of ``candidates`` (in dispatch order), each task within its ``room``
    (how many more of it may start; None: no cap), each leased to ``node`` until ``lease_until`` (None:
    for as long as the node lives). Returns the started jobs."""
    left = dict(room)
    started: list[Job] = []
    for job in candidates:
        if len(started) == limit:
            break
        cap = left.get(job.task)
        if cap is not None:
            if cap <= 0:
                continue
            left[job.task] = cap - 1
        started.append(start(job, now, node=node, lease_until=lease_until))
    return started


def runnable(tasks: Iterable[str], room: Mapping[str, int | None]) -> list[str]:
    """The ``tasks`` that may start another job: no cap, or room left (see ``pick_claimable``)."""
    return [t for t in tasks if room.get(t) is None or (room.get(t) or 0) > 0]


def claim_done(*, read: int, page: int, picked: int, wanted: int) -> bool:
    """Whether a claim is over after a page: it has what it wanted, or the page was not full (nothing
    more to read). Otherwise the page held jobs of tasks at their cap, and it reads on without them."""
    return picked == wanted or read < page


def room_after(room: Mapping[str, int | None], started: Iterable[Job]) -> dict[str, int | None]:
    """``room`` (see ``pick_claimable``) once ``started`` have started."""
    left = dict(room)
    for job in started:
        cap = left.get(job.task)
        if cap is not None:
            left[job.task] = cap - 1
    return left


def lease_lost(job: Job, now: float, *, node: str, owner_gone: bool = False) -> bool:
    """Whether a running job's runner is gone: its lease ran out by ``now`` (the database's clock; whoever
    held it, this node too: a lease it could not renew is over), or it has a lease without an end (one
    that lasts while its process lives) held by another process than this node, which has stopped, or
    its holder is another node known to be gone (``owner_gone``)."""
    if job.status is not Status.RUNNING:
        return False
    if owner_gone and job.lease_owner != node:
        return True
    if job.lease_until is None:
        return job.lease_owner != node
    return job.lease_until <= now


# A running job's versions that its runner may have shown and not stored: a progress report reaches waiters at
# once and the store at most every half second, and the runner holds back reports beyond this many until a
# write lands. A job taken from a lost runner goes on past them, so no version (and ETag) a client was shown
# stands for another state of the job.
UNSTORED_VERSIONS = 100


def recover_one(job: Job, now: float, *, retention_s: float, canceled: CancelReason | None = None) -> Job:
    """A job found running whose runner is gone: canceled if a cancel was asked of it (``canceled``, which
    its runner never applied), else queued again while attempts remain, else failed as interrupted. Its
    version goes on past any its runner showed (``UNSTORED_VERSIONS``)."""
    job = evolve(job, version=job.version + UNSTORED_VERSIONS)
    if canceled is CancelReason.EXPIRED:
        return cancel(job, now, retention_s=max(0.0, job.expires_at - now), message=canceled.message)
    if canceled is not None:
        return cancel(job, now, retention_s=retention_s, message=canceled.message)
    if job.attempts < job.max_attempts:
        return requeue(job, run_at=now)
    return fail(job, now, error_type="interrupted", message=INTERRUPTED, retention_s=retention_s)


def expired_outcome(job: Job, now: float) -> Job | None:
    """What a job past ``expires_at`` becomes: a queued one is canceled (and gone at once); a running
    one must be stopped by its runner first (None); a terminal one simply goes."""
    if job.status is Status.QUEUED:
        return expire(job, now)
    return None if job.status is Status.RUNNING else job


def dedupe(*, same_key: Job | None, equal: Job | None, admit: bool, owner_queued: int | None,
           max_queued_for_owner: int) -> tuple[Dedupe, Job | None] | None:
    """Whether a submit stores a new job, in the protocol's order: an idempotency key's job first,
    then an equal job, then the queue's limit, then the owner's. None: store it."""
    if same_key is not None:
        return Dedupe.IDEMPOTENCY, same_key
    if equal is not None:
        return Dedupe.REUSE, equal
    if not admit:
        return Dedupe.REFUSED, None
    if max_queued_for_owner and owner_queued is not None and owner_queued >= max_queued_for_owner:
        return Dedupe.QUOTA, None
    return None


def virtual_start(*, owner_last: int | None, floor: int) -> int:
    """A new job's place in the fair order: one past its owner's last queued job, no earlier than the
    virtual time (the latest job started), so principals take turns within a priority."""
    return max(floor, 0 if owner_last is None else owner_last + 1)


# A job submitted with a delay takes its place in the fair order when it falls due, not at its submit: until
# then its vt is WAITING plus its run_at in milliseconds (``waiting_vt``), past every placed job's and in the
# order the waiting jobs fall due, so the claims leave it and the owner's next due job is not sent behind it.
WAITING = 1 << 62


def waiting_vt(run_at: float) -> int:
    return WAITING + int(run_at * 1000)


def waits(job: Job) -> bool:
    """Whether a new job waits to fall due before it takes a place (it was submitted with a delay)."""
    return job.run_at > job.created_at


def is_waiting(job: Job) -> bool:
    """Whether a queued job still waits to fall due (its vt is WAITING and more) rather than holding a place.
    Its queue position counts the waiting jobs of higher priorities too, a preview of its place among all the
    queued jobs; a placed job's counts only the placed jobs ahead of it, the ones that will start before it (a
    job that falls due later is placed then)."""
    return job.vt >= WAITING


def first_vt(job: Job, *, owner_last: int | None, floor: int) -> int:
    """A new job's vt: waiting while it is delayed, else its place (``virtual_start``)."""
    if waits(job):
        return waiting_vt(job.run_at)
    return virtual_start(owner_last=owner_last, floor=floor)
