"""The store: the one module that speaks SQL. SQLite: one writer thread with group commit, an aiosqlite reader.

``Store`` is the narrow interface a second backend (PostgreSQL) implements;
``SQLiteStore`` is the embedded one. Every write goes through one writer
connection, used only on its own thread, whose loop takes all writes waiting
at that moment and runs them in one transaction, in one hop to that thread
(group commit); a caller's await returns only after that commit. Reads use a
separate read-only aiosqlite connection (WAL lets them run beside the writer).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

import aiosqlite

from . import codec, rules
from .errors import StoreError
from .models import TERMINAL_STATUSES, CancelReason, Job, Status, evolve

log = logging.getLogger("asyncjobs.store")

WAL_SIZE_LIMIT = 32 * 1024 * 1024  # bytes the -wal file keeps once it has been checkpointed


def _bind_as_is() -> None:
    """Let Python's sqlite3 bind None and bytes without its adaptation protocol.

    It binds int, float and str at once, but for any other value (None and bytes among them) it first
    looks for an adapter, and on a miss raises and swallows an AttributeError (``__adapt__``): about half
    a microsecond a value, and a job's INSERT binds a dozen Nones. An identity adapter for each is found
    in sqlite3's table at once and answers the same value, so the bytes stored are the same and no other
    user of sqlite3 in this process sees a change. Both adapters are C callables (no Python frame).
    """
    none: dict[None, None] = {}
    sqlite3.register_adapter(type(None), none.get)  # get(None) on an empty dict: None
    sqlite3.register_adapter(bytes, bytes)  # bytes(b) is b


_bind_as_is()

# Each entry migrates the schema from version i to i + 1 (PRAGMA user_version).
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE jobs (
        seq          INTEGER PRIMARY KEY,
        id           TEXT    NOT NULL UNIQUE,
        task         TEXT    NOT NULL,
        params       BLOB    NOT NULL,
        status       TEXT    NOT NULL,
        priority     INTEGER NOT NULL,
        created_at   REAL    NOT NULL,
        started_at   REAL,
        finished_at  REAL,
        expires_at   REAL    NOT NULL,
        run_at       REAL    NOT NULL,
        attempts     INTEGER NOT NULL,
        max_attempts INTEGER NOT NULL,
        version      INTEGER NOT NULL,
        progress     BLOB,
        result       BLOB,
        result_type  TEXT,
        error        BLOB,
        owner        TEXT    NOT NULL DEFAULT ''
    );
    CREATE INDEX jobs_dispatch ON jobs (priority DESC, seq) WHERE status = 'queued';
    CREATE INDEX jobs_due ON jobs (run_at) WHERE status = 'queued';
    CREATE INDEX jobs_running ON jobs (status) WHERE status = 'running';
    CREATE INDEX jobs_expiry ON jobs (expires_at);
    CREATE INDEX jobs_status_seq ON jobs (status, seq);
    CREATE INDEX jobs_task_seq ON jobs (task, seq);
    CREATE TABLE tombstones (
        id         TEXT PRIMARY KEY,
        owner      TEXT NOT NULL DEFAULT '',
        gone_until REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX tombstones_gone ON tombstones (gone_until);
    """,
    """
    ALTER TABLE jobs ADD COLUMN idempotency_key TEXT;
    ALTER TABLE jobs ADD COLUMN request_hash TEXT;
    ALTER TABLE jobs ADD COLUMN unique_key TEXT;
    ALTER TABLE jobs ADD COLUMN callback_url TEXT;
    CREATE UNIQUE INDEX jobs_idempotency ON jobs (owner, idempotency_key) WHERE idempotency_key IS NOT NULL;
    CREATE INDEX jobs_unique ON jobs (owner, task, unique_key)
        WHERE unique_key IS NOT NULL AND status IN ('queued', 'running');
    CREATE INDEX jobs_owner_seq ON jobs (owner, seq);
    CREATE TABLE deliveries (
        job_id     TEXT PRIMARY KEY,
        message_id TEXT    NOT NULL,
        url        TEXT    NOT NULL,
        payload    BLOB    NOT NULL,
        attempts   INTEGER NOT NULL DEFAULT 0,
        next_at    REAL    NOT NULL,
        state      TEXT    NOT NULL DEFAULT 'pending',
        last_error TEXT
    ) WITHOUT ROWID;
    CREATE INDEX deliveries_due ON deliveries (next_at) WHERE state = 'pending';
    """,
    """
    ALTER TABLE jobs ADD COLUMN files BLOB;
    """,
    """
    ALTER TABLE jobs ADD COLUMN vt INTEGER NOT NULL DEFAULT 0;
    DROP INDEX jobs_dispatch;
    CREATE INDEX jobs_fair ON jobs (priority DESC, vt, seq) WHERE status = 'queued';
    CREATE INDEX jobs_owner_queued ON jobs (owner, vt) WHERE status = 'queued';
    CREATE INDEX jobs_reuse ON jobs (owner, task, unique_key, seq)
        WHERE unique_key IS NOT NULL AND status = 'succeeded';
    CREATE TABLE sessions (
        id         TEXT PRIMARY KEY,
        principal  TEXT NOT NULL,
        csrf       TEXT NOT NULL,
        expires_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX sessions_expiry ON sessions (expires_at);
    """,
    """
    ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
    ALTER TABLE jobs ADD COLUMN lease_until REAL;
    """,
    # Idempotency keys that were answered by an equal job (reuse) rather than stored on a new one.
    """
    CREATE TABLE idempotency_keys (
        owner        TEXT NOT NULL,
        key          TEXT NOT NULL,
        request_hash TEXT,
        job_id       TEXT NOT NULL,
        PRIMARY KEY (owner, key)
    ) WITHOUT ROWID;
    """,
    # A cancel asked of a running job, kept until its handler stops (a crash before then: canceled at restart).
    """
    ALTER TABLE jobs ADD COLUMN cancel_reason TEXT;
    """,
    # An owner's queued jobs by priority: a new job's vt follows its owner's last of the same priority.
    """
    DROP INDEX jobs_owner_queued;
    CREATE INDEX jobs_owner_queued ON jobs (owner, priority, vt) WHERE status = 'queued';
    """,
    # A delete accepted while the handler still ran (cancel_reason 'delete') is also noted here, so that the sweep
    # finds the ones a crash or a race left behind once they ended without a scan of the jobs, and without
    # an index that every insert and claim would have to keep.
    """
    CREATE TABLE deletes (job_id TEXT PRIMARY KEY);
    """,
)

# A job's row, in the same column order in every backend; ``row_to_job`` and ``mutable_values`` map it.
COLUMN_NAMES = (
    "seq", "id", "task", "params", "status", "priority", "created_at", "started_at", "finished_at", "expires_at",
    "run_at", "attempts", "max_attempts", "version", "progress", "result", "result_type", "error", "owner",
    "idempotency_key", "request_hash", "unique_key", "callback_url", "files", "vt", "lease_owner", "lease_until",
)
_COLUMNS = ", ".join(COLUMN_NAMES)
MUTABLE = (
    "status", "started_at", "finished_at", "expires_at", "run_at", "attempts",
    "version", "progress", "result", "result_type", "error", "files", "lease_owner", "lease_until",
)


# The statements that walk the queue name their index: left to itself, SQLite picks
# jobs_status_seq and sorts every queued job in a temp B-tree, a cost that grows with the queue.
# The dispatch order is (priority DESC, vt, seq): within a priority, principals take turns (see insert).
CLAIM_SQL = (f"SELECT {_COLUMNS} FROM jobs INDEXED BY jobs_fair WHERE status = 'queued' AND vt < {rules.WAITING}"
             " AND run_at <= ? AND expires_at > ? AND task IN ({marks}) ORDER BY priority DESC, vt, seq LIMIT ?")
# Waiting jobs (rules.WAITING) of one priority that are due, in the order they fell due: placed before a claim.
DUE_WAITING_SQL = ("SELECT id, owner, seq FROM jobs INDEXED BY jobs_fair WHERE status = 'queued' AND priority = ?"
                   f" AND vt >= {rules.WAITING} AND vt <= ? ORDER BY vt, seq")
# A job's queue position (see rules.is_waiting): the jobs ahead of it at higher priorities (the
# placed ones; the waiting ones too when the last parameter is 1) and at its own.
POSITION_SQL = (
    "SELECT (SELECT COUNT(*) FROM jobs INDEXED BY jobs_fair WHERE status = 'queued' AND priority > ?"
    f" AND (vt < {rules.WAITING} OR ?))"
    " + (SELECT COUNT(*) FROM jobs INDEXED BY jobs_fair WHERE status = 'queued' AND priority = ?"
    " AND (vt < ? OR (vt = ? AND seq < ?)))")
# The positions of placed jobs, in one pass over the placed ones.
POSITIONS_SQL = ("SELECT id, pos FROM (SELECT id, ROW_NUMBER() OVER (ORDER BY priority DESC, vt, seq) AS pos"
                 f" FROM jobs INDEXED BY jobs_fair WHERE status = 'queued' AND vt < {rules.WAITING})"
                 " WHERE id IN ({marks})")
BY_PRIORITY_SQL = ("SELECT priority, COUNT(*) FROM jobs INDEXED BY jobs_fair WHERE status = 'queued'"
                   " GROUP BY priority")
OWNER_LAST_VT_SQL = ("SELECT MAX(vt) FROM jobs INDEXED BY jobs_owner_queued WHERE owner = ? AND priority = ?"
                     f" AND status = 'queued' AND vt < {rules.WAITING}")
# A cancel may be recorded on a running job that has none, and a client's delete may replace its cancel (the
# parameter: the reason asked). Jobs deleted while they ran, once ended: what the sweep forgets.
_MAY_ASK = "(cancel_reason IS NULL OR (cancel_reason = 'request' AND ? = 'delete'))"
DELETED_ENDED_SQL = ("SELECT j.id, j.files IS NOT NULL FROM deletes d JOIN jobs j ON j.id = d.job_id"
                     " WHERE j.status IN ('succeeded', 'failed', 'canceled')")
# Notes of deletes whose job is gone (forgotten by its runner, or by the sweep just now).
FORGET_DELETES_SQL = "DELETE FROM deletes WHERE NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.id = deletes.job_id)"
OWNER_QUEUED_SQL = "SELECT COUNT(*) FROM jobs INDEXED BY jobs_owner_queued WHERE owner = ? AND status = 'queued'"
QUEUED_VTS_SQL = ("SELECT priority, MIN(vt), MAX(vt) FROM jobs INDEXED BY jobs_fair WHERE status = 'queued'"
                  f" AND vt < {rules.WAITING} GROUP BY priority")
# An Idempotency-Key first answered by an equal job: the hash it came with, and that job while it lives.
KEY_REUSE_SQL = (f"SELECT k.request_hash, {', '.join(f'j.{c}' for c in COLUMN_NAMES)} FROM idempotency_keys k"
                 " JOIN jobs j ON j.id = k.job_id WHERE k.owner = ? AND k.key = ? AND j.expires_at > ?")
KEEP_KEY_SQL = "INSERT OR REPLACE INTO idempotency_keys (owner, key, request_hash, job_id) VALUES (?, ?, ?, ?)"
FORGET_KEYS_SQL = "DELETE FROM idempotency_keys WHERE NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.id = job_id)"
LIVE_TWIN_SQL = (f"SELECT {_COLUMNS} FROM jobs WHERE owner = ? AND task = ? AND unique_key = ?"
                 " AND status IN ('queued', 'running') AND expires_at > ? ORDER BY seq DESC LIMIT 1")
DONE_TWIN_SQL = (f"SELECT {_COLUMNS} FROM jobs INDEXED BY jobs_reuse WHERE owner = ? AND task = ?"
                 " AND unique_key = ? AND status = 'succeeded' AND finished_at >= ? AND expires_at > ?"
                 " ORDER BY seq DESC LIMIT 1")
NEXT_RUN_SQL = "SELECT MIN(run_at) FROM jobs INDEXED BY jobs_due WHERE status = 'queued' AND run_at > ?"


_STATUS_OF = {s.value: s for s in Status}  # a dict lookup: calling the enum (Status(value)) costs several times more


def row_to_job(row: Any) -> Job:
    """A job from a row of ``COLUMN_NAMES`` (SQLite's tuple or asyncpg's Record)."""
    (seq, id_, task, params, status, priority, created_at, started_at, finished_at, expires_at,
     run_at, attempts, max_attempts, version, progress, result, result_type, error, owner,
     idempotency_key, request_hash, unique_key, callback_url, files, vt, lease_owner, lease_until) = row
    return Job(
        id=id_, seq=seq, task=task, params=params, status=_STATUS_OF[status], priority=priority,
        created_at=created_at, started_at=started_at, finished_at=finished_at,
        expires_at=expires_at, run_at=run_at, attempts=attempts, max_attempts=max_attempts,
        version=version, progress=codec.loads(progress) if progress else None,
        result=result, result_type=result_type,
        error=codec.loads(error) if error else None, owner=owner,
        idempotency_key=idempotency_key, request_hash=request_hash, unique_key=unique_key,
        callback_url=callback_url, files=codec.loads(files) if files else None, vt=vt,
        lease_owner=lease_owner, lease_until=lease_until,
    )


def file_owner(status: str, files: bytes | None) -> tuple[bool, bool]:
    """What the file store needs of a job's row: (terminal, has a file result)."""
    result = (codec.loads(files) or {}).get("result") if files else None
    return Status(status) in TERMINAL_STATUSES, result is not None


def encoded(value: Any) -> bytes | None:
    return None if value is None else codec.dumps(value)


_ASSIGN = ", ".join(f"{c} = ?" for c in MUTABLE)  # SQLite's "SET" list for the MUTABLE columns


def mutable_values(job: Job) -> tuple[Any, ...]:
    """The values of ``MUTABLE``, as every backend writes them."""
    return (
        job.status.value, job.started_at, job.finished_at, job.expires_at, job.run_at,
        job.attempts, job.version, encoded(job.progress), job.result, job.result_type,
        encoded(job.error), encoded(job.files), job.lease_owner, job.lease_until,
    )


@dataclass(frozen=True)
class Lookup:
    """What the store knows of an id: the job, or a tombstone, or nothing."""

    job: Job | None = None
    gone: bool = False
    owner: str | None = None


@dataclass(frozen=True)
class Inserted:
    """What a submit stored: the new job, or the existing one it duplicates and why."""

    job: Job
    duplicate: rules.Dedupe | None = None  # None: a new job was stored
    key_hash: str | None = None  # a replayed Idempotency-Key's request hash: what it was first sent with


@dataclass(frozen=True)
class Delivery:
    """A callback to make: the job's terminal state, already encoded, and its tries so far."""

    job_id: str
    message_id: str
    url: str
    payload: bytes
    attempts: int


Payload = Callable[[Job], bytes]  # how the caller encodes a terminal job for its callback


def _equal_job(db: sqlite3.Connection, job: Job, reuse_s: float | None) -> Job | None:
    """The newest job equal to ``job`` that may answer it: live, or succeeded within ``reuse_s`` seconds."""
    key = (job.owner, job.task, job.unique_key)
    rows = [db.execute(LIVE_TWIN_SQL, (*key, job.created_at)).fetchone()]
    if reuse_s:
        rows.append(db.execute(DONE_TWIN_SQL, (*key, job.created_at - reuse_s, job.created_at)).fetchone())
    found = [row_to_job(r) for r in rows if r is not None]
    return max(found, key=lambda j: j.seq) if found else None


def _schedule_delivery(db: sqlite3.Connection, job: Job, payload: Payload) -> None:
    if job.callback_url:
        db.execute(
            "INSERT OR IGNORE INTO deliveries (job_id, message_id, url, payload, next_at) VALUES (?, ?, ?, ?, ?)",
            (job.id, f"msg_{job.id}_{job.version}", job.callback_url, payload(job), job.finished_at or 0.0))


@dataclass(frozen=True)
class SweepResult:
    expired_queued: list[Job]  # their canceled state (tombstoned now or by the next sweep; callback scheduled)
    expired_running: list[str]  # ids whose handler must be stopped
    tombstoned: int
    forgotten: int
    with_files: list[str] = dataclasses.field(default_factory=list)  # ids of gone jobs that had files
    deleted: int = 0  # jobs a client deleted while they ran, forgotten now that they have ended


class Store(Protocol):
    """What the queue needs of a store. Every method that writes commits before it returns.

    A backend is SQL and transactions only: the rules it applies are the pure functions of ``rules``.
    """

    shared: bool  # whether other processes use it too (leases expire; changes must be announced)
    commits: int  # transactions committed, for tests and metrics
    on_commit: Callable[[float, int], None] | None  # told (seconds, writes) after each commit

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def insert(self, job: Job, *, admit: bool = True, reuse_s: float | None = None, fresh: bool = False,
                     vt_floor: int = 0, max_queued_for_owner: int = 0) -> Inserted: ...
    async def create_session(self, session_id: str, *, principal: str, csrf: str, expires_at: float) -> None: ...
    async def session(self, session_id: str, *, now: float) -> tuple[str, str] | None: ...
    async def delete_session(self, session_id: str) -> None: ...
    async def queued_vts(self) -> dict[int, tuple[int, int]]: ...
    async def place_due(self, *, now: float, floors: dict[int, int]) -> list[tuple[int, int, int]]: ...
    async def count_waiting(self, priorities: Iterable[int]) -> dict[int, int]: ...
    async def next_queued(self, owner: str, *, now: float) -> Job | None: ...
    async def update(self, job: Job, *, expected_version: int, deliver: Payload | None = None,
                     fence: str | None = None) -> bool: ...
    async def delete(self, job_id: str) -> bool: ...
    async def lookup(self, job_id: str) -> Lookup: ...
    async def list_jobs(self, *, status: str | None, task: str | None, owner: str | None,
                   before_seq: int | None, limit: int) -> list[Job]: ...
    async def claim(self, *, now: float, limit: int, tasks: dict[str, int | None], node: str = "",
                    lease_s: float | None = None) -> list[Job]: ...
    async def recover(self, *, now: float, retention_s: float, payload: Payload, node: str = "",
                      at_start: bool = False, lease_s: float = 30.0) -> list[Job]: ...
    async def sweep(self, *, now: float, retention_s: float, tombstone_retention_s: float,
                    payload: Payload) -> SweepResult: ...
    async def queue_position(self, job: Job) -> int: ...
    async def queue_positions(self, jobs: list[Job]) -> dict[str, int]: ...
    async def count_queued(self) -> int: ...
    async def queued_by_priority(self) -> dict[int, int]: ...
    async def next_run_at(self, *, after: float) -> float | None: ...
    async def counts(self, owner: str | None = None) -> dict[str, int]: ...
    async def ping(self) -> None: ...
    async def jobs(self, job_ids: list[str]) -> list[Job]: ...
    async def renew(self, job_ids: list[str], *, node: str, lease_s: float) -> dict[str, str | None]: ...
    async def request_cancel(self, job_id: str, reason: str) -> bool: ...
    async def others_alive(self, node: str) -> bool: ...
    async def file_owners(self, ids: list[str]) -> dict[str, tuple[bool, bool]]: ...
    async def due_deliveries(self, *, now: float, limit: int, hold_s: float = 60.0,
                             busy: Collection[str] = ()) -> list[Delivery]: ...
    async def next_delivery_at(self, *, busy: Collection[str] = ()) -> float | None: ...
    async def delivery_attempted(self, job_id: str, *, ok: bool, next_at: float | None, error: str | None) -> None: ...


WriteOp = Callable[[sqlite3.Connection], Any]  # runs on the writer thread, inside a transaction


def _name_os_thread(name: str) -> None:
    """Give the calling thread a name ``top -H`` and /proc show (Linux; at most 15 bytes)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


class SQLiteStore:
    """The embedded store: one SQLite file in WAL mode."""

    shared = False  # one process holds the file for its life

    def __init__(self, path: str | Path, *, synchronous: str = "full", max_batch: int = 512) -> None:
        self.path = str(path)
        self.synchronous = synchronous
        self.max_batch = max_batch
        self._writer: sqlite3.Connection | None = None  # used only on _writer_thread
        self._writer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncjobs-store-writer")
        self._reader: aiosqlite.Connection | None = None
        self._pending: asyncio.Queue[tuple[WriteOp, asyncio.Future[Any], Kept | None]] = asyncio.Queue()
        self._writer_task: asyncio.Task[None] | None = None
        self.commits = 0  # transactions committed, for tests and metrics
        self.on_commit: Callable[[float, int], None] | None = None  # told (seconds, writes) after each commit
        self._lock_fd: int | None = None  # holds <path>.lock while open

    # -- lifecycle -------------------------------------------------------
    async def open(self) -> None:
        self._writer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncjobs-store-writer",
                                                 initializer=_name_os_thread, initargs=("store-writer",))
        try:
            if self.path != ":memory:":
                parent = Path(self.path).resolve().parent
                if not parent.is_dir():
                    raise StoreError(f"store.path {self.path}: folder {parent} does not exist")
                self._hold_file()
            self._writer = await self._on_writer(self._connect_writer)
            self._reader = await aiosqlite.connect(self.path, isolation_level=None)
            await self._reader.execute("PRAGMA busy_timeout = 5000")
            await self._reader.execute("PRAGMA query_only = 1")
        except sqlite3.Error as exc:
            await self._close_connections()
            raise StoreError(f"store.path {self.path}: cannot open the SQLite store: {exc}") from exc
        except BaseException:
            await self._close_connections()
            raise
        self._writer_task = asyncio.create_task(self._write_loop(), name="asyncjobs-store-writer")

    def _hold_file(self) -> None:
        """Take the store for this process's life: an exclusive lock on ``<path>.lock``, which the kernel lets
        go when the process ends however it ends. A second process on the same file would take the first's
        running jobs for a crash's and fail them at its start: it stops with this error instead."""
        if fcntl is None:  # pragma: no cover - not on POSIX
            return
        try:
            fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:  # a read-only folder, say: the store cannot be written there either
            raise StoreError(f"store.path {self.path}: cannot open the SQLite store: {exc.strerror}"
                             f" ({exc.filename})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreError(f"store.path {self.path}: another process has this store open (one process holds"
                             " a SQLite store; for several, use PostgreSQL)") from None
        self._lock_fd = fd

    def _let_go_of_file(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the lock goes with the last descriptor
            self._lock_fd = None

    async def _on_writer(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the writer's own thread (the only thread that touches the writer connection)."""
        return await asyncio.get_running_loop().run_in_executor(self._writer_thread, fn, *args)

    def _connect_writer(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA busy_timeout = 5000")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()
            if self.path != ":memory:" and mode and mode[0].lower() != "wal":
                raise StoreError(f"store.path {self.path}: cannot switch to WAL mode (got {mode[0]})")
            db.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
            # The WAL is checkpointed every 1,000 pages (SQLite's default); if a long read held a
            # checkpoint back and it grew, it is cut back to this size once it is reset.
            db.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            db.execute("PRAGMA foreign_keys = ON")
            self._migrate(db)
        except BaseException:
            db.close()
            raise
        return db

    def _migrate(self, db: sqlite3.Connection) -> None:
        (current,) = db.execute("PRAGMA user_version").fetchone()
        if current > len(MIGRATIONS):
            raise StoreError(
                f"store.path {self.path}: schema version {current} is newer than this asyncjobs knows"
                f" ({len(MIGRATIONS)}); upgrade asyncjobs"
            )
        for version in range(current, len(MIGRATIONS)):
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {version + 1}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            log.info("store schema migrated to version %d", version + 1)

    async def close(self) -> None:
        if self._writer_task is not None:
            self._writer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer_task
            self._writer_task = None
        await self._close_connections()
        self._writer_thread.shutdown(wait=False)

    async def _close_connections(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader.close()
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await self._on_writer(self._writer.close)
        self._reader = self._writer = None
        self._let_go_of_file()  # last: the file is this process's until its connections are closed

    # -- the writer ------------------------------------------------------
    async def _write(self, op: WriteOp, *, outlasting: bool = False) -> Any:
        """Run ``op`` in the next batch's transaction; it has committed when this returns. Once queued, the op
        commits with its batch even if the caller is cancelled and stops waiting; with ``outlasting``, the
        caller gets the answer all the same (``enqueue_write``)."""
        if self._writer_task is None or self._writer_task.done():
            raise StoreError("the store is closed")
        return await enqueue_write(self._pending, op, outlasting=outlasting)

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._pending.get()]
            while len(batch) < self.max_batch and not self._pending.empty():
                batch.append(self._pending.get_nowait())
            try:
                await self._run_batch(batch)
            except asyncio.CancelledError:
                for _, fut, kept in batch:
                    settle_write(fut, kept, error=StoreError("the store is closed"))
                raise

    async def _run_batch(self, batch: list[tuple[WriteOp, asyncio.Future[Any], Kept | None]]) -> None:
        db = self._writer
        assert db is not None
        started = time.perf_counter()
        try:
            # One thread hop for the whole batch: BEGIN, every op, COMMIT.
            results = await self._on_writer(self._transaction, db, [op for op, _, _ in batch])
        except Exception as exc:  # the writer goes on whatever one op raised
            if len(batch) == 1:
                if isinstance(exc, sqlite3.Error):
                    settle_write(batch[0][1], batch[0][2], error=StoreError(f"store write failed: {exc}"))
                    log.error("store write failed: %s", exc)
                else:  # a bug in an op (say, a value its row cannot hold): its caller's 500, not the writer's end
                    settle_write(batch[0][1], batch[0][2], error=exc)
                return
            # One op spoiled the batch: run each alone so the others still commit.
            for item in batch:
                await self._run_batch([item])
            return
        self.commits += 1
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - started, len(batch))
        for (_, fut, kept), result in zip(batch, results):
            settle_write(fut, kept, result=result)

    @staticmethod
    def _transaction(db: sqlite3.Connection, ops: list[WriteOp]) -> list[Any]:
        db.execute("BEGIN IMMEDIATE")
        try:
            results = [op(db) for op in ops]
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        return results

    # -- writes ----------------------------------------------------------
    async def insert(self, job: Job, *, admit: bool = True, reuse_s: float | None = None, fresh: bool = False,
                     vt_floor: int = 0, max_queued_for_owner: int = 0) -> Inserted:
        """Store a new job, unless an equal one answers it: the same idempotency key, or (for a job with a
        ``unique_key``, unless ``fresh``) the newest equal job that is live or succeeded within ``reuse_s``.
        An idempotency key answered by an equal job is kept with that job (``idempotency_keys``), so its
        replay finds it ("key-reuse", with the hash the key first came with).

        All in one transaction of the one writer, so racing equal submits make one job. Jobs past their
        ``expires_at`` are not matched. With ``admit`` False (the queue is full) nothing new is stored
        ("refused"); nor when the owner already has ``max_queued_for_owner`` queued jobs ("quota"). A new
        job's ``vt`` is one past its owner's last queued job, and at least ``vt_floor`` (the virtual time),
        so a principal with a backlog and one with a single job take turns.
        """

        def op(db: sqlite3.Connection) -> Inserted:
            if job.idempotency_key is not None:
                cur = db.execute(
                    f"SELECT {_COLUMNS} FROM jobs WHERE owner = ? AND idempotency_key = ? AND expires_at > ?",
                    (job.owner, job.idempotency_key, job.created_at))
                row = cur.fetchone()
                if row is not None:
                    same = row_to_job(row)
                    return Inserted(same, rules.Dedupe.IDEMPOTENCY, key_hash=same.request_hash)
                row = db.execute(KEY_REUSE_SQL, (job.owner, job.idempotency_key, job.created_at)).fetchone()
                if row is not None:
                    return Inserted(row_to_job(row[1:]), rules.Dedupe.KEY_REUSE, key_hash=row[0])
            equal = _equal_job(db, job, reuse_s) if job.unique_key is not None and not fresh else None
            owner_queued = db.execute(OWNER_QUEUED_SQL, (job.owner,)).fetchone()[0] \
                if max_queued_for_owner and equal is None else None
            decided = rules.dedupe(same_key=None, equal=equal, admit=admit, owner_queued=owner_queued,
                                   max_queued_for_owner=max_queued_for_owner)
            if decided is not None:
                if decided[0] is rules.Dedupe.REUSE and job.idempotency_key is not None and equal is not None:
                    db.execute(KEEP_KEY_SQL, (job.owner, job.idempotency_key, job.request_hash, equal.id))
                return Inserted(decided[1] or job, decided[0])
            if job.idempotency_key is not None:  # an expired job's key is free again
                db.execute("UPDATE jobs SET idempotency_key = NULL WHERE owner = ? AND idempotency_key = ?",
                           (job.owner, job.idempotency_key))
                db.execute("DELETE FROM idempotency_keys WHERE owner = ? AND key = ?", (job.owner, job.idempotency_key))
            last = None if rules.waits(job) else \
                db.execute(OWNER_LAST_VT_SQL, (job.owner, job.priority)).fetchone()[0]
            vt = rules.first_vt(job, owner_last=last, floor=vt_floor)
            cur = db.execute(
                f"INSERT INTO jobs ({_COLUMNS}) VALUES (NULL{', ?' * 26})",
                (job.id, job.task, job.params, job.status.value, job.priority, job.created_at,
                 job.started_at, job.finished_at, job.expires_at, job.run_at, job.attempts,
                 job.max_attempts, job.version,
                 codec.dumps(job.progress) if job.progress is not None else None,
                 job.result, job.result_type,
                 codec.dumps(job.error) if job.error is not None else None, job.owner,
                 job.idempotency_key, job.request_hash, job.unique_key, job.callback_url, encoded(job.files),
                 vt, job.lease_owner, job.lease_until),
            )
            return Inserted(evolve(job, vt=vt, seq=cur.lastrowid or 0))

        return await self._write(op, outlasting=True)  # a submit cancelled meanwhile still learns what it stored

    async def update(self, job: Job, *, expected_version: int, deliver: Payload | None = None,
                     fence: str | None = None) -> bool:
        """Write the job's mutable fields if the stored version is still ``expected_version``.

        With ``deliver``, a callback of this state to ``job.callback_url`` is scheduled in the same transaction.
        With ``fence`` (a node), the stored job must also be running under that node's lease (a SQLite
        lease lasts while its process lives, so the version alone decides here in practice).
        """
        fenced = "" if fence is None else " AND status = 'running' AND lease_owner = ?"

        def op(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                f"UPDATE jobs SET {_ASSIGN} WHERE id = ? AND version = ?{fenced}",
                (*mutable_values(job), job.id, expected_version, *(() if fence is None else (fence,))),
            )
            if cur.rowcount == 1 and deliver is not None:
                _schedule_delivery(db, job, deliver)
            return cur.rowcount == 1

        return await self._write(op)

    async def delete(self, job_id: str) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            cur = db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            db.execute("DELETE FROM tombstones WHERE id = ?", (job_id,))
            return cur.rowcount == 1

        return await self._write(op)

    async def claim(self, *, now: float, limit: int, tasks: dict[str, int | None], node: str = "",
                    lease_s: float | None = None) -> list[Job]:
        """Move up to ``limit`` due queued jobs to running, best first, leased to ``node``.

        ``tasks`` maps each runnable task to its concurrency (None: no cap), counted against the jobs of
        it running in the store; jobs of other tasks are left queued. ``lease_s`` None: the lease lasts as
        long as the node (one process holds a SQLite file, so no other node could take the job over).
        """
        open_tasks = [t for t, cap in tasks.items() if cap is None or cap > 0]
        if limit <= 0 or not open_tasks:
            return []
        capped = [t for t in open_tasks if tasks[t] is not None]

        def op(db: sqlite3.Connection) -> list[Job]:
            room = dict(tasks)
            if capped:
                running = dict(db.execute(
                    f"SELECT task, COUNT(*) FROM jobs WHERE status = 'running' AND task IN"
                    f" ({', '.join('?' for _ in capped)}) GROUP BY task", capped).fetchall())
                room.update({t: max(0, (tasks[t] or 0) - running.get(t, 0)) for t in capped})
            claimed: list[Job] = []
            while runnable := rules.runnable(open_tasks, room):
                want = limit - len(claimed)
                # Candidates of a task at its cap are skipped, so read more than wanted only when a cap applies.
                page = want * 4 if capped else want
                rows = db.execute(CLAIM_SQL.format(marks=", ".join("?" for _ in runnable)),
                                  (now, now, *runnable, page)).fetchall()
                picked = rules.pick_claimable(map(row_to_job, rows), room, want, now, node=node,
                                              lease_until=None if lease_s is None else now + lease_s)
                db.executemany(
                    "UPDATE jobs SET status = 'running', started_at = ?, attempts = ?, version = ?, error = NULL,"
                    " lease_owner = ?, lease_until = ?, cancel_reason = NULL WHERE id = ?",
                    [(j.started_at, j.attempts, j.version, j.lease_owner, j.lease_until, j.id) for j in picked],
                )
                claimed += picked
                if rules.claim_done(read=len(rows), page=page, picked=len(picked), wanted=want):
                    break
                room = rules.room_after(room, picked)
            return claimed

        return await self._write(op)

    async def recover(self, *, now: float, retention_s: float, payload: Payload, node: str = "",
                      at_start: bool = False, lease_s: float = 30.0) -> list[Job]:
        """Running jobs whose lease is lost (``rules.lease_lost``: at a SQLite store's start, every one
        another process held) go back to the queue, or fail as interrupted past their attempts. Returns
        their new states."""

        def op(db: sqlite3.Connection) -> list[Job]:
            cur = db.execute(f"SELECT {_COLUMNS}, cancel_reason FROM jobs WHERE status = 'running'")
            rows = [(job, reason) for job, reason in ((row_to_job(r[:-1]), r[-1]) for r in cur.fetchall())
                    if rules.lease_lost(job, now, node=node)]
            recovered = []
            for job, reason in rows:
                new = rules.recover_one(job, now, retention_s=retention_s,
                                        canceled=None if reason is None else CancelReason(reason))
                if new.status is not Status.QUEUED:
                    _schedule_delivery(db, new, payload)
                db.execute(
                    f"UPDATE jobs SET {_ASSIGN} WHERE id = ?",
                    (*mutable_values(new), new.id),
                )
                recovered.append(new)
            return recovered

        return await self._write(op)

    async def sweep(self, *, now: float, retention_s: float, tombstone_retention_s: float,
                    payload: Payload) -> SweepResult:
        """Expire what is past ``expires_at`` into tombstones, and forget old tombstones.

        A queued job that expires is canceled; its callback (if any) is scheduled here.
        """

        def op(db: sqlite3.Connection) -> SweepResult:
            cur = db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE expires_at <= ? LIMIT 5000", (now,)
            )
            expired = [row_to_job(r) for r in cur.fetchall()]
            running = [j.id for j in expired if j.status is Status.RUNNING]
            outcomes = [(j, rules.expired_outcome(j, now)) for j in expired]
            gone = [(j, new) for j, new in outcomes if new is not None]
            db.executemany(
                "INSERT OR REPLACE INTO tombstones (id, owner, gone_until) VALUES (?, ?, ?)",
                [(j.id, j.owner, now + tombstone_retention_s) for j, _ in gone],
            )
            db.executemany("DELETE FROM jobs WHERE id = ?", [(j.id,) for j, _ in gone])
            canceled = [new for j, new in gone if j.status is Status.QUEUED]
            for new in canceled:
                _schedule_delivery(db, new, payload)
            deleted = db.execute(DELETED_ENDED_SQL).fetchall()
            db.executemany("DELETE FROM jobs WHERE id = ?", [(job_id,) for job_id, _ in deleted])
            db.execute(FORGET_DELETES_SQL)
            db.execute("DELETE FROM deliveries WHERE state != 'pending' AND next_at <= ?",
                             (now - tombstone_retention_s,))
            db.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))
            db.execute(FORGET_KEYS_SQL)
            cur = db.execute("DELETE FROM tombstones WHERE gone_until <= ?", (now,))
            return SweepResult(
                expired_queued=canceled,
                expired_running=running,
                tombstoned=len(gone),
                forgotten=cur.rowcount,
                with_files=[j.id for j, _ in gone if j.files is not None] + [i for i, files in deleted if files],
                deleted=len(deleted),
            )

        return await self._write(op)

    async def create_session(self, session_id: str, *, principal: str, csrf: str, expires_at: float) -> None:
        """A browser session (its id is what the signed cookie names; the CSRF token goes in its pages)."""
        def op(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO sessions (id, principal, csrf, expires_at) VALUES (?, ?, ?, ?)",
                       (session_id, principal, csrf, expires_at))

        await self._write(op)

    async def delete_session(self, session_id: str) -> None:
        await self._write(lambda db: db.execute("DELETE FROM sessions WHERE id = ?", (session_id,)))

    async def session(self, session_id: str, *, now: float) -> tuple[str, str] | None:
        """(principal, csrf token) of a live session, or None."""
        rows = await self._fetchall("SELECT principal, csrf FROM sessions WHERE id = ? AND expires_at > ?",
                                    (session_id, now))
        return (rows[0][0], rows[0][1]) if rows else None

    async def next_queued(self, owner: str, *, now: float) -> Job | None:
        """The queued job of ``owner`` that runs first: of those due at ``now``, the first in dispatch order;
        with none due, the one due soonest."""
        rows = await self._fetchall(f"SELECT {_COLUMNS} FROM jobs INDEXED BY jobs_owner_queued WHERE owner = ?"
                                    " AND status = 'queued' ORDER BY MAX(run_at, ?), priority DESC, vt, seq LIMIT 1",
                                    (owner, now))
        return row_to_job(rows[0]) if rows else None

    async def place_due(self, *, now: float, floors: dict[int, int]) -> list[tuple[int, int, int]]:
        """Give the waiting jobs (``rules.WAITING``) of the priorities in ``floors`` that are due at ``now``
        their place in the fair order, in the order they fell due: ``rules.virtual_start`` from their owner's
        last placed job and the priority's virtual time (the floor). Returns (priority, vt, seq) of each."""

        def op(db: sqlite3.Connection) -> list[tuple[int, int, int]]:
            placed = []
            for priority, floor in floors.items():
                for job_id, owner, seq in db.execute(DUE_WAITING_SQL, (priority, rules.waiting_vt(now))).fetchall():
                    (last,) = db.execute(OWNER_LAST_VT_SQL, (owner, priority)).fetchone()
                    vt = rules.virtual_start(owner_last=last, floor=floor)
                    db.execute("UPDATE jobs SET vt = ? WHERE id = ?", (vt, job_id))
                    placed.append((priority, vt, seq))
            return placed

        return await self._write(op)

    async def count_waiting(self, priorities: Iterable[int]) -> dict[int, int]:
        """Queued jobs of each of ``priorities`` still waiting to be due (``rules.WAITING``); none left out."""
        counts = {}
        for priority in priorities:
            rows = await self._fetchall("SELECT COUNT(*) FROM jobs INDEXED BY jobs_fair WHERE status = 'queued'"
                                        f" AND priority = ? AND vt >= {rules.WAITING}", (priority,))
            if rows[0][0]:
                counts[priority] = rows[0][0]
        return counts

    async def queued_vts(self) -> dict[int, tuple[int, int]]:
        """The lowest and highest ``vt`` queued, per priority (the virtual time to resume from at start)."""
        return {priority: (low, high) for priority, low, high in await self._fetchall(QUEUED_VTS_SQL)}

    async def delivery_attempted(self, job_id: str, *, ok: bool, next_at: float | None, error: str | None) -> None:
        """Record a callback attempt: delivered, to be retried at ``next_at``, or given up (None)."""
        state = "delivered" if ok else ("pending" if next_at is not None else "failed")

        def op(db: sqlite3.Connection) -> None:
            # A finished delivery's next_at is when it finished, so the sweep can age it out.
            db.execute(
                "UPDATE deliveries SET attempts = attempts + 1, state = ?, next_at = ?, last_error = ?"
                " WHERE job_id = ?", (state, next_at if next_at is not None else time.time(), error, job_id))

        await self._write(op)

    # -- reads -----------------------------------------------------------
    async def _fetchall(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        if self._reader is None:
            raise StoreError("the store is closed")
        try:
            cur = await self._reader.execute(sql, params)
            return list(await cur.fetchall())
        except sqlite3.Error as exc:
            raise StoreError(f"store read failed: {exc}") from exc

    async def lookup(self, job_id: str) -> Lookup:
        rows = await self._fetchall(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        if rows:
            job = row_to_job(rows[0])
            return Lookup(job=job, owner=job.owner)
        rows = await self._fetchall("SELECT owner FROM tombstones WHERE id = ?", (job_id,))
        if rows:
            return Lookup(gone=True, owner=rows[0][0])
        return Lookup()

    async def list_jobs(self, *, status: str | None, task: str | None, owner: str | None,
                   before_seq: int | None, limit: int) -> list[Job]:
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("status", status), ("task", task), ("owner", owner)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if before_seq is not None:
            where.append("seq < ?")
            params.append(before_seq)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = await self._fetchall(
            f"SELECT {_COLUMNS} FROM jobs {clause} ORDER BY seq DESC LIMIT ?", (*params, limit)
        )
        return [row_to_job(r) for r in rows]

    async def queue_position(self, job: Job) -> int:
        """1 for the next job to run (see ``rules.is_waiting``)."""
        rows = await self._fetchall(POSITION_SQL, (job.priority, rules.is_waiting(job), job.priority,
                                                   job.vt, job.vt, job.seq))
        return rows[0][0] + 1

    async def queue_positions(self, jobs: list[Job]) -> dict[str, int]:
        """Positions of several queued jobs: the placed ones' from one pass over the queue (not one count each),
        a waiting one's (rare) from its own count."""
        placed = [j.id for j in jobs if not rules.is_waiting(j)]
        positions = dict(await self._fetchall(POSITIONS_SQL.format(marks=", ".join("?" for _ in placed)),
                                              tuple(placed))) if placed else {}
        for job in jobs:
            if rules.is_waiting(job):
                positions[job.id] = await self.queue_position(job)
        return positions

    async def count_queued(self) -> int:
        rows = await self._fetchall("SELECT COUNT(*) FROM jobs WHERE status = 'queued'")
        return rows[0][0]

    async def queued_by_priority(self) -> dict[int, int]:
        rows = await self._fetchall(BY_PRIORITY_SQL)
        return dict(rows)

    async def next_run_at(self, *, after: float) -> float | None:
        """The earliest run_at after ``after`` among queued jobs (delayed or backed off)."""
        rows = await self._fetchall(NEXT_RUN_SQL, (after,))
        return rows[0][0]

    async def due_deliveries(self, *, now: float, limit: int, hold_s: float = 60.0,
                             busy: Collection[str] = ()) -> list[Delivery]:
        """Due callback deliveries but those of the ``busy`` jobs, in flight now (one process delivers them
        all: the rows are not held, so the ones in flight are still pending and due)."""
        rows = await self._fetchall(
            "SELECT job_id, message_id, url, payload, attempts FROM deliveries WHERE state = 'pending'"
            f" AND next_at <= ? AND job_id NOT IN ({', '.join('?' for _ in busy)}) ORDER BY next_at LIMIT ?",
            (now, *busy, limit))
        return [Delivery(*row) for row in rows]

    async def next_delivery_at(self, *, busy: Collection[str] = ()) -> float | None:
        """When the next pending delivery is due, but those of the ``busy`` jobs (None: none is pending)."""
        rows = await self._fetchall("SELECT MIN(next_at) FROM deliveries WHERE state = 'pending'"
                                    f" AND job_id NOT IN ({', '.join('?' for _ in busy)})", tuple(busy))
        return rows[0][0]

    async def file_owners(self, ids: list[str]) -> dict[str, tuple[bool, bool]]:
        """For the ids that are jobs: (terminal, has a file result), so the file store can drop the rest."""
        owners: dict[str, tuple[bool, bool]] = {}
        for at in range(0, len(ids), 500):
            part = ids[at:at + 500]
            rows = await self._fetchall(
                f"SELECT id, status, files FROM jobs WHERE id IN ({', '.join('?' for _ in part)})", tuple(part))
            owners.update((job_id, file_owner(status, files)) for job_id, status, files in rows)
        return owners

    async def ping(self) -> None:
        """Raise ``StoreError`` unless the store answers a read now."""
        await self._fetchall("SELECT 1")

    async def jobs(self, job_ids: list[str]) -> list[Job]:
        """The jobs among ``job_ids`` that exist."""
        found: list[Job] = []
        for at in range(0, len(job_ids), 500):
            part = job_ids[at:at + 500]
            rows = await self._fetchall(
                f"SELECT {_COLUMNS} FROM jobs WHERE id IN ({', '.join('?' for _ in part)})", tuple(part))
            found += map(row_to_job, rows)
        return found

    async def renew(self, job_ids: list[str], *, node: str, lease_s: float) -> dict[str, str | None]:
        """The jobs of ``job_ids`` that ``node`` still runs (a SQLite lease never ends while its process
        lives, so there is nothing to extend), with no cancel asked: one process hears its cancels at once."""
        held = await self.jobs(job_ids)
        return {j.id: None for j in held if j.status is Status.RUNNING and j.lease_owner == node}

    async def others_alive(self, node: str) -> bool:
        """Whether another process uses the store now: never (one process holds the file)."""
        return False

    async def request_cancel(self, job_id: str, reason: str) -> bool:
        """Record a cancel asked of ``job_id`` while it runs (its process, the only one, is told through its
        own feed), so that it stands if the process dies before the handler stops. False when the job is
        not running, or a cancel is recorded already (a delete still replaces a client's cancel)."""

        def op(db: sqlite3.Connection) -> bool:
            done = db.execute(f"UPDATE jobs SET cancel_reason = ? WHERE id = ? AND status = 'running' AND {_MAY_ASK}",
                              (reason, job_id, reason)).rowcount == 1
            if done and reason == CancelReason.DELETE.value:
                db.execute("INSERT OR IGNORE INTO deletes (job_id) VALUES (?)", (job_id,))
            return done

        return await self._write(op)

    async def counts(self, owner: str | None = None) -> dict[str, int]:
        """Jobs by status: everyone's, or ``owner``'s."""
        if owner is None:
            rows = await self._fetchall("SELECT status, COUNT(*) FROM jobs GROUP BY status")
        else:
            rows = await self._fetchall("SELECT status, COUNT(*) FROM jobs WHERE owner = ? GROUP BY status", (owner,))
        return {s.value: 0 for s in Status} | {status: n for status, n in rows}


def settle_write(fut: asyncio.Future[Any], kept: Kept | None = None, *, result: Any = None,
                 error: BaseException | None = None) -> None:
    """Answer a queued write: its future, or (its caller cancelled while it waited) its ``kept``."""
    if fut.done():
        if kept is not None and fut.cancelled():  # its caller was cancelled while it waited: keep the answer
            kept.settle(result, error)
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class Kept:
    """A queued write's answer, kept for a caller cancelled while it waited (see ``_outlast``). Made for every
    such write and used for almost none, so it has no ``__init__`` to run: the defaults are the class's."""

    result: Any = None
    error: BaseException | None = None
    done = False
    waiter: asyncio.Future[Any] | None = None

    def settle(self, result: Any, error: BaseException | None) -> None:
        self.result, self.error, self.done = result, error, True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


def enqueue_write(pending: asyncio.Queue[Any], op: Any, *, outlasting: bool) -> Awaitable[Any]:
    """Put ``op`` on a writer's queue; await what this returns for its answer. With ``outlasting``, a caller
    cancelled while it waits still gets the answer (``_outlast``)."""
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    if not outlasting:
        pending.put_nowait((op, fut, None))
        return fut
    kept = Kept()
    pending.put_nowait((op, fut, kept))
    return _outlast(fut, kept)


async def _outlast(fut: asyncio.Future[Any], kept: Kept) -> Any:
    """The answer of a queued write, even if the caller is cancelled while it waits for ``fut``.

    Once queued, a write commits with its batch all the same; a caller that must act on what it did (a
    submit: the queue's count, the job's files, its publish) gets the answer and goes on, the cancel
    consumed. A second cancel while it waits gives up.
    """
    try:
        return await fut
    except asyncio.CancelledError:
        if not fut.cancelled():  # answered, but the caller was cancelled before it could take the answer
            kept.settle(None if fut.exception() else fut.result(), fut.exception())
        if not kept.done:
            kept.waiter = asyncio.get_running_loop().create_future()
            await kept.waiter
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    if kept.error is not None:
        raise kept.error from None
    return kept.result

