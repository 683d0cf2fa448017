"""The SQLite store beyond the contract: its file's settings, migrations, WAL, query plans, group commit."""

import asyncio
import sqlite3
import subprocess

import pytest

from asyncjobs import store as store_module
from asyncjobs.errors import StoreError
from asyncjobs.store import MIGRATIONS, SQLiteStore
from tests.test_store import make_job


@pytest.fixture
async def store(tmp_path):
    backend = SQLiteStore(tmp_path / "store.db")
    await backend.open()
    yield backend
    await backend.close()


async def test_concurrent_writes_share_commits(store):
    """Writes waiting at the same moment are committed together (group commit)."""
    before = store.commits
    await asyncio.gather(*(store.insert(make_job()) for _ in range(100)))
    assert store.commits - before < 100
    assert await store.count_queued() == 100


async def test_a_write_that_raises_fails_alone_and_the_writer_goes_on(store):
    """A value its row cannot hold (a string with a lone surrogate, which is no UTF-8) raises in the writer
    thread: that write fails, the others of its batch commit, and later writes go on."""
    bad = make_job(files={"inputs": {"f": {"name": "x", "content_type": "text/\udcff"}}, "result": None})
    async with asyncio.timeout(10):  # a writer that died would leave these waiting for ever
        results = await asyncio.gather(store.insert(make_job()), store.insert(bad), store.insert(make_job()),
                                       return_exceptions=True)
        assert isinstance(results[1], TypeError) and not isinstance(results[0], Exception), results
        assert (await store.insert(make_job())).duplicate is None
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
    # A store that failed to open let go of the file: once the schema is right, this process opens it again.
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {len(store_module.MIGRATIONS)}")
    store = SQLiteStore(path)
    await store.open()
    assert (await store.lookup(job.id)).job == job
    with pytest.raises(StoreError, match="another process has this store open"):
        await SQLiteStore(path).open()  # while it is open, nobody else may hold it
    await store.close()


async def test_unopenable_paths_give_clear_errors(tmp_path):
    """A missing folder, a file that is not SQLite or a read-only folder is a StoreError naming the path."""
    with pytest.raises(StoreError, match="does not exist"):
        await SQLiteStore(tmp_path / "no" / "such" / "x.db").open()
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="junk.db"):
        await SQLiteStore(junk).open()
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(readonly)], check=True)
    try:
        with pytest.raises(StoreError, match="store.path .*readonly.*Read-only file system"):
            await SQLiteStore(readonly / "x.db").open()
    finally:
        subprocess.run(["umount", "-l", str(readonly)], check=False)


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


def test_none_and_bytes_are_bound_as_they_are() -> None:
    """The store registers identity adapters, so sqlite3 binds None and bytes without its failed lookup of an
    adapter (an exception raised and swallowed per value); what is stored is unchanged."""
    data = b"\x00{}"
    assert sqlite3.adapters[(type(None), sqlite3.PrepareProtocol)](None) is None
    assert sqlite3.adapters[(bytes, sqlite3.PrepareProtocol)](data) is data
    db = sqlite3.connect(":memory:")
    try:
        assert db.execute("SELECT ?, typeof(?), ?, typeof(?)", (None, None, data, data)).fetchone() == (
            None, "null", data, "blob")
    finally:
        db.close()
