"""PostgreSQL-only store behaviour: how the statements that run on every batch read the queue.

The store contract both backends pass is in test_store.py; SQLite's own behaviour in test_sqlite_store.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import pytest

from asyncjobs import postgres
from asyncjobs.models import Job, Status, evolve
from asyncjobs.postgres import OWNERS_LAST_VT_SQL, PostgresStore, _Report, _write_reports
from tests.test_store import make_job


def indexes_used(plan: dict[str, Any]) -> set[str]:
    """The indexes the plan's scans read (EXPLAIN)."""
    return ({plan["Index Name"]} if "Index Name" in plan else set()).union(
        *(indexes_used(child) for child in plan.get("Plans", ())))


def node_types(plan: dict[str, Any]) -> set[str]:
    """The kinds of the plan's nodes (EXPLAIN)."""
    return {plan["Node Type"]}.union(*(node_types(child) for child in plan.get("Plans", ())))


def rows_read(plan: dict[str, Any], relation: str) -> float:
    """Rows the plan's scans of ``relation`` returned, over all their loops (EXPLAIN ANALYZE)."""
    own = plan.get("Actual Rows", 0) * plan.get("Actual Loops", 1) if plan.get("Relation Name") == relation else 0
    return own + sum(rows_read(child, relation) for child in plan.get("Plans", ()))


async def test_each_owners_last_vt_is_one_row_however_long_its_backlog(postgres_url):
    """A batch of plain inserts reads each owner's last queued vt of each priority: one index row per pair.
    Aggregating (MAX ... GROUP BY owner) would read every queued job of the owner, on every batch of submits."""
    store = PostgresStore(postgres_url)
    await store.open()
    try:
        await asyncio.gather(*(store.insert(make_job(owner="a")) for _ in range(400)))
    finally:
        await store.close()
    db = await asyncpg.connect(postgres_url)
    try:
        await db.execute("ANALYZE jobs")
        last = await db.fetchval("SELECT MAX(vt) FROM jobs WHERE owner = 'a' AND status = 'queued'")
        found = {(o, p): vt for o, p, vt in await db.fetch(OWNERS_LAST_VT_SQL, ["a", "a", "b"], [0, 1, 0])}
        assert last is not None and found == {("a", 0): last, ("a", 1): None, ("b", 0): None}
        (plan,) = json.loads(await db.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {OWNERS_LAST_VT_SQL}",
                                               ["a", "a", "b"], [0, 1, 0]))
    finally:
        await db.close()
    assert rows_read(plan["Plan"], "jobs") <= 3, plan


async def test_a_batch_of_outcomes_reads_its_jobs_by_id(postgres_url):
    """The outcomes of a batch are one UPDATE over arrays, and it must find its jobs by their ids. Two other
    plans read far more: the running-jobs index (jobs_lease), which keeps an entry for every job that ran
    until the next vacuum, and a sequential scan of the whole table, which a plan made while the table was
    small keeps (a prepared statement's generic plan, reused as the table grows). The plan is the one the
    store's own statement runs with, written by auto_explain to this connection."""
    store = PostgresStore(postgres_url)
    await store.open()
    db = await asyncpg.connect(postgres_url, server_settings=store._settings())  # as the store's own

    async def outcomes(jobs: list[Job]) -> set[str]:
        reports = [_Report(evolve(j, status=Status.SUCCEEDED, finished_at=201.0, version=j.version + 1),
                           j.version, "n") for j in jobs]
        async with db.transaction():
            return await _write_reports(db, reports)

    try:
        await db.execute("ALTER TABLE jobs SET (autovacuum_enabled = false)")  # dead entries stay, no new plans
        for _ in range(8):  # while the table is small, this connection's statement gets its generic plan
            await asyncio.gather(*(store.insert(make_job()) for _ in range(8)))
            await outcomes(await store.claim(now=200.0, limit=8, tasks={"echo": None}, node="n", lease_s=600.0))
        for _ in range(10):  # 2,000 jobs run and finish, in batches of 200 as a busy node's workers would
            await asyncio.gather(*(store.insert(make_job()) for _ in range(200)))
            running = await store.claim(now=200.0, limit=200, tasks={"echo": None}, node="n", lease_s=600.0)
            await asyncio.gather(*(store.update(evolve(j, status=Status.SUCCEEDED, finished_at=201.0,
                                                       version=j.version + 1), expected_version=j.version, fence="n")
                                   for j in running))
        await asyncio.gather(*(store.insert(make_job()) for _ in range(8)))
        running = await store.claim(now=200.0, limit=8, tasks={"echo": None}, node="n", lease_s=600.0)
        assert len(running) == 8
        notices: list[str] = []
        db.add_log_listener(lambda _conn, message: notices.append(message.message))
        await db.execute("LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0;"
                         " SET auto_explain.log_analyze = on; SET auto_explain.log_format = json;"
                         " SET auto_explain.log_level = notice")
        written = await outcomes(running)
        await asyncio.sleep(0.1)  # the notices arrive with the statements' results; let the listener run
    finally:
        await db.close()
        await store.close()
    assert written == {j.id for j in running}
    (plan,) = [json.loads(n.split("plan:", 1)[1]) for n in notices if "UPDATE jobs SET" in n]
    assert "Seq Scan" not in node_types(plan["Plan"]), plan
    assert indexes_used(plan["Plan"]) == {"jobs_id_key"}, plan


async def test_a_connection_goes_back_to_the_pool_without_a_round_trip(postgres_url):
    """Nothing the store does on a pooled connection outlasts its transaction, so releasing one sends
    nothing: asyncpg's default reset query would cost a round trip on every batch of writes and every read."""
    store = PostgresStore(postgres_url, max_size=1)  # one connection: every statement below goes through it
    await store.open()
    sent: list[str] = []
    try:
        async with store._require_pool().acquire() as db:
            db.add_query_logger(lambda query: sent.append(query.query))
        await store.insert(make_job())
        await store.ping()
    finally:
        await store.close()
    assert any(q.startswith("INSERT INTO jobs") for q in sent), sent  # the logger sees the store's statements
    assert not [q for q in sent if "RESET ALL" in q or "UNLISTEN" in q], sent


@pytest.mark.parametrize("statement", ["CLAIM_SQL", "CLAIM_START_SQL"])
async def test_a_claim_reads_the_queue_in_its_fair_order_without_sorting_it(postgres_url, statement):
    """A claim takes the first few queued jobs in the fair order, read from the jobs_fair index (and, when it
    starts them in the same statement, writes them by id). Without statistics (a new table, before
    autovacuum analyzes it) PostgreSQL would read every queued job and sort them, on every claim. The plan
    is made on a connection with the store's own settings."""
    store = PostgresStore(postgres_url)
    await store.open()
    db = await asyncpg.connect(postgres_url, server_settings=store._settings())
    args: tuple[Any, ...] = (200.0, ["echo"], 8) + (("n", 60.0) if statement == "CLAIM_START_SQL" else ())
    try:
        await db.execute("ALTER TABLE jobs SET (autovacuum_enabled = false)")  # no statistics
        await asyncio.gather(*(store.insert(make_job(owner=f"o{i % 7}")) for i in range(3000)))
        sql = getattr(postgres, statement)
        (plan,) = json.loads(await db.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args))
        running = await db.fetchval("SELECT COUNT(*) FROM jobs WHERE status = 'running'")
    finally:
        await db.close()
        await store.close()
    assert running == (8 if statement == "CLAIM_START_SQL" else 0)
    assert "Sort" not in node_types(plan["Plan"]), plan
    assert "Seq Scan" not in node_types(plan["Plan"]), plan
    assert "jobs_fair" in indexes_used(plan["Plan"]), plan
    assert rows_read(plan["Plan"], "jobs") <= 2 * 8, plan


async def test_a_claim_of_uncapped_tasks_is_one_statement_and_returns_what_it_wrote(postgres_url):
    """Where no task is capped, a claim reads and starts its jobs in one statement (one round trip, not
    two). The SQL starts them as models.start does: the jobs the claim returns are the stored rows."""
    store = PostgresStore(postgres_url, max_size=1)  # one connection: every statement below goes through it
    await store.open()
    sent: list[str] = []
    try:
        await asyncio.gather(*(store.insert(make_job(priority=i % 3, attempts=i % 2)) for i in range(20)))
        async with store._require_pool().acquire() as db:
            db.add_query_logger(lambda query: sent.append(query.query))
        claimed = await store.claim(now=200.0, limit=8, tasks={"echo": None, "noop": None}, node="n",
                                    lease_s=60.0)
        claim_sent = list(sent)
        stored = {j.id: j for j in await store.jobs([j.id for j in claimed])}
    finally:
        await store.close()
    assert [s.split()[0] for s in claim_sent] == ["BEGIN;", "WITH", "COMMIT;"], claim_sent
    assert len(claimed) == 8
    assert [(-j.priority, j.vt, j.seq) for j in claimed] == sorted((-j.priority, j.vt, j.seq) for j in claimed)
    assert [j.priority for j in claimed] == [2] * 6 + [1] * 2  # the best first: all six of priority 2
    for job in claimed:
        assert job.status is Status.RUNNING and job.lease_owner == "n" and job.lease_until is not None
        assert stored[job.id] == job, (stored[job.id], job)
