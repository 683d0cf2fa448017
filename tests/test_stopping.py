"""Where a handler's stop and its outcome meet: timeouts of sync handlers, cancels that race the outcome,
handlers that end on their own during a shutdown, claims in flight when the server stops, and handlers that
call ``sys.exit``. Real servers, a real SQLite file (or PostgreSQL under --store postgres)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from typing import Any

import aiohttp
import asyncpg

from tests import sample_tasks
from tests.conftest import config_text, eventually, postgres_row, submit, wait_status
from tests.test_files import form

MODULES = ["asyncjobs.builtin", "tests.sample_tasks"]
TERMINAL = {"succeeded", "failed", "canceled"}


async def start(make_client, **sections: dict[str, Any]):
    queue = {"shutdown_grace": 0.5, **sections.pop("queue", {})}
    return await make_client(queue=queue, tasks={"modules": MODULES}, **sections)


async def test_a_sync_jobs_timeout_runs_from_its_start_not_from_its_wait_for_a_thread(make_client):
    """A timed-out sync handler that ignores its cancel keeps its thread; the next sync job is not failed for
    the time it might wait behind it, and its handler never runs after the job has ended."""
    client, _ = await start(make_client, queue={"workers": 1})
    a = await submit(client, "nap", {"tag": f"A{id(client)}", "seconds": 2.0})
    await wait_status(client, a["id"], "running")
    b = await submit(client, "nap", {"tag": f"B{id(client)}", "seconds": 0.05})
    assert (await wait_status(client, a["id"], TERMINAL))["error"]["type"] == "timeout"
    done = await wait_status(client, b["id"], TERMINAL)
    assert done["status"] == "succeeded", done["error"]
    ran = [tag for tag, _, _ in sample_tasks.runs if tag.endswith(str(id(client)))]
    assert ran == [f"B{id(client)}"]  # A still sleeps in its abandoned thread


async def test_a_cancel_accepted_while_the_outcome_is_stored_stands(make_client):
    """The handler has returned and its file result is being stored (a slow disk) when the cancel comes:
    the cancel is accepted and the job ends canceled, never 200 with a succeeded job."""
    client, app = await start(make_client)
    storing = threading.Event()
    store_result = app.queue.files.store_result

    def slow_store_result(*args: Any, **kwargs: Any) -> Any:
        storing.set()
        time.sleep(1.0)
        return store_result(*args, **kwargs)

    app.queue.files.store_result = slow_store_result  # type: ignore[method-assign]
    job = await submit(client, "big_blob", {"size": 300_000})
    await eventually(storing.is_set, "the result to be being stored")
    resp = await client.post(f"/jobs/{job['id']}/cancel")
    body = await resp.json(content_type=None)
    final = await wait_status(client, job["id"], TERMINAL)
    assert (resp.status, body["status"], final["status"]) == (200, "canceled", "canceled"), (resp.status, body)
    assert (await client.get(f"/jobs/{job['id']}/result")).status == 409


async def test_a_handler_that_returns_during_the_shutdown_keeps_its_result(make_client, app_factory):
    """Past the grace the handler is asked to stop but returns normally on its own: its result is stored, and
    a task without retries is not run again at the next start."""
    client, app = await start(make_client, queue={"workers": 1, "shutdown_grace": 0.3})
    tag = f"W{id(client)}"
    job = await submit(client, "work", {"tag": tag, "seconds": 1.0})
    await wait_status(client, job["id"], "running")
    await app.stop()
    again = app_factory(tasks={"modules": MODULES})
    await again.start()
    try:
        done = await again.queue.wait(job["id"], timeout_s=5, until=lambda j: j.terminal)
        assert done.status.value == "succeeded" and done.attempts == 1
        await asyncio.sleep(0.3)
        assert [t for t, _, _ in sample_tasks.runs].count(tag) == 1
    finally:
        await again.stop()


async def test_a_claim_in_flight_when_the_server_stops_is_handed_back(make_client, app_factory):
    """The dispatcher's claim commits even as the server stops; its job, which never ran, is queued again with
    its attempt refunded, and runs at the next start (not failed as interrupted)."""
    client, app = await start(make_client, queue={"workers": 1})
    claiming = asyncio.Event()
    claim = app.store.claim

    async def watched_claim(**kwargs: Any) -> Any:  # the real claim; the test only learns that it began
        claiming.set()
        return await claim(**kwargs)

    blocker = await submit(client, "block", {"seconds": 0.5})
    await wait_status(client, blocker["id"], "running")
    job = await submit(client, "echo", {"n": 1})  # no retries: an interrupted run would fail it
    app.store.claim = watched_claim  # type: ignore[method-assign]
    await claiming.wait()
    await app.stop()
    again = app_factory(tasks={"modules": MODULES})
    await again.start()
    try:
        done = await again.queue.wait(job["id"], timeout_s=5, until=lambda j: j.terminal)
        assert done.status.value == "succeeded" and done.attempts == 1, done.error
    finally:
        await again.stop()


async def test_a_handler_that_calls_sys_exit_fails_its_job_and_the_server_goes_on(server_factory, http):
    server = server_factory(config_text=config_text(tasks={"modules": MODULES}, queue={"shutdown_grace": 0.5}))
    async with http.post(f"{server.url}/jobs", json={"task": "exits", "params": {"code": 3}}) as resp:
        assert resp.status == 202
        job = await resp.json()
    async with http.get(f"{server.url}/jobs/{job['id']}?wait=10") as resp:
        done = await resp.json()
    assert server.proc.poll() is None, server.log()
    assert done["status"] == "failed" and done["error"] == {"type": "exception", "message": "SystemExit: 3"}
    async with http.post(f"{server.url}/jobs", json={"task": "noop"}, headers={"Prefer": "wait=10"}) as resp:
        assert resp.status == 201


def _queued_in_store(app) -> int:
    if app.config.store.url:
        return postgres_row(app.config.store.url, "SELECT COUNT(*) FROM jobs WHERE status = 'queued'")[0]
    with contextlib.closing(sqlite3.connect(app.config.store.path)) as db:
        return db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]


@contextlib.asynccontextmanager
async def _writes_held(app):
    """Another connection holds off the store's writes (SQLite's write lock; PostgreSQL's lock on jobs)."""
    if app.config.store.url:
        db = await asyncpg.connect(app.config.store.url)
        try:
            async with db.transaction():
                await db.execute("LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE")
                yield
        finally:
            await db.close()
        return
    other = sqlite3.connect(app.config.store.path, isolation_level=None, timeout=10)
    try:
        other.execute("BEGIN IMMEDIATE")
        yield
        other.execute("COMMIT")
    finally:
        other.close()


async def test_a_submit_whose_client_leaves_during_the_commit_is_stored_whole(make_client):
    """The client gives up while its job's insert waits for the store: the insert, already queued, commits,
    and the submit still does its part. The queue's count of queued jobs stays right (the next submit past
    ``max_queued`` is 503), and the job keeps its uploaded file and runs with it."""
    client, app = await start(make_client, queue={"workers": 1, "max_queued": 1})
    blocker = await submit(client, "block", {"seconds": 30})  # the one worker is busy: the submit stays queued
    await wait_status(client, blocker["id"], "running")
    data = b"kept" * 1000
    async with _writes_held(app):
        with contextlib.suppress(asyncio.TimeoutError):
            await client.post("/jobs", data=form({"task": "digest"}, {"file": (data, "kept.bin")}),
                              timeout=aiohttp.ClientTimeout(total=0.5))
        await asyncio.sleep(0.2)
    await eventually(lambda: _queued_in_store(app) == 1, "the abandoned submit to be committed")
    assert app.queue.queued == 1
    refused = await client.post("/jobs", json={"task": "noop"})
    assert refused.status == 503, await refused.text()
    listed = (await (await client.get("/jobs?task=digest")).json())["jobs"]
    assert len(listed) == 1
    assert app.files.input_path(listed[0]["id"], "file").read_bytes() == data
    await client.post(f"/jobs/{blocker['id']}/cancel")
    done = await wait_status(client, listed[0]["id"], TERMINAL)
    assert done["status"] == "succeeded" and done["result"]["size"] == len(data), done["error"]
