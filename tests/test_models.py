"""The job record's transitions, tested as a table without I/O."""

import base64
import dataclasses
import inspect
import itertools
import os

import pytest

from asyncjobs.errors import InvalidTransition
from asyncjobs.models import (ALLOWED_TRANSITIONS, TERMINAL_STATUSES, Job, JobIds, Status, cancel, evolve, fail,
                              is_expired, requeue, start, succeed, with_progress)


def make_job(status: Status = Status.QUEUED, **changes) -> Job:
    base = dict(id="j1", task="echo", params=b"{}", status=status, priority=0, created_at=100.0,
                expires_at=1000.0, run_at=100.0, max_attempts=1)
    return Job(**{**base, **changes})


MOVES = {
    Status.RUNNING: lambda j: start(j, 200.0),
    Status.SUCCEEDED: lambda j: succeed(j, 200.0, result=b"1", result_type=None, retention_s=10),
    Status.FAILED: lambda j: fail(j, 200.0, error_type="exception", message="x", retention_s=10),
    Status.CANCELED: lambda j: cancel(j, 200.0, retention_s=10),
    Status.QUEUED: lambda j: requeue(j, run_at=300.0),
}


@pytest.mark.parametrize("source,target", list(itertools.product(Status, Status)))
def test_transition_table(source, target):
    """Exactly the allowed (from, to) pairs succeed; each bumps the version by one."""
    job = make_job(source)
    if (source, target) in ALLOWED_TRANSITIONS:
        moved = MOVES[target](job)
        assert moved.status is target and moved.version == job.version + 1
    else:
        with pytest.raises(InvalidTransition):
            MOVES[target](job)


def test_evolve_changes_exactly_the_named_fields():
    """``evolve`` is ``dataclasses.replace`` made faster: every field, changed alone, lands in its own place."""
    job = make_job(owner="alice", files={"inputs": {}, "result": None}, lease_owner="n1", lease_until=5.0)
    for field in dataclasses.fields(Job):
        value = object() if field.name not in ("id",) else "j2"
        changed = evolve(job, **{field.name: value})
        assert getattr(changed, field.name) is value or getattr(changed, field.name) == value
        for other in dataclasses.fields(Job):
            if other.name != field.name:
                assert getattr(changed, other.name) == getattr(job, other.name), (field.name, other.name)
    assert evolve(job, status=Status.RUNNING, version=2) == dataclasses.replace(job, status=Status.RUNNING, version=2)
    assert evolve(job) == job and evolve(job) is not job
    with pytest.raises(KeyError):
        evolve(job, no_such_field=1)


def test_start_leases_the_job_to_its_node():
    job = start(make_job(), 200.0, node="n1", lease_until=230.0)
    assert (job.status, job.lease_owner, job.lease_until, job.attempts, job.version) == \
        (Status.RUNNING, "n1", 230.0, 1, 2)
    assert start(make_job(), 200.0).lease_owner == ""  # a SQLite node's lease: no end, held while it lives


def test_terminal_statuses_have_no_way_out():
    """No transition leaves a terminal status."""
    assert not [pair for pair in ALLOWED_TRANSITIONS if pair[0] in TERMINAL_STATUSES]


def test_start_counts_attempts_and_terminal_sets_retention():
    """Starting counts an attempt; finishing sets finished_at and expires_at = finished_at + retention."""
    running = start(make_job(), 150.0)
    assert running.attempts == 1 and running.started_at == 150.0
    done = succeed(running, 160.0, result=b"null", result_type=None, retention_s=30)
    assert done.finished_at == 160.0 and done.expires_at == 190.0 and done.terminal


def test_requeue_can_refund_the_attempt():
    """A job interrupted by shutdown goes back without spending an attempt."""
    running = start(make_job(), 150.0)
    assert requeue(running, run_at=151.0, refund_attempt=True).attempts == 0
    assert requeue(running, run_at=151.0).attempts == 1


def test_progress_only_while_running():
    """Progress is a change of a running job; on any other status it is refused."""
    running = start(make_job(), 150.0)
    assert with_progress(running, {"fraction": 0.5, "message": None}).version == running.version + 1
    with pytest.raises(InvalidTransition):
        with_progress(make_job(), {"fraction": 0.5})


def test_expiry_is_a_point_in_time():
    """A job is expired from expires_at on."""
    job = make_job(expires_at=500.0)
    assert not is_expired(job, 499.9) and is_expired(job, 500.0)


def test_job_ids_are_url_safe_and_unguessable():
    """Ids are 22 URL-safe characters (128 random bits) and do not repeat (also across the pool's refills)."""
    source = JobIds()
    ids = {source() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 22 and all(c.isalnum() or c in "-_" for c in i) for i in ids)
    assert len({base64.urlsafe_b64decode(i + "==") for i in ids}) == 1000


def test_job_ids_differ_in_a_forked_child():
    """A child forked after ids were drawn does not repeat the parent's next ones from a copied pool."""
    ids = JobIds()
    ids()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, ids().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert len(child) == 22 and child != ids()


def test_job_init_sets_the_slots_itself_with_the_declared_defaults() -> None:
    """Job's __init__ is the fast one (no object.__setattr__ per field), with the dataclass's parameters."""
    assert "__setattr__" not in Job.__init__.__code__.co_names
    params = inspect.signature(Job).parameters
    assert list(params) == [f.name for f in dataclasses.fields(Job)]
    for f in dataclasses.fields(Job):
        declared = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
        assert params[f.name].default == declared, f.name
    job = Job(id="j", task="t", params=b"{}", status=Status.QUEUED, priority=2, created_at=1.0, expires_at=9.0,
              run_at=1.0, max_attempts=3, owner="alice")
    assert (job.priority, job.owner, job.version, job.seq, job.files) == (2, "alice", 1, 0, None)
    assert job == evolve(job) and hash(job) == hash(evolve(job))
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.owner = "bob"  # type: ignore[misc]
    with pytest.raises(TypeError, match="missing"):
        Job(id="j")  # type: ignore[call-arg]
