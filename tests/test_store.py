"""The store contract: every backend must pass these (today: SQLite)."""

import asyncio
import dataclasses
import sqlite3

import pytest

from asyncjobs.errors import StoreError
from asyncjobs.models import Job, JobIds, Status, start, succeed
from asyncjobs import store as store_module
from asyncjobs.store import MIGRATIONS, SQLiteStore


NEW_ID = JobIds()


def make_job(task="echo", priority=0, run_at=100.0, **changes) -> Job:
    base = dict(id=NEW_ID(), task=task, params=b"{}", status=Status.QUEUED, priority=priority,
                created_at=100.0, expires_at=10_000.0, run_at=run_at, max_attempts=1)
    return Job(**{**base, **changes})


@pytest.fixture(params=["sqlite"])
async def store(request, tmp_path):
    backend = SQLiteStore(tmp_path / "store.db")
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


async def test_claim_respects_task_room(store):
    """A task with no room left, or not runnable here, is not claimed."""
    for _ in range(3):
        await store.insert(make_job(task="capped"))
    await store.insert(make_job(task="unknown"))
    claimed = await store.claim(now=200.0, limit=10, tasks={"capped": 2})
    assert [j.task for j in claimed] == ["capped", "capped"]
    assert await store.claim(now=200.0, limit=10, tasks={"capped": 0}) == []


async def test_recover_requeues_or_interrupts(store):
    """Running jobs left by a crash are queued again if attempts remain, else failed as interrupted."""
    retryable = (await store.insert(make_job(max_attempts=2))).job
    final = (await store.insert(make_job(max_attempts=1))).job
    await store.claim(now=200.0, limit=10, tasks={"echo": None})
    assert await store.recover(now=300.0, retention_s=60, payload=lambda j: b"{}") == (1, 1)
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


async def test_list_is_newest_first_with_a_stable_cursor(store):
    """Listing pages by descending sequence; new jobs do not shift later pages."""
    jobs = [(await store.insert(make_job())).job for _ in range(5)]
    page1 = await store.list(status=None, task=None, owner=None, before_seq=None, limit=2)
    assert [j.id for j in page1] == [jobs[4].id, jobs[3].id]
    await store.insert(make_job())
    page2 = await store.list(status=None, task=None, owner=None, before_seq=page1[-1].seq, limit=2)
    assert [j.id for j in page2] == [jobs[2].id, jobs[1].id]
    filtered = await store.list(status="queued", task="nope", owner=None, before_seq=None, limit=10)
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


async def test_concurrent_writes_share_commits(store):
    """Writes waiting at the same moment are committed together (group commit)."""
    before = store.commits
    await asyncio.gather(*(store.insert(make_job()) for _ in range(100)))
    assert store.commits - before < 100
    assert await store.count_queued() == 100


async def test_a_failing_write_does_not_spoil_its_batch(store):
    """If one write of a batch fails, the others still commit and only it raises."""
    job = (await store.insert(make_job())).job
    clash = dataclasses.replace(make_job(), id=job.id)  # the same id: the insert must fail
    results = await asyncio.gather(
        store.insert(make_job()), store.insert(clash), store.insert(make_job()), return_exceptions=True)
    assert isinstance(results[1], StoreError)
    assert not isinstance(results[0], Exception) and not isinstance(results[2], Exception)
    assert await store.count_queued() == 3


async def test_sqlite_file_settings(tmp_path):
    """WAL mode, the schema version, and store.synchronous are applied to the file."""
    for mode, expected in (("full", 2), ("normal", 1)):
        path = tmp_path / f"{mode}.db"
        store = SQLiteStore(path, synchronous=mode)
        await store.open()
        try:
            value = await store._on_writer(lambda: store._writer.execute("PRAGMA synchronous").fetchone()[0])
            assert value == expected
        finally:
            await store.close()
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


async def test_reopen_keeps_jobs_and_refuses_newer_schema(tmp_path):
    """Reopening migrates nothing twice and keeps jobs; a schema from a newer version is refused."""
    path = tmp_path / "s.db"
    store = SQLiteStore(path)
    await store.open()
    job = (await store.insert(make_job())).job
    await store.close()
    store = SQLiteStore(path)
    await store.open()
    assert (await store.lookup(job.id)).job == job
    await store.close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="newer"):
        await SQLiteStore(path).open()


async def test_unopenable_paths_give_clear_errors(tmp_path):
    """A missing folder or a file that is not SQLite is a StoreError naming the path."""
    with pytest.raises(StoreError, match="does not exist"):
        await SQLiteStore(tmp_path / "no" / "such" / "x.db").open()
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="junk.db"):
        await SQLiteStore(junk).open()


async def test_idempotency_key_returns_the_first_job(store):
    """A second insert with the same owner and key returns the first job instead of a new one."""
    first = await store.insert(make_job(idempotency_key="k1", request_hash="h"))
    again = await store.insert(make_job(idempotency_key="k1", request_hash="other"))
    assert again.duplicate == "idempotency" and again.job.id == first.job.id
    other_owner = await store.insert(make_job(idempotency_key="k1", owner="bob"))
    assert other_owner.duplicate is None
    assert await store.count_queued() == 2


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


@pytest.mark.parametrize("name", ["CLAIM_SQL", "POSITION_SQL", "POSITIONS_SQL", "BY_PRIORITY_SQL", "NEXT_RUN_SQL",
                                  "OWNER_LAST_VT_SQL", "OWNER_QUEUED_SQL", "DONE_TWIN_SQL"])
async def test_queue_walks_use_their_index_not_a_sort(tmp_path, name):
    """Each statement that walks the queue goes by the queued-only index; a sort of every queued job
    (SQLite's own choice without the hint) would make each claim cost more as the queue grows."""
    store = SQLiteStore(tmp_path / "plan.db")
    await store.open()
    await store.close()
    sql = getattr(store_module, name).format(marks="?, ?")
    db = sqlite3.connect(tmp_path / "plan.db")
    try:
        plan = " | ".join(row[-1] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", (1,) * sql.count("?")))
    finally:
        db.close()
    assert "TEMP B-TREE" not in plan, plan
    index = {"NEXT_RUN_SQL": "jobs_due", "OWNER_LAST_VT_SQL": "jobs_owner_queued", "OWNER_QUEUED_SQL": "jobs_owner_queued",
             "DONE_TWIN_SQL": "jobs_reuse"}.get(name, "jobs_fair")
    assert index in plan, plan


async def test_wal_is_cut_back_after_a_long_read_let_it_grow(tmp_path):
    """A read held open stops checkpoints and the WAL grows past its limit; once the read ends and
    writes go on, the WAL is checkpointed and cut back (the file does not stay at its largest)."""
    path = tmp_path / "wal.db"
    store = SQLiteStore(path)
    await store.open()
    wal = tmp_path / "wal.db-wal"
    big = b'"' + b"x" * 60_000 + b'"'
    reader = sqlite3.connect(path)
    try:
        await store.insert(make_job())
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM jobs").fetchone()  # a snapshot: no checkpoint may pass it
        for _ in range(12):
            await asyncio.gather(*(store.insert(make_job(params=big)) for _ in range(64)))
        grown = wal.stat().st_size
        assert grown > store_module.WAL_SIZE_LIMIT, grown
        reader.execute("COMMIT")
        for _ in range(40):
            await asyncio.gather(*(store.insert(make_job()) for _ in range(8)))
            if wal.stat().st_size <= store_module.WAL_SIZE_LIMIT:
                break
        assert wal.stat().st_size <= store_module.WAL_SIZE_LIMIT, (grown, wal.stat().st_size)
    finally:
        reader.close()
        await store.close()
