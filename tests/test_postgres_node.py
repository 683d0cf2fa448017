"""A node on PostgreSQL (store.url): the HTTP protocol as on SQLite, against a throwaway cluster."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json

import aiohttp
import pytest

from asyncjobs import App
from tests.conftest import TEST_MODULES, config_text, make_config, wait_status


@pytest.fixture
async def pg_client(aiohttp_client, tmp_path, postgres_url):
    """An App whose store is a fresh PostgreSQL database, behind a real test server."""

    async def make(**sections):
        app = App(make_config(tmp_path, store={"url": postgres_url}, queue={"shutdown_grace": 0.2},
                              **sections))
        return await aiohttp_client(app.web), app

    return make


async def test_submit_wait_result_cancel_on_postgres(pg_client):
    """Submit, long poll to the result, cancel a running job, list: answers as on SQLite."""
    client, app = await pg_client()
    resp = await client.post("/jobs", json={"task": "echo", "params": {"x": 1}}, headers={"Prefer": "wait=10"})
    assert resp.status == 201, await resp.text()
    job = await resp.json()
    resp = await client.get(f"/jobs/{job['id']}/result")
    assert resp.status == 200 and await resp.json() == {"x": 1}
    running = await (await client.post("/jobs", json={"task": "block", "params": {"seconds": 30}})).json()
    await wait_status(client, running["id"], "running")
    resp = await client.post(f"/jobs/{running['id']}/cancel")
    assert resp.status == 200 and (await resp.json())["status"] == "canceled"
    listed = (await (await client.get("/jobs")).json())["jobs"]
    assert {j["id"] for j in listed} == {job["id"], running["id"]}
    assert type(app.store).__name__ == "PostgresStore"


async def test_files_reuse_and_quotas_on_postgres(pg_client):
    """A multipart upload and its file result, an equal submit reused (303), a quota's 429."""
    client, _ = await pg_client(tasks={"modules": TEST_MODULES, "echo": {"reuse": 60}},
                                limits={"max_queued_per_principal": 1})
    data = b"postgres" * 10_000
    form = aiohttp.FormData()
    form.add_field("job", json.dumps({"task": "digest"}), content_type="application/json")
    form.add_field("file", io.BytesIO(data), filename="d.bin", content_type="application/octet-stream")
    resp = await client.post("/jobs", data=form)
    assert resp.status == 202, await resp.text()
    done = await wait_status(client, (await resp.json())["id"], "succeeded")
    assert done["result"] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    first = await (await client.post("/jobs", json={"task": "echo", "params": {"k": 1}})).json()
    await wait_status(client, first["id"], "succeeded")
    again = await client.post("/jobs", json={"task": "echo", "params": {"k": 1.0}}, allow_redirects=False)
    assert again.status == 303 and again.headers["Location"] == f"/jobs/{first['id']}"
    await client.post("/jobs", json={"task": "block", "params": {"seconds": 30}, "delay": 60})
    over = await client.post("/jobs", json={"task": "block", "params": {"seconds": 30}, "delay": 60})
    assert over.status == 429 and "Retry-After" in over.headers


async def test_racing_submits_with_one_key_make_one_job_on_postgres(pg_client):
    """50 concurrent submits with one Idempotency-Key: one job, every answer about it."""
    client, _ = await pg_client()
    answers = await asyncio.gather(*(client.post("/jobs", json={"task": "noop"}, headers={"Idempotency-Key": "k"})
                                     for _ in range(50)))
    ids = {(await a.json())["id"] for a in answers}
    assert len(ids) == 1 and {a.status for a in answers} == {202}


async def test_serve_on_postgres_loses_no_acknowledged_job_to_kill_9(server_factory, http, postgres_url):
    """`asyncjobs serve --db postgresql://...`: acknowledged jobs survive kill -9; the restarted node takes
    the dead node's running job back once its lease (1 s here) has ended, and runs it to the end."""
    short_lease = config_text(cluster={"lease": 1, "heartbeat": 0.3})
    server = server_factory("--db", postgres_url, config_text=short_lease)
    assert "store postgresql://" in server.log()
    acked = []
    for i in range(20):
        async with http.post(f"{server.url}/jobs", json={"task": "echo", "params": {"i": i}, "delay": 1}) as resp:
            assert resp.status == 202
            acked.append((await resp.json())["id"])
    async with http.post(f"{server.url}/jobs", json={"task": "hold", "params": {"seconds": 1.5}}) as resp:
        held = (await resp.json())["id"]
    for _ in range(100):
        async with http.get(f"{server.url}/jobs/{held}", allow_redirects=False) as resp:
            if (await resp.json())["status"] == "running":
                break
        await asyncio.sleep(0.05)
    server.kill()
    again = server_factory("--db", postgres_url, config_text=short_lease)
    for job_id in [*acked, held]:
        for _ in range(200):
            async with http.get(f"{again.url}/jobs/{job_id}", allow_redirects=False) as resp:
                body = await resp.json()
            if body["status"] == "succeeded":
                break
            await asyncio.sleep(0.05)
        assert body["status"] == "succeeded", body
