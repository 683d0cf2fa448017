"""PostgreSQL-only store behaviour: how the statements that run on every batch read the queue.

The store contract both backends pass is in test_store.py; SQLite's own behaviour in test_sqlite_store.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg

from asyncjobs.postgres import OWNERS_LAST_VT_SQL, PostgresStore
from tests.test_store import make_job


def rows_read(plan: dict[str, Any], relation: str) -> float:
    """Rows the plan's scans of ``relation`` returned, over all their loops (EXPLAIN ANALYZE)."""
    own = plan.get("Actual Rows", 0) * plan.get("Actual Loops", 1) if plan.get("Relation Name") == relation else 0
    return own + sum(rows_read(child, relation) for child in plan.get("Plans", ()))


async def test_each_owners_last_vt_is_one_row_however_long_its_backlog(postgres_url):
    """A batch of plain inserts reads each owner's last queued vt: one index row per owner. Aggregating
    (MAX ... GROUP BY owner) would read every queued job of the owner, on every batch of submits."""
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
        found = dict(await db.fetch(OWNERS_LAST_VT_SQL, ["a", "b"]))
        assert last is not None and found["a"] == last and found.get("b") is None
        (plan,) = json.loads(await db.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {OWNERS_LAST_VT_SQL}", ["a", "b"]))
    finally:
        await db.close()
    assert rows_read(plan["Plan"], "jobs") <= 2, plan

