"""The PostgreSQL store: ``PostgresStore``, the ``Store`` of many nodes sharing one database (asyncpg).

The same contract as ``SQLiteStore`` (its docstrings are the reference), method for method: every write
has committed before the method returns (group commit: writer tasks run the writes waiting in one
transaction, a batch's plain inserts and reports as one array statement each); the rules applied are
those of ``rules``. What one writer thread serializes in SQLite is made safe here with row locks and
transaction-level advisory locks:

- insert takes ``pg_advisory_xact_lock`` on a hash of (owner, idempotency_key), of (owner, task,
  unique_key), and, when an owner quota applies, of the owner, in that order, before it looks for the
  earlier or equal job, so racing equal submits (on any node) make one job;
- claim reads its candidates ``FOR UPDATE SKIP LOCKED`` in dispatch order (priority DESC, vt, seq), so two
  nodes never start the same job and neither waits for the other;
- recover and sweep lock the rows they change the same way, so two nodes never recover or sweep the same
  rows;
- the schema is migrated in one transaction under an advisory lock, so nodes starting at once are safe.

A job's times come from the caller (``now``), as with SQLite; leases begin and end by the database's
clock, never a node's. Every insert and version change is announced with NOTIFY (a statement trigger) for
the other nodes' change feeds (``cluster``). Connection failures and PostgreSQL errors are raised as
``StoreError`` (the web layer answers 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import asyncpg

from . import limits, rules
from .errors import InvalidRequest, StoreError, StoreUnreachable
from .models import CancelReason, Job, Status, evolve
from .store import (
    COLUMN_NAMES,
    DELETED_ENDED_SQL,
    FORGET_DELETES_SQL,
    MUTABLE,
    Delivery,
    Inserted,
    Kept,
    Lookup,
    Payload,
    SweepResult,
    encoded,
    enqueue_write,
    file_owner,
    mutable_values,
    row_to_job,
    settle_write,
)

log = logging.getLogger("asyncjobs.postgres")

SCHEMA_TABLE = "asyncjobs_schema"
MIGRATE_LOCK = "asyncjobs.migrate"
CLOSE_TIMEOUT = 10.0  # seconds close() waits for connections in use before it cuts them

# Each entry migrates the schema from version i to i + 1 (the one row of asyncjobs_schema).
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE jobs (
        seq             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id              TEXT             NOT NULL UNIQUE,
        task            TEXT             NOT NULL,
        params          BYTEA            NOT NULL,
        status          TEXT             NOT NULL,
        priority        INTEGER          NOT NULL,
        created_at      DOUBLE PRECISION NOT NULL,
        started_at      DOUBLE PRECISION,
        finished_at     DOUBLE PRECISION,
        expires_at      DOUBLE PRECISION NOT NULL,
        run_at          DOUBLE PRECISION NOT NULL,
        attempts        INTEGER          NOT NULL,
        max_attempts    INTEGER          NOT NULL,
        version         INTEGER          NOT NULL,
        progress        BYTEA,
        result          BYTEA,
        result_type     TEXT,
        error           BYTEA,
        owner           TEXT             NOT NULL DEFAULT '',
        idempotency_key TEXT,
        request_hash    TEXT,
        unique_key      TEXT,
        callback_url    TEXT,
        files           BYTEA,
        vt              BIGINT           NOT NULL DEFAULT 0,
        lease_owner     TEXT,
        lease_until     DOUBLE PRECISION
    );
    CREATE INDEX jobs_fair ON jobs (priority DESC, vt, seq) WHERE status = 'queued';
    CREATE INDEX jobs_due ON jobs (run_at) WHERE status = 'queued';
    CREATE INDEX jobs_running ON jobs (seq) WHERE status = 'running';
    CREATE INDEX jobs_expiry ON jobs (expires_at);
    CREATE INDEX jobs_status_seq ON jobs (status, seq);
    CREATE INDEX jobs_task_seq ON jobs (task, seq);
    CREATE INDEX jobs_owner_seq ON jobs (owner, seq);
    CREATE INDEX jobs_owner_queued ON jobs (owner, vt) WHERE status = 'queued';
    CREATE UNIQUE INDEX jobs_idempotency ON jobs (owner, idempotency_key) WHERE idempotency_key IS NOT NULL;
    CREATE INDEX jobs_unique ON jobs (owner, task, unique_key, seq)
        WHERE unique_key IS NOT NULL AND status IN ('queued', 'running');
    CREATE INDEX jobs_reuse ON jobs (owner, task, unique_key, seq)
        WHERE unique_key IS NOT NULL AND status = 'succeeded';
    CREATE TABLE tombstones (
        id         TEXT PRIMARY KEY,
        owner      TEXT NOT NULL DEFAULT '',
        gone_until DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX tombstones_gone ON tombstones (gone_until);
    CREATE TABLE deliveries (
        job_id     TEXT PRIMARY KEY,
        message_id TEXT             NOT NULL,
        url        TEXT             NOT NULL,
        payload    BYTEA            NOT NULL,
        attempts   INTEGER          NOT NULL DEFAULT 0,
        next_at    DOUBLE PRECISION NOT NULL,
        state      TEXT             NOT NULL DEFAULT 'pending',
        last_error TEXT
    );
    CREATE INDEX deliveries_due ON deliveries (next_at) WHERE state = 'pending';
    CREATE TABLE sessions (
        id         TEXT PRIMARY KEY,
        principal  TEXT NOT NULL,
        csrf       TEXT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX sessions_expiry ON sessions (expires_at);
    """,
    # Many nodes: a cancel asked of a running job (read by its node's heartbeat), and the change feed: after
    # every statement that inserts jobs or changes their version, one NOTIFY of "node|id:version:s,..." (s:
    # the status's first letter), delivered at commit; "node|*" when the list would not fit in a payload.
    """
    ALTER TABLE jobs ADD COLUMN cancel_reason TEXT;
    CREATE INDEX jobs_lease ON jobs (lease_until) WHERE status = 'running';
    CREATE FUNCTION asyncjobs_notify() RETURNS trigger LANGUAGE plpgsql AS $fn$
    DECLARE
        body TEXT;
        node TEXT := coalesce(current_setting('asyncjobs.node', true), '');
    BEGIN
        IF TG_OP = 'INSERT' THEN
            SELECT string_agg(n.id || ':' || n.version || ':' || left(n.status, 1), ',') INTO body FROM new_rows n;
        ELSE
            SELECT string_agg(n.id || ':' || n.version || ':' || left(n.status, 1), ',') INTO body
              FROM new_rows n JOIN old_rows o ON o.seq = n.seq WHERE n.version <> o.version;
        END IF;
        IF body IS NOT NULL THEN
            IF octet_length(body) > 7000 THEN
                body := '*';
            END IF;
            PERFORM pg_notify('asyncjobs_changes', node || '|' || body);
        END IF;
        RETURN NULL;
    END
    $fn$;
    CREATE TRIGGER jobs_notify_insert AFTER INSERT ON jobs REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION asyncjobs_notify();
    CREATE TRIGGER jobs_notify_update AFTER UPDATE ON jobs REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION asyncjobs_notify();
    """,
    # The submit rate's token buckets, shared by every node (full_at: when it is full again, for the sweep).
    """
    CREATE TABLE rate_buckets (
        owner   TEXT PRIMARY KEY,
        tokens  DOUBLE PRECISION NOT NULL,
        at      DOUBLE PRECISION NOT NULL,
        full_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX rate_buckets_full ON rate_buckets (full_at);
    """,
    # Idempotency keys that were answered by an equal job (reuse) rather than stored on a new one.
    """
    CREATE TABLE idempotency_keys (
        owner        TEXT NOT NULL,
        key          TEXT NOT NULL,
        request_hash TEXT,
        job_id       TEXT NOT NULL,
        PRIMARY KEY (owner, key)
    );
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
CHANGES_CHANNEL = "asyncjobs_changes"  # "node|id:version:s,..." or "node|*" (see the migration)
CANCELS_CHANNEL = "asyncjobs_cancels"  # "id|reason": stop this job if it runs here

_COLUMNS = ", ".join(COLUMN_NAMES)
_INSERT_COLUMNS = ", ".join(COLUMN_NAMES[1:])
_ASSIGN = ", ".join(f"{c} = ${i}" for i, c in enumerate(MUTABLE, start=1))
_NEXT = len(MUTABLE) + 1  # the first placeholder after the mutable values

# The new job's vt is rules.virtual_start written in SQL (one round trip, not two): one past its owner's last
# queued job ($18 is the owner), no earlier than the floor passed as its vt ($24).
# A waiting job (delayed: rules.first_vt gave it rules.WAITING and more) keeps the vt it is given.
_VT = (f"CASE WHEN $24::bigint >= {rules.WAITING} THEN $24::bigint ELSE GREATEST($24::bigint,"
       " COALESCE((SELECT MAX(q.vt) + 1 FROM jobs q WHERE q.owner = $18 AND q.priority = $5 AND q.status = 'queued'"
       f" AND q.vt < {rules.WAITING}), 0)) END")
INSERT_SQL = (f"INSERT INTO jobs ({_INSERT_COLUMNS}) VALUES"
              f" ({', '.join(_VT if i == 24 else f'${i}' for i in range(1, 27))}) RETURNING seq, vt")
UPDATE_SQL = f"UPDATE jobs SET {_ASSIGN} WHERE id = ${_NEXT} AND version = ${_NEXT + 1}"
# A running job's own reports: only while its lease is held, by this node, by the database's clock (fencing).
# While the job stays running (a progress report), its lease is the database's, renewed by the heartbeat
# since the runner's copy was read: kept as stored. Any other next state takes the job's (none).
_KEEP_LEASE = {c: f"CASE WHEN ${MUTABLE.index('status') + 1} = 'running' THEN jobs.{c} ELSE ${i} END"
               for i, c in enumerate(MUTABLE, start=1) if c in ("lease_owner", "lease_until")}
_FENCED_ASSIGN = ", ".join(f"{c} = {_KEEP_LEASE.get(c, f'${i}')}" for i, c in enumerate(MUTABLE, start=1))
FENCED_UPDATE_SQL = (f"UPDATE jobs SET {_FENCED_ASSIGN} WHERE id = ${_NEXT} AND version = ${_NEXT + 1}"
                     f" AND status = 'running' AND lease_owner = ${_NEXT + 2}"
                     " AND (lease_until IS NULL OR lease_until > extract(epoch FROM clock_timestamp()))")
# The plain inserts of a batch (no key, no equal job to look for, no quota) in one statement.
_INSERT_TYPES = ("text", "text", "bytea", "text", "int", "float8", "float8", "float8", "float8", "float8", "int",
                 "int", "int", "bytea", "bytea", "text", "bytea", "text", "text", "text", "text", "text", "bytea",
                 "bigint", "text", "float8")
INSERTS_SQL = (f"INSERT INTO jobs ({_INSERT_COLUMNS}) SELECT * FROM unnest("
               + ", ".join(f"${i}::{t}[]" for i, t in enumerate(_INSERT_TYPES, start=1))
               + ") RETURNING id, seq")
# Each owner's last queued vt of each priority: one row read from the end of jobs_owner_queued per pair. (MAX(vt)
# ... GROUP BY would aggregate every queued row of each owner: its whole backlog, on every batch of inserts.)
OWNERS_LAST_VT_SQL = ("SELECT o.owner, o.priority, (SELECT q.vt FROM jobs q WHERE q.owner = o.owner"
                      f" AND q.priority = o.priority AND q.status = 'queued' AND q.vt < {rules.WAITING}"
                      " ORDER BY q.vt DESC LIMIT 1)"
                      " FROM unnest($1::text[], $2::int[]) AS o(owner, priority)")
# The reports of a batch (progress and outcomes of running jobs) in one statement: the same rules as
# FENCED_UPDATE_SQL, a row each from the arrays; it returns the ids it wrote. It reads the rows by their ids
# ("jobs.id = ANY(...)" repeats the join's condition for the index). The status a row must still have
# ('running') comes from an array too: written as a constant, it lets the planner read the running-jobs
# index (jobs_lease) instead, which keeps an entry for every job that ran until the next vacuum (4,046
# entries walked for a batch of eight, late in a run). Sequential scans are off on the store's connections
# (see PostgresStore._settings): a plan made while the table was small (a prepared statement's generic plan,
# kept as the table grows) read the whole table for the batch's rows (2 ms a batch at 20,000 jobs kept).
_MUTABLE_TYPES = {"status": "text", "started_at": "float8", "finished_at": "float8", "expires_at": "float8",
                  "run_at": "float8", "attempts": "int", "version": "int", "progress": "bytea", "result": "bytea",
                  "result_type": "text", "error": "bytea", "files": "bytea", "lease_owner": "text",
                  "lease_until": "float8"}
_REPORT_SET = ", ".join(f"{c} = CASE WHEN u.status = 'running' THEN jobs.{c} ELSE u.{c} END"
                        if c in ("lease_owner", "lease_until") else f"{c} = u.{c}" for c in MUTABLE)
_REPORT_ARRAYS = ", ".join(f"${i}::{_MUTABLE_TYPES[c]}[]" for i, c in enumerate(MUTABLE, start=1))
REPORTS_SQL = (f"UPDATE jobs SET {_REPORT_SET}"
               f" FROM unnest({_REPORT_ARRAYS}, ${_NEXT}::text[], ${_NEXT + 1}::int[], ${_NEXT + 2}::text[],"
               f" ${_NEXT + 3}::text[]) AS u({', '.join(MUTABLE)}, id, expected, fence, was)"
               f" WHERE jobs.id = u.id AND jobs.id = ANY(${_NEXT}::text[]) AND jobs.version = u.expected"
               " AND jobs.status = u.was"
               " AND jobs.lease_owner = u.fence"
               " AND (jobs.lease_until IS NULL OR jobs.lease_until > extract(epoch FROM clock_timestamp()))"
               " RETURNING jobs.id")
DB_NOW_SQL = "SELECT extract(epoch FROM clock_timestamp())::float8"
UPDATE_ANY_SQL = f"UPDATE jobs SET {_ASSIGN} WHERE id = ${_NEXT}"
LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"
# A claim reads the queue in the jobs_fair index's order, never by sorting it: without statistics (a new
# table, before autovacuum analyzes it) PostgreSQL reads every queued job by run_at and sorts them, 6 ms a
# claim with 3,000 queued against 0.1. And it starts the claimed jobs by their ids, never by reading the
# table: with the statistics of a smaller table (a growing one between two analyzes) PostgreSQL reads every
# row to find the eight, about 0.5 ms a claim with 3,000 jobs kept and more with each one. Sorting and
# sequential scans are off on every connection of the store (_settings).
_CLAIMABLE = ("FROM jobs WHERE status = 'queued' AND run_at <= $1 AND expires_at > $1 AND task = ANY($2::text[])"
              f" AND vt < {rules.WAITING} ORDER BY priority DESC, vt, seq LIMIT $3 FOR UPDATE SKIP LOCKED")
# Waiting jobs (rules.WAITING) of the given priorities that are due, in the order they fell due (placed before
# claims), locked so that two nodes do not place one; and an owner's last placed vt of a priority.
DUE_WAITING_SQL = ("SELECT id, owner, priority, seq FROM jobs WHERE status = 'queued' AND priority = ANY($1::int[])"
                   f" AND vt >= {rules.WAITING} AND vt <= $2 ORDER BY priority DESC, vt, seq FOR UPDATE SKIP LOCKED")
OWNER_LAST_VT_SQL = ("SELECT MAX(vt) FROM jobs WHERE owner = $1 AND priority = $2 AND status = 'queued'"
                     f" AND vt < {rules.WAITING}")
CLAIM_SQL = f"SELECT {_COLUMNS}, extract(epoch FROM clock_timestamp())::float8 {_CLAIMABLE}"
# One statement for a whole claim (one NOTIFY, one round trip): the started jobs as arrays, read by their ids
# ("jobs.id = ANY($1)" repeats the join's condition for the index).
START_SQL = ("UPDATE jobs SET status = 'running', started_at = u.started_at, attempts = u.attempts,"
             " version = u.version, error = NULL, lease_owner = $4, lease_until = $5, cancel_reason = NULL"
             " FROM unnest($1::text[], $2::float8[], $3::int[], $6::int[]) AS u(id, started_at, version, attempts)"
             " WHERE jobs.id = u.id AND jobs.id = ANY($1::text[])")
# A claim with no capped task among its tasks, in one statement (one round trip, not two): the same rows as
# CLAIM_SQL, started as START_SQL starts them, by the values models.start gives (one more attempt and
# version, started at the node's ``now``, leased from the database's clock read once). The rows come back as
# they were read (in no promised order: the caller puts them in the fair order), and the caller builds the
# started jobs with models.start; test_postgres_store.py checks that the two agree, field by field.
CLAIM_START_SQL = ("WITH clock AS (SELECT extract(epoch FROM clock_timestamp())::float8 AS db_now),"
                   f" picked AS (SELECT {_COLUMNS}, (SELECT db_now FROM clock) AS db_now {_CLAIMABLE}),"
                   " started AS (UPDATE jobs SET status = 'running', started_at = $1,"
                   " attempts = picked.attempts + 1, version = picked.version + 1, error = NULL,"
                   " lease_owner = $4, lease_until = picked.db_now + $5, cancel_reason = NULL"
                   " FROM picked WHERE jobs.id = picked.id)"
                   " SELECT * FROM picked")
RUNNING_BY_TASK_SQL = ("SELECT task, COUNT(*) FROM jobs WHERE status = 'running' AND task = ANY($1::text[])"
                       " GROUP BY task")
# Whether the node holding a job has no session on the database any more (its connections are named
# after it, see _settings): a node killed outright loses them at once, so a node that starts need not
# wait for the lease to take its jobs. (Not used for the periodic rescue: while the database restarts,
# every node is briefly without sessions.)
_OWNER_GONE = ("(lease_owner IS DISTINCT FROM $2 AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a"
               " WHERE a.datname = current_database() AND a.application_name IN"
               " (left('asyncjobs ' || jobs.lease_owner, 63), left('asyncjobs-listen ' || jobs.lease_owner, 63))))")
# At a node's start ($3), a holder without a session is gone only if it took or renewed the lease (its end
# less $4, the lease's seconds) since the database started: it had a session then, and has lost it. Right
# after a database restart, a live node that has not reconnected yet keeps its jobs until their leases end.
_GONE_AT_START = (f"($3::bool AND to_timestamp(lease_until - $4) > pg_postmaster_start_time()"
                  f" AND {_OWNER_GONE})")
# Running jobs whose lease is lost: held by a node that is gone (no end, not us; or at a start, no session
# left) or past its end (anyone's).
RUNNING_SQL = (f"SELECT {_COLUMNS}, cancel_reason, {_GONE_AT_START} AS gone FROM jobs"
               " WHERE status = 'running' AND ((lease_until IS NULL AND lease_owner IS DISTINCT FROM $2)"
               f" OR lease_until <= $1 OR {_GONE_AT_START})"
               " ORDER BY seq LIMIT 1000 FOR UPDATE SKIP LOCKED")
# The listening sessions of other nodes silent (no ping, see cluster.ClusterFeed) for $2 seconds, ended. A
# live listener pings every few seconds, and its only statements are the ping and LISTEN, so its state
# changes at every ping; one in ClientWrite is blocked on a node that stopped reading.
END_SILENT_SQL = ("SELECT application_name, wait_event = 'ClientWrite' AS blocked, pg_terminate_backend(pid) AS ended"
                  " FROM pg_stat_activity"
                  " WHERE datname = current_database() AND application_name LIKE 'asyncjobs-listen %'"
                  " AND application_name <> left('asyncjobs-listen ' || $1, 63) AND pid <> pg_backend_pid()"
                  " AND usename = current_user AND state_change < clock_timestamp() - make_interval(secs => $2)")
RENEW_SQL = ("UPDATE jobs SET lease_until = $3 + $4 WHERE id = ANY($1::text[]) AND status = 'running'"
             " AND lease_owner = $2 AND lease_until > $3 RETURNING id, cancel_reason")
CANCEL_SQL = ("UPDATE jobs SET cancel_reason = $2 WHERE id = $1 AND status = 'running'"
              " AND (cancel_reason IS NULL OR (cancel_reason = 'request' AND $2 = 'delete'))")  # as SQLite's
CLAIM_DELIVERIES_SQL = (
    "UPDATE deliveries SET next_at = $3 WHERE job_id IN (SELECT job_id FROM deliveries WHERE state = 'pending'"
    " AND next_at <= $1 ORDER BY next_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
    " RETURNING job_id, message_id, url, payload, attempts")
EXPIRED_SQL = (f"SELECT {_COLUMNS} FROM jobs WHERE expires_at <= $1 ORDER BY expires_at LIMIT 5000"
               " FOR UPDATE SKIP LOCKED")
# As the SQLite store's (see there).
POSITION_SQL = (
    "SELECT (SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND priority > $1"
    f" AND (vt < {rules.WAITING} OR $4))"
    " + (SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND priority = $1"
    " AND (vt < $2 OR (vt = $2 AND seq < $3)))")
POSITIONS_SQL = ("SELECT id, pos FROM (SELECT id, ROW_NUMBER() OVER (ORDER BY priority DESC, vt, seq) AS pos"
                 f" FROM jobs WHERE status = 'queued' AND vt < {rules.WAITING}) AS q WHERE id = ANY($1::text[])")
BY_PRIORITY_SQL = "SELECT priority, COUNT(*) FROM jobs WHERE status = 'queued' GROUP BY priority"
OWNER_QUEUED_SQL = "SELECT COUNT(*) FROM jobs WHERE owner = $1 AND status = 'queued'"
QUEUED_VTS_SQL = ("SELECT priority, MIN(vt), MAX(vt) FROM jobs WHERE status = 'queued'"
                  f" AND vt < {rules.WAITING} GROUP BY priority")
SAME_KEY_SQL = f"SELECT {_COLUMNS} FROM jobs WHERE owner = $1 AND idempotency_key = $2 AND expires_at > $3"
# An Idempotency-Key first answered by an equal job: the hash it came with, and that job while it lives.
KEY_REUSE_SQL = (f"SELECT k.request_hash, {', '.join(f'j.{c}' for c in COLUMN_NAMES)} FROM idempotency_keys k"
                 " JOIN jobs j ON j.id = k.job_id WHERE k.owner = $1 AND k.key = $2 AND j.expires_at > $3")
KEEP_KEY_SQL = ("INSERT INTO idempotency_keys (owner, key, request_hash, job_id) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (owner, key) DO UPDATE SET request_hash = EXCLUDED.request_hash,"
                " job_id = EXCLUDED.job_id")
FORGET_KEYS_SQL = "DELETE FROM idempotency_keys k WHERE NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.id = k.job_id)"
LIVE_TWIN_SQL = (f"SELECT {_COLUMNS} FROM jobs WHERE owner = $1 AND task = $2 AND unique_key = $3"
                 " AND status IN ('queued', 'running') AND expires_at > $4 ORDER BY seq DESC LIMIT 1")
DONE_TWIN_SQL = (f"SELECT {_COLUMNS} FROM jobs WHERE owner = $1 AND task = $2 AND unique_key = $3"
                 " AND status = 'succeeded' AND finished_at >= $4 AND expires_at > $5 ORDER BY seq DESC LIMIT 1")
NEXT_RUN_SQL = "SELECT MIN(run_at) FROM jobs WHERE status = 'queued' AND run_at > $1"
DELIVERY_SQL = ("INSERT INTO deliveries (job_id, message_id, url, payload, next_at) VALUES ($1, $2, $3, $4, $5)"
                " ON CONFLICT (job_id) DO NOTHING")
TOMBSTONE_SQL = ("INSERT INTO tombstones (id, owner, gone_until) VALUES ($1, $2, $3)"
                 " ON CONFLICT (id) DO UPDATE SET owner = EXCLUDED.owner, gone_until = EXCLUDED.gone_until")

# What a connection that failed, or a database that refused, raises; all become StoreError.
_DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, TimeoutError)
# Of those, what a database that is away raises (not there, starting or stopping, cut off, full up): it may
# answer later, where a refusal (a wrong password, a missing database) stays until someone changes something.
_AWAY_ERRORS: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError, asyncpg.CrashShutdownError, asyncpg.TooManyConnectionsError)



def _store_error(message: str, exc: BaseException) -> StoreError:
    return StoreUnreachable(message) if isinstance(exc, _AWAY_ERRORS) else StoreError(message)


def _insert_values(job: Job) -> tuple[Any, ...]:
    return (
        job.id, job.task, job.params, job.status.value, job.priority, job.created_at,
        job.started_at, job.finished_at, job.expires_at, job.run_at, job.attempts,
        job.max_attempts, job.version, encoded(job.progress), job.result, job.result_type,
        encoded(job.error), job.owner, job.idempotency_key, job.request_hash, job.unique_key,
        job.callback_url, encoded(job.files), job.vt, job.lease_owner, job.lease_until,
    )


def _matchable(args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """A read's arguments without what no stored text can equal: PostgreSQL text holds no NUL character,
    so a value with one (an id or filter a client sent) matches nothing. None: nothing can match at all;
    a list loses just those items."""
    out = []
    for arg in args:
        if isinstance(arg, str) and "\x00" in arg:
            return None
        if isinstance(arg, list):
            arg = [a for a in arg if not (isinstance(a, str) and "\x00" in a)]
        out.append(arg)
    return tuple(out)


def _rowcount(status: str) -> int:
    """The row count of a command tag such as ``UPDATE 1`` or ``INSERT 0 1``."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except ValueError:
        return 0


def lock_key(kind: str, *parts: str) -> str:
    """The text hashed into an advisory lock: the kind, then each part length-prefixed (so no two
    different tuples make the same text)."""
    return kind + "".join(f"|{len(p)}:{p}" for p in parts)


async def _schedule_delivery(db: asyncpg.Connection, job: Job, payload: Payload) -> None:
    if job.callback_url:
        await db.execute(DELIVERY_SQL, job.id, f"msg_{job.id}_{job.version}", job.callback_url, payload(job),
                         job.finished_at or 0.0)


WriteOp = Callable[[asyncpg.Connection], Awaitable[Any]]  # runs inside a transaction


@dataclass(frozen=True)
class _Report:
    """A running job's report (progress or outcome) fenced by its node's lease: the reports of one batch
    are written by one statement (REPORTS_SQL), before its other writes."""

    job: Job
    expected_version: int
    fence: str


@dataclass(frozen=True)
class _Insert:
    """A new job that needs no check but its vt (no idempotency key, no equal job to look for, no quota, the
    queue not full): the plain inserts of one batch are written by one statement, first in the batch."""

    job: Job
    vt_floor: int


async def _write_inserts(db: asyncpg.Connection, inserts: list[_Insert]) -> dict[str, Inserted]:
    """Store ``inserts`` with their vt (``rules.virtual_start``, in the batch's order per owner)."""
    pairs = sorted({(i.job.owner, i.job.priority) for i in inserts})
    rows = await db.fetch(OWNERS_LAST_VT_SQL, [o for o, _ in pairs], [p for _, p in pairs])
    last: dict[tuple[str, int], int | None] = {(owner, priority): vt for owner, priority, vt in rows}
    jobs = []
    for item in inserts:
        key = (item.job.owner, item.job.priority)
        vt = rules.first_vt(item.job, owner_last=last.get(key), floor=item.vt_floor)
        if vt < rules.WAITING:
            last[key] = vt
        jobs.append(evolve(item.job, vt=vt))
    columns = [list(values) for values in zip(*(_insert_values(j) for j in jobs), strict=True)]
    seqs = dict(await db.fetch(INSERTS_SQL, *columns))
    return {j.id: Inserted(evolve(j, seq=seqs[j.id])) for j in jobs}


async def _write_reports(db: asyncpg.Connection, reports: list[_Report]) -> set[str]:
    """Apply ``reports``; the ids of the jobs written (a report whose lease or version is gone writes nothing)."""
    if len(reports) == 1 or len({r.job.id for r in reports}) < len(reports):
        done = set()
        for r in reports:
            status = await db.execute(FENCED_UPDATE_SQL, *mutable_values(r.job), r.job.id, r.expected_version,
                                      r.fence)
            if _rowcount(status) == 1:
                done.add(r.job.id)
        return done
    columns = [list(values) for values in zip(*(mutable_values(r.job) for r in reports), strict=True)]
    rows = await db.fetch(REPORTS_SQL, *columns, [r.job.id for r in reports],
                          [r.expected_version for r in reports], [r.fence for r in reports],
                          [Status.RUNNING.value] * len(reports))
    return {row[0] for row in rows}


async def _keep_session(db: asyncpg.Connection) -> None:
    """A pooled connection goes back as it is. asyncpg's default reset (advisory locks, cursors, LISTEN,
    session settings: a round trip on every release, so on every batch and every read) has nothing to undo:
    the store takes only transaction-level locks, sets its session settings once when it connects
    (_settings), never later, and listens on a connection of its own. (An open transaction is still rolled
    back on release, by asyncpg.)"""


class PostgresStore:
    """The shared store: one PostgreSQL database, reached through a pool of asyncpg connections."""

    shared = True  # many nodes share it: leases expire, and changes are announced to the other nodes

    def __init__(self, url: str, *, node: str = "", min_size: int = 0, max_size: int = 10,
                 connect_timeout: float = 10.0, command_timeout: float | None = 60.0, writers: int = 4,
                 max_batch: int = 256, idle_in_transaction_s: float | None = None) -> None:
        self.url = url
        # A session idle inside a transaction this long is ended by the database (None: never): a node
        # frozen mid-transaction (stopped, paused, cut off with its connection open) would otherwise hold
        # that transaction's locks, a claim's lock of a capped task or the rows it wrote, until it woke,
        # and every other node's claims and rescues would wait for it or pass its jobs over.
        self.idle_in_transaction_s = idle_in_transaction_s
        self.node = node  # named in every change this store's connections announce (asyncjobs.node)
        # min_size 0: connections are made when needed and kept while used; with a floor, asyncpg would
        # log a traceback for every failed attempt to restore it while the database is away.
        self.min_size = min_size
        self.max_size = max_size
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None
        if writers < 1:
            raise ValueError("a PostgreSQL store needs at least one writer task")
        self._writers = writers  # group-commit writer tasks
        self.max_batch = max_batch
        self._pending: asyncio.Queue[tuple[WriteOp | _Report | _Insert, asyncio.Future[Any], Kept | None]] = \
            asyncio.Queue()
        self._writer_tasks: list[asyncio.Task[None]] = []
        self.commits = 0  # transactions committed, for tests and metrics
        self.on_commit: Callable[[float, int], None] | None = None  # told (seconds, writes) after each commit

    # -- lifecycle -------------------------------------------------------
    async def open(self) -> None:
        """Connect and bring the schema up to date. StoreUnreachable: the database is away and may be back
        later; StoreError: it refused (or the URL is wrong), which lasts."""
        try:
            pool = await asyncpg.create_pool(
                self.url, min_size=self.min_size, max_size=self.max_size, timeout=self.connect_timeout,
                command_timeout=self.command_timeout, server_settings=self._settings(), reset=_keep_session)
        except _DB_ERRORS as exc:
            raise _store_error(f"store.url: cannot connect to PostgreSQL: {exc}", exc) from exc
        except ValueError as exc:  # a malformed URL
            raise StoreError(f"store.url: {exc}") from exc
        try:
            async with pool.acquire() as db, db.transaction():
                await self._migrate(db)
        except BaseException as exc:
            await pool.close()
            if isinstance(exc, _DB_ERRORS):
                raise _store_error(f"store.url: cannot migrate the PostgreSQL schema: {exc}", exc) from exc
            raise
        self._pool = pool
        self._writer_tasks = [asyncio.create_task(self._writer(pool), name=f"asyncjobs-pg-writer-{i}")
                              for i in range(self._writers)]

    def _settings(self, role: str = "asyncjobs") -> dict[str, str]:
        """Session settings of every connection: the node, named in the changes it announces (and in
        ``pg_stat_activity``, with the connection's role); and no sequential scans and no sorts. Every
        statement of the store has an index to read (by id, or a partial index of the queued or running
        jobs) and one in the order it asks for, and the planner would otherwise read the whole table, or
        sort the whole queue, where its statistics, or a prepared statement's generic plan, date from when
        the table was small (CLAIM_SQL, START_SQL, REPORTS_SQL). Off, not forbidden: a statement with no
        index to use still scans or sorts. As session settings they cost no round trip per transaction."""
        settings = {"asyncjobs.node": self.node, "application_name": f"{role} {self.node}"[:63],
                    "enable_seqscan": "off", "enable_sort": "off"}
        if self.idle_in_transaction_s is not None:
            settings["idle_in_transaction_session_timeout"] = str(max(1, round(self.idle_in_transaction_s * 1000)))
        return settings

    async def _migrate(self, db: asyncpg.Connection) -> None:
        # Every node that starts takes this lock first: one migrates, the others then find it done.
        await db.execute(LOCK_SQL, MIGRATE_LOCK)
        await db.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA_TABLE} (version INTEGER NOT NULL)")
        current = await db.fetchval(f"SELECT version FROM {SCHEMA_TABLE}")
        if current is None:
            await db.execute(f"INSERT INTO {SCHEMA_TABLE} (version) VALUES (0)")
            current = 0
        if current > len(MIGRATIONS):
            raise StoreError(
                f"store.url: schema version {current} is newer than this asyncjobs knows"
                f" ({len(MIGRATIONS)}); upgrade asyncjobs")
        for version in range(current, len(MIGRATIONS)):
            await db.execute(MIGRATIONS[version])
            await db.execute(f"UPDATE {SCHEMA_TABLE} SET version = $1", version + 1)
            log.info("store schema migrated to version %d", version + 1)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            deadline = time.monotonic() + CLOSE_TIMEOUT  # writes queued commit first, within a bound
            while not self._pending.empty() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            for task in self._writer_tasks:
                task.cancel()
            for task in self._writer_tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self._writer_tasks = []
            while not self._pending.empty():
                _, fut, kept = self._pending.get_nowait()
                settle_write(fut, kept, error=StoreError("the store is closed"))
            try:  # writes under way finish first (they are shielded), within a bound
                await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT)
            except Exception:  # the database is gone, or a connection hangs
                pool.terminate()

    def _require_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError("the store is closed")
        return self._pool

    # -- transactions ----------------------------------------------------
    async def _write(self, op: WriteOp | _Report | _Insert, *, outlasting: bool = False) -> Any:
        """Run ``op`` in a transaction; it has committed when this returns.

        Group commit: ``writers`` writer tasks each take every write waiting (up to ``max_batch``) and run
        them in one transaction on one pooled connection, so under load one commit carries many inserts,
        claims, outcomes and heartbeats (a claim may start jobs inserted in its own batch: they are
        durable together). A batch that fails is run again one write at a time, so one bad write spoils
        only itself. As with SQLite, a write once queued commits even if the caller is cancelled and stops
        waiting (only the answer is dropped; with ``outlasting`` the caller gets it all the same).
        """
        self._require_pool()
        return await enqueue_write(self._pending, op, outlasting=outlasting)

    async def _writer(self, pool: asyncpg.Pool) -> None:
        while True:
            batch = [await self._pending.get()]
            while len(batch) < self.max_batch and not self._pending.empty():
                batch.append(self._pending.get_nowait())
            try:
                await self._run_batch(pool, batch)
            except asyncio.CancelledError:
                for _, fut, kept in batch:
                    settle_write(fut, kept, error=StoreError("the store is closed"))
                raise

    async def _run_batch(self, pool: asyncpg.Pool,
                         batch: list[tuple[WriteOp | _Report | _Insert, asyncio.Future[Any], Kept | None]]) -> None:
        try:
            results = await self._transaction(pool, [op for op, _, _ in batch])
        except Exception as exc:
            if len(batch) > 1 and not isinstance(exc, StoreError | OSError):  # one write spoiled the batch
                for item in batch:
                    await self._run_batch(pool, [item])
                return
            for _, fut, kept in batch:
                settle_write(fut, kept, error=exc)
            return
        for (_, fut, kept), result in zip(batch, results, strict=True):
            settle_write(fut, kept, result=result)

    async def _transaction(self, pool: asyncpg.Pool, ops: list[WriteOp | _Report | _Insert]) -> list[Any]:
        started = time.perf_counter()
        try:
            async with pool.acquire() as db, db.transaction():
                inserts = [op for op in ops if isinstance(op, _Insert)]
                inserted = await _write_inserts(db, inserts) if inserts else {}
                reports = [op for op in ops if isinstance(op, _Report)]
                written = await _write_reports(db, reports) if reports else set()
                results = [inserted[op.job.id] if isinstance(op, _Insert)
                           else op.job.id in written if isinstance(op, _Report)
                           else await op(db) for op in ops]
        except _DB_ERRORS as exc:
            if len(ops) > 1 and isinstance(exc, asyncpg.PostgresError):
                raise  # the database refused one write of a batch: each is tried alone
            log.error("store write failed: %s", exc)
            raise _store_error(f"store write failed: {exc}", exc) from exc
        self.commits += 1
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - started, len(ops))
        return results

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        pool = self._require_pool()
        clean = _matchable(args)
        if clean is None:
            return []
        try:
            return list(await pool.fetch(sql, *clean))
        except _DB_ERRORS as exc:
            raise _store_error(f"store read failed: {exc}", exc) from exc

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        pool = self._require_pool()
        clean = _matchable(args)
        if clean is None:
            return None
        try:
            return await pool.fetchval(sql, *clean)
        except _DB_ERRORS as exc:
            raise _store_error(f"store read failed: {exc}", exc) from exc

    # -- writes ----------------------------------------------------------
    async def insert(self, job: Job, *, admit: bool = True, reuse_s: float | None = None, fresh: bool = False,
                     vt_floor: int = 0, max_queued_for_owner: int = 0) -> Inserted:
        """Store a new job, unless an equal one answers it (see ``SQLiteStore.insert``).

        One transaction; racing submits with the same idempotency key, or equal unique jobs, or (with a
        quota) of the same owner, are serialized by advisory locks taken in that order.
        """

        texts = {"task": job.task, "owner": job.owner, "Idempotency-Key": job.idempotency_key,
                 "callback_url": job.callback_url}
        for name, text in texts.items():
            if text is not None and "\x00" in text:
                raise InvalidRequest(f"{name} contains a NUL character, which cannot be stored",
                                     errors=[{"field": name, "message": "contains a NUL character"}])
        if admit and job.idempotency_key is None and (job.unique_key is None or fresh) and not max_queued_for_owner:
            # Joins the batch's one statement of inserts; a submit cancelled meanwhile still learns what it stored.
            return await self._write(_Insert(job, vt_floor), outlasting=True)

        async def op(db: asyncpg.Connection) -> Inserted:
            if job.idempotency_key is not None:
                await db.execute(LOCK_SQL, lock_key("idempotency", job.owner, job.idempotency_key))
            check_equal = job.unique_key is not None and not fresh
            if check_equal:
                assert job.unique_key is not None
                await db.execute(LOCK_SQL, lock_key("unique", job.owner, job.task, job.unique_key))
            if max_queued_for_owner:
                await db.execute(LOCK_SQL, lock_key("owner", job.owner))
            if job.idempotency_key is not None:
                row = await db.fetchrow(SAME_KEY_SQL, job.owner, job.idempotency_key, job.created_at)
                if row is not None:
                    same = row_to_job(row)
                    return Inserted(same, rules.Dedupe.IDEMPOTENCY, key_hash=same.request_hash)
                row = await db.fetchrow(KEY_REUSE_SQL, job.owner, job.idempotency_key, job.created_at)
                if row is not None:
                    return Inserted(row_to_job(tuple(row)[1:]), rules.Dedupe.KEY_REUSE, key_hash=row[0])
            equal = await self._equal_job(db, job, reuse_s) if check_equal else None
            owner_queued = await db.fetchval(OWNER_QUEUED_SQL, job.owner) \
                if max_queued_for_owner and equal is None else None
            decided = rules.dedupe(same_key=None, equal=equal, admit=admit, owner_queued=owner_queued,
                                   max_queued_for_owner=max_queued_for_owner)
            if decided is not None:
                if decided[0] is rules.Dedupe.REUSE and job.idempotency_key is not None and equal is not None:
                    await db.execute(KEEP_KEY_SQL, job.owner, job.idempotency_key, job.request_hash, equal.id)
                return Inserted(decided[1] or job, decided[0])
            if job.idempotency_key is not None:  # an expired job's key is free again
                await db.execute("UPDATE jobs SET idempotency_key = NULL WHERE owner = $1 AND idempotency_key = $2",
                                 job.owner, job.idempotency_key)
                await db.execute("DELETE FROM idempotency_keys WHERE owner = $1 AND key = $2",
                                 job.owner, job.idempotency_key)
            first = rules.waiting_vt(job.run_at) if rules.waits(job) else vt_floor
            seq, vt = await db.fetchrow(INSERT_SQL, *_insert_values(evolve(job, vt=first)))
            return Inserted(evolve(job, seq=seq, vt=vt))

        return await self._write(op)

    @staticmethod
    async def _equal_job(db: asyncpg.Connection, job: Job, reuse_s: float | None) -> Job | None:
        """The newest job equal to ``job`` that may answer it: live, or succeeded within ``reuse_s`` seconds."""
        key = (job.owner, job.task, job.unique_key)
        rows = [await db.fetchrow(LIVE_TWIN_SQL, *key, job.created_at)]
        if reuse_s:
            rows.append(await db.fetchrow(DONE_TWIN_SQL, *key, job.created_at - reuse_s, job.created_at))
        found = [row_to_job(r) for r in rows if r is not None]
        return max(found, key=lambda j: j.seq) if found else None

    async def update(self, job: Job, *, expected_version: int, deliver: Payload | None = None,
                     fence: str | None = None) -> bool:
        """Write the job's mutable fields if the stored version is still ``expected_version``.

        With ``deliver``, a callback of this state to ``job.callback_url`` is scheduled in the same transaction.
        With ``fence`` (a node), the stored job must also be running under that node's lease, unexpired by
        the database's clock: a report from a node whose lease ended is discarded.
        """

        if fence is not None and deliver is None:  # a report: joins the batch's one statement of reports
            return bool(await self._write(_Report(job, expected_version, fence)))

        async def op(db: asyncpg.Connection) -> bool:
            if fence is None:
                status = await db.execute(UPDATE_SQL, *mutable_values(job), job.id, expected_version)
            else:
                status = await db.execute(FENCED_UPDATE_SQL, *mutable_values(job), job.id, expected_version, fence)
            done = _rowcount(status) == 1
            if done and deliver is not None:
                await _schedule_delivery(db, job, deliver)
            return done

        return await self._write(op)

    async def delete(self, job_id: str) -> bool:
        async def op(db: asyncpg.Connection) -> bool:
            deleted = _rowcount(await db.execute("DELETE FROM jobs WHERE id = $1", job_id))
            await db.execute("DELETE FROM tombstones WHERE id = $1", job_id)
            return deleted == 1

        return await self._write(op)

    async def claim(self, *, now: float, limit: int, tasks: dict[str, int | None], node: str = "",
                    lease_s: float | None = None) -> list[Job]:
        """Move up to ``limit`` due queued jobs to running, best first, leased to ``node`` for ``lease_s``
        seconds of the database's clock (None: for as long as the node lives).

        ``tasks`` maps each runnable task to its concurrency (None: no cap), which holds across all nodes:
        the capped tasks' running jobs are counted under a lock per task, so two nodes cannot both take
        the last place. The candidates are locked ``FOR UPDATE SKIP LOCKED``: a job another node is
        claiming is passed over, and neither waits for the other.
        """
        open_tasks = [t for t, cap in tasks.items() if cap is None or cap > 0]
        if limit <= 0 or not open_tasks:
            return []
        capped = sorted(t for t in open_tasks if tasks[t] is not None)

        async def op(db: asyncpg.Connection) -> list[Job]:
            room = dict(tasks)
            if capped:
                for task in capped:  # in one order on every node: no deadlock
                    await db.execute(LOCK_SQL, lock_key("concurrency", task))
                running = dict(await db.fetch(RUNNING_BY_TASK_SQL, capped))
                room.update({t: max(0, (tasks[t] or 0) - running.get(t, 0)) for t in capped})
            if not capped:  # every row read starts: read and started by one statement, which returns them unordered
                rows = sorted(await db.fetch(CLAIM_START_SQL, now, open_tasks, limit, node, lease_s),
                              key=lambda r: (-r["priority"], r["vt"], r["seq"]))  # _CLAIMABLE's order
                return self._started(rows, room, limit, now, node, lease_s)
            claimed: list[Job] = []
            while runnable := rules.runnable(open_tasks, room):
                want = limit - len(claimed)
                # Candidates beyond those wanted, as a capped task may have to be passed over (each one read is
                # locked until the commit, so other nodes skip it meanwhile); the chosen ones started below.
                rows = await db.fetch(CLAIM_SQL, now, runnable, want * 4)
                picked = self._started(rows, room, want, now, node, lease_s)
                if picked:
                    await db.execute(START_SQL, [j.id for j in picked], [j.started_at for j in picked],
                                     [j.version for j in picked], node, picked[0].lease_until,
                                     [j.attempts for j in picked])
                claimed += picked
                if rules.claim_done(read=len(rows), page=want * 4, picked=len(picked), wanted=want):
                    break
                room = rules.room_after(room, picked)
            return claimed

        return await self._write(op)

    @staticmethod
    def _started(rows: list[asyncpg.Record], room: dict[str, int | None], limit: int, now: float, node: str,
                 lease_s: float | None) -> list[Job]:
        """The jobs of claimed ``rows`` (each ending with the database's clock) that start, as started."""
        if not rows:
            return []
        db_now = rows[0][-1]  # the database's clock, read with the rows
        return rules.pick_claimable((row_to_job(tuple(r)[:-1]) for r in rows), room, limit, now, node=node,
                                    lease_until=None if lease_s is None else db_now + lease_s)

    async def recover(self, *, now: float, retention_s: float, payload: Payload, node: str = "",
                      at_start: bool = False, lease_s: float = 30.0) -> list[Job]:
        """Running jobs whose lease is lost (``rules.lease_lost``, by the database's clock) go back to the
        queue, or fail as interrupted past their attempts: any node rescues any node's jobs, at its start
        and then periodically. ``at_start``: also the jobs of nodes that have no session on the database
        any more (killed: a restart finds their jobs at once, as with SQLite), if they held the lease since
        the database started (``lease_s``: its length). Rows another node is recovering are skipped.
        Returns their new states."""

        async def op(db: asyncpg.Connection) -> list[Job]:
            db_now = await db.fetchval(DB_NOW_SQL)  # leases end by the database's clock, never a node's
            rows = [(row_to_job(tuple(r)[:-2]), r["cancel_reason"], r["gone"])
                    for r in await db.fetch(RUNNING_SQL, db_now, node, at_start, float(lease_s))]
            lost = [(j, reason) for j, reason, gone in rows
                    if rules.lease_lost(j, db_now, node=node, owner_gone=gone)]
            recovered = []
            for job, reason in lost:
                new = rules.recover_one(job, now, retention_s=retention_s,
                                        canceled=None if reason is None else CancelReason(reason))
                if new.status is not Status.QUEUED:
                    await _schedule_delivery(db, new, payload)
                await db.execute(UPDATE_ANY_SQL, *mutable_values(new), new.id)
                recovered.append(new)
            return recovered

        return await self._write(op)

    async def sweep(self, *, now: float, retention_s: float, tombstone_retention_s: float,
                    payload: Payload) -> SweepResult:
        """Expire what is past ``expires_at`` into tombstones, and forget old tombstones, deliveries and
        sessions. The expired rows are locked ``FOR UPDATE SKIP LOCKED``: two nodes never sweep the same rows.

        A queued job past its time is canceled in place, and tombstoned by the next sweep: the update tells
        the waiters of other nodes (the change feed announces updates, and they read the canceled row),
        where a deletion would leave them waiting. Meanwhile it answers 410 like a tombstone (``is_expired``).
        """

        async def op(db: asyncpg.Connection) -> SweepResult:
            expired = [row_to_job(r) for r in await db.fetch(EXPIRED_SQL, now)]
            running = [j.id for j in expired if j.status is Status.RUNNING]
            outcomes = [(j, rules.expired_outcome(j, now)) for j in expired]
            canceled = [new for j, new in outcomes if new is not None and j.status is Status.QUEUED]
            gone = [j for j, new in outcomes if new is not None and j.status is not Status.QUEUED]
            if canceled:
                await db.executemany(UPDATE_ANY_SQL, [(*mutable_values(new), new.id) for new in canceled])
            for new in canceled:
                await _schedule_delivery(db, new, payload)
            if gone:
                await db.executemany(TOMBSTONE_SQL, [(j.id, j.owner, now + tombstone_retention_s) for j in gone])
                await db.execute("DELETE FROM jobs WHERE id = ANY($1::text[])", [j.id for j in gone])
            deleted = await db.fetch(DELETED_ENDED_SQL + " FOR UPDATE OF j SKIP LOCKED")
            if deleted:
                await db.execute("DELETE FROM jobs WHERE id = ANY($1::text[])", [r[0] for r in deleted])
            await db.execute(FORGET_DELETES_SQL)
            await db.execute("DELETE FROM deliveries WHERE state != 'pending' AND next_at <= $1",
                             now - tombstone_retention_s)
            await db.execute("DELETE FROM sessions WHERE expires_at <= $1", now)
            await db.execute(FORGET_KEYS_SQL)
            await db.execute("DELETE FROM rate_buckets WHERE full_at <= extract(epoch FROM clock_timestamp())")
            forgotten = _rowcount(await db.execute("DELETE FROM tombstones WHERE gone_until <= $1", now))
            return SweepResult(
                expired_queued=canceled,
                expired_running=running,
                tombstoned=len(gone),
                forgotten=forgotten,
                with_files=[j.id for j in gone if j.files is not None] + [r[0] for r in deleted if r[1]],
                deleted=len(deleted),
            )

        return await self._write(op)

    async def renew(self, job_ids: list[str], *, node: str, lease_s: float) -> dict[str, str | None]:
        """Extend ``node``'s leases of ``job_ids`` by ``lease_s`` from the database's clock now. Returns the
        jobs still held, each with the cancel asked of it (None: none); a job missing from the answer is no
        longer this node's (its lease ended, or it was rescued) and must stop."""
        if not job_ids:
            return {}

        async def op(db: asyncpg.Connection) -> dict[str, str | None]:
            db_now = await db.fetchval(DB_NOW_SQL)
            return dict(await db.fetch(RENEW_SQL, job_ids, node, db_now, lease_s))

        return await self._write(op)

    async def rate_bucket(self, owner: str, cost: float, rate: float, burst: int) -> tuple[float, float]:
        """Apply ``limits.spend`` to ``owner``'s token bucket (refilled by the database's clock) in one
        transaction, the row locked: (tokens after, seconds to wait). A bucket not stored is full."""

        async def op(db: asyncpg.Connection) -> tuple[float, float]:
            db_now = await db.fetchval(DB_NOW_SQL)
            row = await db.fetchrow("SELECT tokens, at FROM rate_buckets WHERE owner = $1 FOR UPDATE", owner)
            if row is None:  # a first submit: racing ones meet at the row (the loser's insert does nothing)
                await db.execute("INSERT INTO rate_buckets (owner, tokens, at, full_at) VALUES ($1, $2, $3, $3)"
                                 " ON CONFLICT (owner) DO NOTHING", owner, float(burst), db_now)
                row = await db.fetchrow("SELECT tokens, at FROM rate_buckets WHERE owner = $1 FOR UPDATE", owner)
            tokens = limits.refill(row["tokens"], row["at"], db_now, rate=rate, burst=burst)
            tokens, wait_s = limits.spend(tokens, cost, rate=rate, burst=burst)
            await db.execute("UPDATE rate_buckets SET tokens = $2, at = $3, full_at = $4 WHERE owner = $1", owner,
                             tokens, db_now, db_now + (burst - tokens) / rate)
            return tokens, wait_s

        return await self._write(op)

    async def others_alive(self, node: str) -> bool:
        """Whether another node has a session on this database now (its connections are named after it)."""
        return bool(await self._fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
            " AND (application_name LIKE 'asyncjobs %' OR application_name LIKE 'asyncjobs-listen %')"
            " AND application_name NOT IN (left('asyncjobs ' || $1, 63), left('asyncjobs-listen ' || $1, 63)))",
            node))

    async def request_cancel(self, job_id: str, reason: str) -> bool:
        """Ask the node that runs ``job_id`` to stop it: recorded on the row (its heartbeat reads it) and
        announced at once. False when the job is not running, or a cancel is recorded already (a delete
        still replaces a client's cancel)."""

        async def op(db: asyncpg.Connection) -> bool:
            done = _rowcount(await db.execute(CANCEL_SQL, job_id, reason)) == 1
            if done and reason == CancelReason.DELETE.value:
                await db.execute("INSERT INTO deletes (job_id) VALUES ($1) ON CONFLICT DO NOTHING", job_id)
            if done:
                await db.execute("SELECT pg_notify($1, $2)", CANCELS_CHANNEL, f"{job_id}|{reason}")
            return done

        return await self._write(op)

    async def create_session(self, session_id: str, *, principal: str, csrf: str, expires_at: float) -> None:
        """A browser session (its id is what the signed cookie names; the CSRF token goes in its pages)."""

        async def op(db: asyncpg.Connection) -> None:
            await db.execute("INSERT INTO sessions (id, principal, csrf, expires_at) VALUES ($1, $2, $3, $4)",
                             session_id, principal, csrf, expires_at)

        await self._write(op)

    async def delete_session(self, session_id: str) -> None:
        async def op(db: asyncpg.Connection) -> None:
            await db.execute("DELETE FROM sessions WHERE id = $1", session_id)

        await self._write(op)

    async def delivery_attempted(self, job_id: str, *, ok: bool, next_at: float | None, error: str | None) -> None:
        """Record a callback attempt: delivered, to be retried at ``next_at``, or given up (None)."""
        state = "delivered" if ok else ("pending" if next_at is not None else "failed")

        async def op(db: asyncpg.Connection) -> None:
            # A finished delivery's next_at is when it finished, so the sweep can age it out.
            await db.execute(
                "UPDATE deliveries SET attempts = attempts + 1, state = $1, next_at = $2, last_error = $3"
                " WHERE job_id = $4", state, next_at if next_at is not None else time.time(), error, job_id)

        await self._write(op)

    # -- reads -----------------------------------------------------------
    async def session(self, session_id: str, *, now: float) -> tuple[str, str] | None:
        """(principal, csrf token) of a live session, or None."""
        rows = await self._fetch("SELECT principal, csrf FROM sessions WHERE id = $1 AND expires_at > $2",
                                 session_id, now)
        return (rows[0][0], rows[0][1]) if rows else None

    async def place_due(self, *, now: float, floors: dict[int, int]) -> list[tuple[int, int, int]]:
        """As SQLiteStore.place_due; the rows are locked, so nodes placing at once place each job once."""
        if not floors:
            return []

        async def op(db: asyncpg.Connection) -> list[tuple[int, int, int]]:
            placed = []
            for job_id, owner, priority, seq in await db.fetch(DUE_WAITING_SQL, list(floors), rules.waiting_vt(now)):
                last = await db.fetchval(OWNER_LAST_VT_SQL, owner, priority)
                vt = rules.virtual_start(owner_last=last, floor=floors[priority])
                await db.execute("UPDATE jobs SET vt = $2 WHERE id = $1", job_id, vt)
                placed.append((priority, vt, seq))
            return placed

        return await self._write(op)

    async def count_waiting(self, priorities: Iterable[int]) -> dict[int, int]:
        """Queued jobs of each of ``priorities`` still waiting to be due (``rules.WAITING``); none left out."""
        rows = await self._fetch("SELECT priority, COUNT(*) FROM jobs WHERE status = 'queued'"
                                 f" AND priority = ANY($1::int[]) AND vt >= {rules.WAITING} GROUP BY priority",
                                 list(priorities))
        return {priority: n for priority, n in rows}

    async def next_queued(self, owner: str, *, now: float) -> Job | None:
        """The queued job of ``owner`` that runs first: of those due at ``now``, the first in dispatch order;
        with none due, the one due soonest."""
        rows = await self._fetch(f"SELECT {_COLUMNS} FROM jobs WHERE owner = $1 AND status = 'queued'"
                                 " ORDER BY GREATEST(run_at, $2), priority DESC, vt, seq LIMIT 1", owner, now)
        return row_to_job(rows[0]) if rows else None

    async def queued_vts(self) -> dict[int, tuple[int, int]]:
        """The lowest and highest ``vt`` queued, per priority (the virtual time to resume from)."""
        return {priority: (low, high) for priority, low, high in await self._fetch(QUEUED_VTS_SQL)}

    async def lookup(self, job_id: str) -> Lookup:
        rows = await self._fetch(f"SELECT {_COLUMNS} FROM jobs WHERE id = $1", job_id)
        if rows:
            job = row_to_job(rows[0])
            return Lookup(job=job, owner=job.owner)
        rows = await self._fetch("SELECT owner FROM tombstones WHERE id = $1", job_id)
        if rows:
            return Lookup(gone=True, owner=rows[0][0])
        return Lookup()

    async def list_jobs(self, *, status: str | None, task: str | None, owner: str | None,
                        before_seq: int | None, limit: int) -> list[Job]:
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("status", status), ("task", task), ("owner", owner), ("seq", before_seq)):
            if value is not None:
                params.append(value)
                where.append(f"{column} {'<' if column == 'seq' else '='} ${len(params)}")
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        params.append(limit)
        rows = await self._fetch(f"SELECT {_COLUMNS} FROM jobs {clause} ORDER BY seq DESC LIMIT ${len(params)}",
                                 *params)
        return [row_to_job(r) for r in rows]

    async def queue_position(self, job: Job) -> int:
        """1 for the next job to run (see ``rules.is_waiting``)."""
        return (await self._fetchval(POSITION_SQL, job.priority, job.vt, job.seq,
                                     rules.is_waiting(job))) + 1

    async def queue_positions(self, jobs: list[Job]) -> dict[str, int]:
        """As the SQLite store's."""
        if not jobs:
            return {}
        placed = [j.id for j in jobs if not rules.is_waiting(j)]
        rows = await self._fetch(POSITIONS_SQL, placed) if placed else []
        positions = {job_id: pos for job_id, pos in rows}
        for job in jobs:
            if rules.is_waiting(job):
                positions[job.id] = await self.queue_position(job)
        return positions

    async def count_queued(self) -> int:
        return await self._fetchval("SELECT COUNT(*) FROM jobs WHERE status = 'queued'")

    async def queued_by_priority(self) -> dict[int, int]:
        rows = await self._fetch(BY_PRIORITY_SQL)
        return {priority: n for priority, n in rows}

    async def next_run_at(self, *, after: float) -> float | None:
        """The earliest run_at after ``after`` among queued jobs (delayed or backed off)."""
        return await self._fetchval(NEXT_RUN_SQL, after)

    async def due_deliveries(self, *, now: float, limit: int, hold_s: float = 60.0,
                             busy: Collection[str] = ()) -> list[Delivery]:
        """Claim up to ``limit`` due callback deliveries for ``hold_s`` seconds: no other node takes them
        meanwhile (``delivery_attempted`` then records the outcome); if this node dies, they are due again
        after the hold. (The ``busy`` ones, in flight here, are held: never due.)"""

        async def op(db: asyncpg.Connection) -> list[asyncpg.Record]:
            return list(await db.fetch(CLAIM_DELIVERIES_SQL, now, limit, now + hold_s))

        rows = await self._write(op)
        return [Delivery(job_id, message_id, url, bytes(payload), attempts)
                for job_id, message_id, url, payload, attempts in rows]

    async def next_delivery_at(self, *, busy: Collection[str] = ()) -> float | None:
        """When the next pending delivery is due (those in flight, ``busy``, are held until after it)."""
        return await self._fetchval("SELECT MIN(next_at) FROM deliveries WHERE state = 'pending'")

    async def file_owners(self, ids: list[str]) -> dict[str, tuple[bool, bool]]:
        """For the ids that are jobs: (terminal, has a file result), so the file store can drop the rest."""
        owners: dict[str, tuple[bool, bool]] = {}
        for at in range(0, len(ids), 5000):
            rows = await self._fetch("SELECT id, status, files FROM jobs WHERE id = ANY($1::text[])",
                                     ids[at:at + 5000])
            owners.update((job_id, file_owner(status, files)) for job_id, status, files in rows)
        return owners

    async def ping(self) -> None:
        """Raise ``StoreError`` unless the database answers now."""
        await self._fetchval("SELECT 1")

    async def jobs(self, job_ids: list[str]) -> list[Job]:
        """The jobs among ``job_ids`` that exist (for the change feed: one read for a batch of changes)."""
        rows = await self._fetch(f"SELECT {_COLUMNS} FROM jobs WHERE id = ANY($1::text[])", job_ids)
        return [row_to_job(r) for r in rows]

    async def listen(self, on_change: Callable[[str], None], on_cancel: Callable[[str], None],
                     on_lost: Callable[[], None]) -> Listening:
        """A connection of its own that listens for changes and cancels from every node (the payloads, as
        the migration and ``request_cancel`` write them). ``on_lost`` is told once if the connection
        breaks."""
        try:
            db = await asyncpg.connect(self.url, timeout=self.connect_timeout,
                                       server_settings=self._settings("asyncjobs-listen"))
            await db.add_listener(CHANGES_CHANNEL, lambda _c, _p, _ch, payload: on_change(payload))
            await db.add_listener(CANCELS_CHANNEL, lambda _c, _p, _ch, payload: on_cancel(payload))
        except _DB_ERRORS as exc:
            raise _store_error(f"cannot listen for changes: {exc}", exc) from exc
        except ValueError as exc:
            raise StoreError(f"store.url: {exc}") from exc
        db.add_termination_listener(lambda _c: on_lost())
        return Listening(db)

    async def counts(self, owner: str | None = None) -> dict[str, int]:
        """Jobs by status: everyone's, or ``owner``'s."""
        if owner is None:
            rows = await self._fetch("SELECT status, COUNT(*) FROM jobs GROUP BY status")
        else:
            rows = await self._fetch("SELECT status, COUNT(*) FROM jobs WHERE owner = $1 GROUP BY status", owner)
        return {s.value: 0 for s in Status} | {status: n for status, n in rows}


class Listening:
    """The listening connection of ``PostgresStore.listen``."""

    def __init__(self, db: asyncpg.Connection) -> None:
        self._db = db

    async def ping(self, timeout_s: float) -> None:
        """Raise ``StoreError`` unless the connection answers within ``timeout_s`` (a cut network is
        otherwise noticed only when TCP gives up)."""
        try:
            await self._db.fetchval("SELECT 1", timeout=timeout_s)
        except _DB_ERRORS as exc:
            raise _store_error(f"the listening connection is lost: {exc}", exc) from exc

    async def end_silent(self, node: str, silent_s: float) -> list[tuple[str, bool]]:
        """End the listening sessions of other nodes that have not pinged for ``silent_s`` (a node frozen or
        cut off with its connection open): each one's name, and whether it was blocked sending to its node.

        A listener that stops reading holds the database's queue of notifications (8 GB) at its place: were
        it left for hours under load, every NOTIFY, and so every write of every node, would fail once the
        queue is full. A node's own role may end its sessions; a node connected as another role is skipped.
        The node, once back, listens again and re-reads."""
        try:
            rows = await self._db.fetch(END_SILENT_SQL, node, silent_s)
        except _DB_ERRORS as exc:
            raise _store_error(f"cannot look for silent listeners: {exc}", exc) from exc
        return [(r["application_name"], bool(r["blocked"])) for r in rows if r["ended"]]

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._db.close(), 2.0)
        except Exception:  # a broken connection is closed by force
            self._db.terminate()
