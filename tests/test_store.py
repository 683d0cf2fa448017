"""The store contract: every backend passes these unchanged (the fixture builds each from its name).

SQLite-only behaviour (the file's pragmas, WAL, query plans, its writer thread) is in test_sqlite_store.py.
"""

import asyncio
import dataclasses

import pytest

from asyncjobs.errors import StoreError
from asyncjobs.models import Job, JobIds, Status, cancel, is_expired, start, succeed
from asyncjobs.rules import Dedupe
from asyncjobs.store import SQLiteStore

NEW_ID = JobIds()


def make_job(task="echo", priority=0, run_at=100.0, **changes) -> Job:
    base = dict(id=NEW_ID(), task=task, params=b"{}", status=Status.QUEUED, priority=priority,
                created_at=100.0, expires_at=10_000.0, run_at=run_at, max_attempts=1)
    return Job(**{**base, **changes})


def _postgres(request):
    from asyncjobs.postgres import PostgresStore

    # The cluster starts on the first postgres test only (a fresh database for each test).
    return PostgresStore(request.getfixturevalue("postgres_url"))


# Each backend from its name, given the fixture's request and tmp_path.
BACKENDS = {
    "sqlite": lambda request, tmp_path: SQLiteStore(tmp_path / "store.db"),
    "postgres": lambda request, tmp_path: _postgres(request),
}


@pytest.fixture(params=sorted(BACKENDS))
async def store(request, tmp_path):
    backend = BACKENDS[request.param](request, tmp_path)
    await backend.open()
    yield backend
    await backend.close()


async def test_insert_then_lookup(store):
    """An inserted job reads back equal, with a submission sequence number."""
    job = (await store.insert(make_job())).job
    assert job.seq > 0
    found = await store.lookup(job.id)
    assert found.job == job and not found.gone
    assert (await store.lookup("nope")).job is None


async def test_update_is_checked_against_the_version(store):
    """An update applies only over the version the writer last saw."""
    job = (await store.insert(make_job())).job
    running = start(job, 101.0)
    assert await store.update(running, expected_version=job.version)
    assert not await store.update(running, expected_version=job.version)  # stale now
    assert (await store.lookup(job.id)).job.status is Status.RUNNING


async def test_claim_orders_by_priority_then_submission(store):
    """Claims take higher priority first, then older jobs, and only due ones."""
    low = (await store.insert(make_job(priority=0))).job
    high = (await store.insert(make_job(priority=5))).job
    low2 = (await store.insert(make_job(priority=0))).job
    later = (await store.insert(make_job(priority=9, run_at=500.0))).job
    claimed = await store.claim(now=200.0, limit=10, tasks={"echo": None})
    assert [j.id for j in claimed] == [high.id, low.id, low2.id]
    assert all(j.status is Status.RUNNING and j.attempts == 1 for j in claimed)
    assert (await store.lookup(later.id)).job.status is Status.QUEUED
    assert await store.next_run_at(after=200.0) == 500.0


async def test_claim_respects_task_concurrency_counted_in_the_store(store):
    """A task's concurrency counts its jobs running in the store (by any node); a task not runnable here is
    not claimed."""
    for _ in range(4):
        await store.insert(make_job(task="capped"))
    await store.insert(make_job(task="unknown"))
    claimed = await store.claim(now=200.0, limit=10, tasks={"capped": 2}, node="a")
    assert [j.task for j in claimed] == ["capped", "capped"]
    assert await store.claim(now=200.0, limit=10, tasks={"capped": 2}, node="b") == []
    assert await store.claim(now=200.0, limit=10, tasks={"capped": 0}) == []
    done = succeed(claimed[0], 201.0, result=b"1", result_type=None, retention_s=10)
    assert await store.update(done, expected_version=claimed[0].version, fence="a")
    assert len(await store.claim(now=202.0, limit=10, tasks={"capped": 2}, node="b")) == 1


async def test_reports_are_fenced_by_the_lease_holder(store):
    """With a fence, only the node that holds the running job's lease may write it; renewals answer which
    jobs a node still holds."""
    job = (await store.insert(make_job())).job
    [running] = await store.claim(now=200.0, limit=1, tasks={"echo": None}, node="a", lease_s=30.0)
    assert await store.renew([job.id], node="a", lease_s=30.0) == {job.id: None}
    assert await store.renew([job.id], node="b", lease_s=30.0) == {}
    done = succeed(running, 201.0, result=b"1", result_type=None, retention_s=10)
    assert not await store.update(done, expected_version=running.version, fence="b")
    assert await store.update(done, expected_version=running.version, fence="a")
    assert await store.renew([job.id], node="a", lease_s=30.0) == {}  # no longer running
    assert (await store.jobs([job.id, "nothing"]))[0].status is Status.SUCCEEDED


async def test_a_delete_recorded_on_a_running_job_is_forgotten_by_the_sweep_once_it_ends(store):
    """A delete may replace a client's cancel (not the other way round); once the job has ended, the sweep
    forgets it, and a running one it leaves alone. A job merely canceled stays."""
    deleted, canceled = [(await store.insert(make_job())).job for _ in range(2)]
    running = {j.id: j for j in await store.claim(now=200.0, limit=2, tasks={"echo": None}, node="a")}
    assert await store.request_cancel(deleted.id, "request")
    assert await store.request_cancel(deleted.id, "delete")
    assert not await store.request_cancel(deleted.id, "request")
    assert await store.request_cancel(canceled.id, "request")
    assert (await store.sweep(now=201.0, retention_s=10, tombstone_retention_s=5, payload=lambda j: b"{}")).deleted == 0
    for job in running.values():
        assert await store.update(cancel(job, 202.0, retention_s=10), expected_version=job.version, fence="a")
    result = await store.sweep(now=203.0, retention_s=10, tombstone_retention_s=5, payload=lambda j: b"{}")
    assert result.deleted == 1 and result.tombstoned == 0
    assert (await store.lookup(deleted.id)).job is None and not (await store.lookup(deleted.id)).gone
    assert (await store.lookup(canceled.id)).job.status is Status.CANCELED
    assert not await store.request_cancel(deleted.id, "delete")  # nothing left to ask


async def test_recover_requeues_or_interrupts(store):
    """Running jobs left by a crash (another node, gone) are queued again if attempts remain, else failed as
    interrupted."""
    retryable = (await store.insert(make_job(max_attempts=2))).job
    final = (await store.insert(make_job(max_attempts=1))).job
    await store.claim(now=200.0, limit=10, tasks={"echo": None}, node="crashed")
    recovered = await store.recover(now=300.0, retention_s=60, payload=lambda j: b"{}", node="restarted")
    assert {(j.id, j.status) for j in recovered} == {(retryable.id, Status.QUEUED), (final.id, Status.FAILED)}
    assert (await store.lookup(retryable.id)).job.status is Status.QUEUED
    failed = (await store.lookup(final.id)).job
    assert failed.status is Status.FAILED and failed.error["type"] == "interrupted"


async def test_sweep_tombstones_then_forgets(store):
    """Past expires_at a job becomes a tombstone (gone); past tombstone retention, nothing."""
    job = (await store.insert(make_job())).job
    running = start(job, 101.0)
    await store.update(running, expected_version=job.version)
    done = succeed(running, 102.0, result=b"1", result_type=None, retention_s=10)
    await store.update(done, expected_version=running.version)
    result = await store.sweep(now=113.0, retention_s=10, tombstone_retention_s=5, payload=lambda j: b"{}")
    assert result.tombstoned == 1
    assert (await store.lookup(job.id)).gone
    await store.sweep(now=119.0, retention_s=10, tombstone_retention_s=5, payload=lambda j: b"{}")
    found = await store.lookup(job.id)
    assert not found.gone and found.job is None


async def test_sweep_reports_expired_queued_and_running(store):
    """Unfinished jobs past expires_at: queued ones are tombstoned, running ones are reported to stop."""
    queued = (await store.insert(make_job(expires_at=150.0))).job
    running = (await store.insert(make_job(expires_at=150.0, task="other"))).job
    await store.claim(now=120.0, limit=1, tasks={"other": None})
    result = await store.sweep(now=151.0, retention_s=10, tombstone_retention_s=100, payload=lambda j: b"{}")
    assert [j.id for j in result.expired_queued] == [queued.id]
    assert result.expired_running == [running.id]
    found = await store.lookup(queued.id)  # gone, or (shared, for other nodes to read) canceled and expired
    assert found.gone or (found.job is not None and found.job.status is Status.CANCELED
                          and is_expired(found.job, 151.0)), found
    await store.sweep(now=152.0, retention_s=10, tombstone_retention_s=100, payload=lambda j: b"{}")
    assert (await store.lookup(queued.id)).gone


async def test_list_is_newest_first_with_a_stable_cursor(store):
    """Listing pages by descending sequence; new jobs do not shift later pages."""
    jobs = [(await store.insert(make_job())).job for _ in range(5)]
    page1 = await store.list_jobs(status=None, task=None, owner=None, before_seq=None, limit=2)
    assert [j.id for j in page1] == [jobs[4].id, jobs[3].id]
    await store.insert(make_job())
    page2 = await store.list_jobs(status=None, task=None, owner=None, before_seq=page1[-1].seq, limit=2)
    assert [j.id for j in page2] == [jobs[2].id, jobs[1].id]
    filtered = await store.list_jobs(status="queued", task="nope", owner=None, before_seq=None, limit=10)
    assert filtered == []


async def test_queue_position_and_counts(store):
    """Position counts the queued jobs that run before this one."""
    a = (await store.insert(make_job(priority=0))).job
    b = (await store.insert(make_job(priority=1))).job
    c = (await store.insert(make_job(priority=0))).job
    assert [await store.queue_position(j) for j in (b, a, c)] == [1, 2, 3]
    assert await store.queue_positions([c, b]) == {b.id: 1, c.id: 3}
    assert await store.count_queued() == 3
    assert (await store.counts())["queued"] == 3
    assert await store.queued_by_priority() == {0: 2, 1: 1}


async def test_delete_forgets_the_job(store):
    """A deleted job is neither a job nor a tombstone."""
    job = (await store.insert(make_job())).job
    assert await store.delete(job.id)
    found = await store.lookup(job.id)
    assert found.job is None and not found.gone
    assert not await store.delete(job.id)


async def test_a_failing_write_does_not_spoil_its_batch(store):
    """If one write of a batch fails, the others still commit and only it raises."""
    job = (await store.insert(make_job())).job
    clash = dataclasses.replace(make_job(), id=job.id)  # the same id: the insert must fail
    results = await asyncio.gather(
        store.insert(make_job()), store.insert(clash), store.insert(make_job()), return_exceptions=True)
    assert isinstance(results[1], StoreError)
    assert not isinstance(results[0], Exception) and not isinstance(results[2], Exception)
    assert await store.count_queued() == 3


async def test_idempotency_key_returns_the_first_job(store):
    """A second insert with the same owner and key returns the first job instead of a new one."""
    first = await store.insert(make_job(idempotency_key="k1", request_hash="h"))
    again = await store.insert(make_job(idempotency_key="k1", request_hash="other"))
    assert again.duplicate == "idempotency" and again.job.id == first.job.id
    other_owner = await store.insert(make_job(idempotency_key="k1", owner="bob"))
    assert other_owner.duplicate is None
    assert await store.count_queued() == 2


async def test_a_key_answered_by_an_equal_job_is_kept_with_that_job(store):
    """A keyed insert answered by reuse keeps its key with the equal job: a replay finds that job, with the
    hash the key first came with (a different request gets it too, for the queue's 422); once the job is
    gone the key is free for a new job."""
    first = await store.insert(make_job(unique_key="u"))
    keyed = await store.insert(make_job(unique_key="u", idempotency_key="k", request_hash="h1"))
    assert keyed.duplicate == "reuse" and keyed.job.id == first.job.id
    for unique_key, request_hash in (("u", "h1"), ("v", "h2"), (None, "h3")):
        again = await store.insert(make_job(unique_key=unique_key, idempotency_key="k", request_hash=request_hash))
        assert (again.duplicate, again.job.id, again.key_hash) == ("key-reuse", first.job.id, "h1")
    bobs = await store.insert(make_job(unique_key="u", idempotency_key="k", owner="bob"))
    assert bobs.duplicate is None  # keys and equality are per owner
    assert await store.delete(first.job.id)
    fresh = await store.insert(make_job(idempotency_key="k", request_hash="h4"))
    assert fresh.duplicate is None
    replay = await store.insert(make_job(idempotency_key="k", request_hash="h4"))
    assert (replay.duplicate, replay.job.id, replay.key_hash) == ("idempotency", fresh.job.id, "h4")


async def test_unique_key_matches_only_live_jobs(store):
    """A unique job repeats only while the earlier equal job is queued or running."""
    first = await store.insert(make_job(unique_key="u"))
    assert (await store.insert(make_job(unique_key="u"))).job.id == first.job.id
    running = start(first.job, 101.0)
    await store.update(running, expected_version=first.job.version)
    assert (await store.insert(make_job(unique_key="u"))).duplicate == "reuse"
    done = succeed(running, 102.0, result=b"1", result_type=None, retention_s=10)
    await store.update(done, expected_version=running.version)
    assert (await store.insert(make_job(unique_key="u"))).duplicate is None


async def test_deliveries_are_scheduled_with_the_terminal_state(store):
    """A terminal update with deliver=True schedules a delivery; attempts are recorded until done."""
    job = (await store.insert(make_job(callback_url="http://127.0.0.1:9/hook"))).job
    running = start(job, 101.0)
    await store.update(running, expected_version=job.version)
    done = succeed(running, 102.0, result=b"1", result_type=None, retention_s=10)
    assert await store.update(done, expected_version=running.version, deliver=lambda j: j.status.encode())
    due = await store.due_deliveries(now=103.0, limit=10)
    assert [(d.job_id, d.url, d.payload, d.attempts) for d in due] == [
        (job.id, "http://127.0.0.1:9/hook", b"succeeded", 0)]
    await store.delivery_attempted(job.id, ok=False, next_at=200.0, error="answered 500")
    assert await store.due_deliveries(now=103.0, limit=10) == []
    assert await store.next_delivery_at() == 200.0
    await store.delivery_attempted(job.id, ok=True, next_at=None, error=None)
    assert await store.due_deliveries(now=300.0, limit=10) == []


async def test_an_equal_job_answers_while_live_or_recently_succeeded(store):
    """With a unique_key: a live equal job answers; a succeeded one only within reuse_s; fresh never reuses;
    the newest equal job answers."""
    first = (await store.insert(make_job(unique_key="k"))).job
    again = await store.insert(make_job(unique_key="k"))
    assert (again.duplicate, again.job.id) == (Dedupe.REUSE, first.id)
    second = (await store.insert(make_job(unique_key="k"), fresh=True)).job
    assert second.id != first.id
    assert (await store.insert(make_job(unique_key="k"))).job.id == second.id  # the newest
    for running in await store.claim(now=100.0, limit=2, tasks={"echo": None}):
        done = succeed(running, 101.0, result=b"1", result_type=None, retention_s=1000)
        assert await store.update(done, expected_version=running.version)
    within = await store.insert(make_job(unique_key="k", created_at=150.0), reuse_s=60)
    assert (within.duplicate, within.job.id) == (Dedupe.REUSE, second.id)
    late = await store.insert(make_job(unique_key="k", created_at=200.0), reuse_s=60)
    assert late.duplicate is None


async def test_owner_quota_and_full_queue_store_nothing(store):
    for _ in range(2):
        assert (await store.insert(make_job(owner="a"), max_queued_for_owner=2)).duplicate is None
    assert (await store.insert(make_job(owner="a"), max_queued_for_owner=2)).duplicate == Dedupe.QUOTA
    assert (await store.insert(make_job(owner="b"), max_queued_for_owner=2)).duplicate is None
    assert (await store.insert(make_job(owner="b"), admit=False)).duplicate == Dedupe.REFUSED
    assert await store.count_queued() == 3


async def test_principals_take_turns_within_a_priority(store):
    """A backlog's jobs get increasing virtual start times; a newcomer starts at the floor and is claimed
    right after the backlog's jobs of that turn."""
    backlog = [(await store.insert(make_job(owner="a"), vt_floor=0)).job for _ in range(5)]
    assert [j.vt for j in backlog] == [0, 1, 2, 3, 4]
    lone = (await store.insert(make_job(owner="b"), vt_floor=1)).job
    assert lone.vt == 1
    assert (await store.insert(make_job(owner="a"), vt_floor=9)).job.vt == 9  # the floor past a's backlog wins
    order = [j.owner for j in await store.claim(now=100.0, limit=6, tasks={"echo": None})]
    assert order == ["a", "a", "b", "a", "a", "a"]
    assert await store.queued_vts() == {0: (9, 9)}
    await store.insert(make_job(owner="c", priority=2), vt_floor=4)
    await store.insert(make_job(owner="c", priority=2), vt_floor=4)
    assert await store.queued_vts() == {0: (9, 9), 2: (4, 5)}  # each priority's own


async def test_next_queued_of_an_owner(store):
    """Of an owner's due jobs the first in dispatch order; with none due, the one due soonest."""
    later = (await store.insert(make_job(owner="a", run_at=500.0))).job
    soon = (await store.insert(make_job(owner="a", run_at=300.0))).job
    assert (await store.next_queued("a", now=100.0)).id == soon.id
    first = (await store.insert(make_job(owner="a"))).job
    await store.insert(make_job(owner="a"))
    assert (await store.next_queued("a", now=100.0)).id == first.id  # due: ahead of the delayed ones
    # All due: the dispatch order, where a delayed job takes its place once due (behind the placed ones).
    assert (await store.next_queued("a", now=600.0)).id == first.id
    await store.place_due(now=600.0, floors={0: 0})
    assert (await store.next_queued("a", now=600.0)).id == first.id
    assert await store.next_queued("nobody", now=100.0) is None


async def test_a_delayed_job_waits_unplaced_and_takes_its_place_once_due(store):
    """A delayed job is not claimed, even once due, until placed; placing gives the due ones, in the order
    they fell due, places after their owner's last placed job and no earlier than the floor."""
    placed_first = (await store.insert(make_job(owner="a"), vt_floor=7)).job
    assert placed_first.vt == 7
    early = (await store.insert(make_job(owner="b", run_at=200.0))).job
    late = (await store.insert(make_job(owner="a", run_at=300.0))).job
    never = (await store.insert(make_job(owner="a", run_at=900.0))).job
    assert (await store.insert(make_job(owner="a"), vt_floor=0)).job.vt == 8  # delayed jobs hold no place
    assert await store.count_waiting([0, 1]) == {0: 3}
    claimed = await store.claim(now=400.0, limit=10, tasks={"echo": None})
    assert {j.id for j in claimed} == {placed_first.id} | {j.id for j in claimed if j.vt == 8}
    assert len(claimed) == 2  # the two placed jobs; the due waiting ones are left
    placed = await store.place_due(now=400.0, floors={0: 20})
    assert placed == [(0, 20, early.seq), (0, 20, late.seq)]
    assert await store.count_waiting([0]) == {0: 1}
    assert [j.id for j in await store.claim(now=400.0, limit=10, tasks={"echo": None})] == [early.id, late.id]
    assert (await store.lookup(never.id)).job.status is Status.QUEUED


async def test_sessions_live_until_they_expire_or_are_deleted(store):
    await store.create_session("s1", principal="alice", csrf="c1", expires_at=200.0)
    assert await store.session("s1", now=150.0) == ("alice", "c1")
    assert await store.session("s1", now=250.0) is None
    await store.delete_session("s1")
    assert await store.session("s1", now=150.0) is None


async def test_file_owners_say_which_folders_belong_to_jobs(store):
    job = (await store.insert(make_job(files={"inputs": {"f": {}}, "result": None}))).job
    assert await store.file_owners([job.id, "stray"]) == {job.id: (False, False)}


async def test_a_claim_leases_its_jobs_and_recovery_takes_only_lost_leases(store):
    """Claimed jobs are leased to the claiming node; recovery leaves a live node's jobs alone (a lease
    without an end lasts as long as its node) and takes those of any other node."""
    await store.insert(make_job())
    [job] = await store.claim(now=100.0, limit=1, tasks={"echo": None}, node="me")
    assert (job.lease_owner, job.lease_until) == ("me", None)
    assert (await store.lookup(job.id)).job.lease_owner == "me"
    assert await store.recover(now=101.0, retention_s=10, payload=lambda j: b"", node="me") == []
    [recovered] = await store.recover(now=101.0, retention_s=10, payload=lambda j: b"", node="next")
    after = (await store.lookup(job.id)).job
    assert recovered == after
    assert after.status is Status.FAILED and after.lease_owner is None


async def test_concurrent_writes_share_commits(store):
    """Group commit: 200 inserts at once are all stored, in fewer commits than writes."""
    before = store.commits
    inserted = await asyncio.gather(*(store.insert(make_job()) for _ in range(200)))
    assert len({i.job.id for i in inserted}) == 200 and all(i.duplicate is None for i in inserted)
    assert store.commits - before < 200
    assert await store.count_queued() == 200


async def test_reports_sent_together_are_each_fenced(store):
    """Outcomes of several running jobs written at once (one statement on PostgreSQL): each is checked on
    its own version and lease; the stale ones write nothing."""
    for _ in range(5):
        await store.insert(make_job())
    running = await store.claim(now=200.0, limit=5, tasks={"echo": None}, node="a", lease_s=30.0)
    assert len(running) == 5
    outcomes = [succeed(j, 201.0, result=b"1", result_type=None, retention_s=10) for j in running]
    written = await asyncio.gather(
        *(store.update(o, expected_version=j.version, fence="a") for o, j in zip(outcomes[:3], running[:3])),
        store.update(outcomes[3], expected_version=running[3].version - 1, fence="a"),  # stale version
        store.update(outcomes[4], expected_version=running[4].version, fence="b"))  # not its lease
    assert written == [True, True, True, False, False]
    statuses = [(await store.lookup(j.id)).job.status for j in running]
    assert statuses == [Status.SUCCEEDED] * 3 + [Status.RUNNING] * 2
