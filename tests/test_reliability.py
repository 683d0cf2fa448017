"""Reliability: idempotency keys, unique tasks, retries and delays, backpressure, kill -9 under load, hostile input."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import random
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from asyncjobs.worker import MAX_BACKOFF_S, backoff_s
from tests.conftest import ROOT, ServerProcess, submit, wait_status, config_text

PROBLEM_TYPE = "application/problem+json"
TERMINAL = {"succeeded", "failed", "canceled"}
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=15)
TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789ab"}
ALICE = {"Authorization": f"Bearer {TOKENS['alice']}"}
BOB = {"Authorization": f"Bearer {TOKENS['bob']}"}


# -- helpers -------------------------------------------------------------------

@dataclass
class Reply:
    status: int
    headers: Any
    content_type: str
    body: Any


@pytest.fixture
def start(make_client):
    """make_client with a short shutdown grace, so a handler left running never delays teardown."""

    async def start_(**sections: dict[str, Any]):
        queue = {"shutdown_grace": 0.5, **sections.pop("queue", {})}
        return await make_client(queue=queue, **sections)

    return start_


def fresh_key() -> str:
    """A key for the sample tasks' per-process attempt counters, unused by any other test."""
    return uuid.uuid4().hex


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def post(client, path: str, body: Any = None, *, key: str | None = None, headers: dict | None = None,
               method: str = "POST") -> Reply:
    """Send a JSON body (without following redirects) and read the whole answer."""
    all_headers = dict(headers or {})
    if key is not None:
        all_headers["Idempotency-Key"] = key
    resp = await client.request(method, path, json=body, headers=all_headers, allow_redirects=False)
    data = await resp.json(content_type=None)
    return Reply(resp.status, resp.headers, resp.content_type, data)


async def get_job(client, job_id: str, headers: dict | None = None) -> Reply:
    resp = await client.get(f"/jobs/{job_id}", params={"redirect": "false"}, headers=headers or {},
                            allow_redirects=False)
    return Reply(resp.status, resp.headers, resp.content_type, await resp.json(content_type=None))


async def poll_job(client, job_id: str, done, *, timeout_s: float = 10.0, what: str = "") -> dict:
    """Poll the monitor until ``done(body)`` holds; fail on a non-200 answer or at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        reply = await get_job(client, job_id)
        assert reply.status == 200, f"job {job_id}: monitor answered {reply.status} {reply.body}"
        if done(reply.body):
            return reply.body
        assert time.monotonic() < deadline, f"job {job_id} never became {what or 'as wanted'}: {reply.body}"
        await asyncio.sleep(0.02)


async def poll_monitor_status(client, job_id: str, code: int, timeout_s: float = 10.0) -> None:
    """Poll the monitor until it answers ``code`` (e.g. 410, then 404 after retention)."""
    deadline = time.monotonic() + timeout_s
    while True:
        resp = await client.get(f"/jobs/{job_id}", allow_redirects=False)
        await resp.read()
        if resp.status == code:
            return
        assert time.monotonic() < deadline, f"job {job_id}: monitor still answers {resp.status}, wanted {code}"
        await asyncio.sleep(0.02)


async def list_jobs(client, query: str = "", headers: dict | None = None) -> list[dict]:
    """Every job GET /jobs shows, following the `next` cursor with limit=500."""
    url = f"/jobs?limit=500{query}"
    jobs: list[dict] = []
    for _ in range(100):
        resp = await client.get(url, headers=headers or {})
        assert resp.status == 200, await resp.text()
        page = await resp.json()
        jobs += page["jobs"]
        if not page["next"]:
            return jobs
        url = page["next"]
    raise AssertionError("GET /jobs had more than 100 pages")


async def stored_jobs(app) -> list:
    """Every job row in the store, whatever its owner or status."""
    return await app.store.list_jobs(status=None, task=None, owner=None, before_seq=None, limit=100_000)


async def cancel_all(client, ids, headers: dict | None = None) -> None:
    for job_id in ids:
        resp = await client.post(f"/jobs/{job_id}/cancel", headers=headers or {})
        await resp.read()
        assert resp.status in (200, 202, 409), resp.status


def assert_problem(reply: Reply, status: int) -> None:
    assert reply.status == status, (reply.status, reply.body)
    assert reply.content_type == PROBLEM_TYPE, reply.content_type
    assert reply.body["status"] == status and reply.body["title"] and reply.body["detail"], reply.body


async def drain(sub) -> list:
    """Everything a hub subscription has buffered so far."""
    seen = []
    while (job := await sub.get(0)) is not None:
        seen.append(job)
    return seen




def session_for(server: ServerProcess) -> aiohttp.ClientSession:
    """A client session whose relative paths go to ``server`` (like the test client's)."""
    return aiohttp.ClientSession(base_url=server.url, timeout=REQUEST_TIMEOUT)


# -- 1. Idempotency-Key ----------------------------------------------------------

async def test_idempotent_replay_answers_like_the_first_time(start):
    """The same Idempotency-Key and body again get the first answer (202, same job), marked replayed, no new job."""
    client, app = await start()
    body = {"task": "block", "params": {"seconds": 30}, "priority": 3}
    first = await post(client, "/jobs", body, key="order-17")
    assert first.status == 202, first.body
    assert "Idempotent-Replayed" not in first.headers
    job_id = first.body["id"]

    again = await post(client, "/jobs", body, key="order-17")
    assert again.status == 202, again.body
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.body["id"] == job_id
    assert again.headers["Location"] == first.headers["Location"] == f"/jobs/{job_id}"
    assert again.headers["Content-Location"] == f"/jobs/{job_id}"
    assert re.fullmatch(r"\d+", again.headers["Retry-After"]) and int(again.headers["Retry-After"]) >= 1

    # The same JSON with its members in another order is the same request.
    reordered = b'{"priority": 3, "params": {"seconds": 30}, "task": "block"}'
    resp = await client.post("/jobs", data=reordered, allow_redirects=False,
                             headers={"Idempotency-Key": "order-17", "Content-Type": "application/json"})
    assert resp.status == 202 and (await resp.json())["id"] == job_id
    assert resp.headers.get("Idempotent-Replayed") == "true"

    assert [j["id"] for j in await list_jobs(client)] == [job_id]
    assert [j.id for j in await stored_jobs(app)] == [job_id]
    await cancel_all(client, [job_id])


async def test_same_key_with_another_body_is_422_and_stores_nothing(start):
    """The same Idempotency-Key with another body is a 422 problem, stores nothing, and the first body still replays."""
    client, app = await start()
    body = {"task": "block", "params": {"seconds": 30}}
    first = await post(client, "/jobs", body, key="k-422")
    assert first.status == 202
    await wait_status(client, first.body["id"], "running")  # from here on the job stays as it is
    for other in ({"task": "block", "params": {"seconds": 31}},
                  {"task": "block", "params": {"seconds": 30}, "priority": 1},
                  {"task": "block", "params": {"seconds": 30}, "delay": 5},
                  {"task": "echo", "params": {"seconds": 30}}):
        reply = await post(client, "/jobs", other, key="k-422")
        assert_problem(reply, 422)
        assert "Idempotent-Replayed" not in reply.headers
        # About the job the key names (it exists): its status, and its ETag.
        named = await get_job(client, first.body["id"])
        assert reply.body["job_status"] == named.body["status"] and reply.headers["ETag"] == named.headers["ETag"]
    again = await post(client, "/jobs", body, key="k-422")
    assert again.status == 202 and again.body["id"] == first.body["id"]
    assert [j.id for j in await stored_jobs(app)] == [first.body["id"]]
    await cancel_all(client, [first.body["id"]])


async def test_idempotency_key_on_task_routes(start):
    """On a task's own route an Idempotency-Key replays the same body and path, and is a 422 for another."""
    client, app = await start()
    first = await post(client, "/thumbnails", {"url": "http://img/a.png"}, key="thumb-1")
    assert first.status == 202, first.body
    again = await post(client, "/thumbnails", {"url": "http://img/a.png"}, key="thumb-1")
    assert again.status == 202 and again.body["id"] == first.body["id"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert_problem(await post(client, "/thumbnails", {"url": "http://img/b.png"}, key="thumb-1"), 422)

    deleted = await post(client, "/items/abc", None, key="del-1", method="DELETE")
    assert deleted.status == 202, deleted.body
    replay = await post(client, "/items/abc", None, key="del-1", method="DELETE")
    assert replay.status == 202 and replay.body["id"] == deleted.body["id"]
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert_problem(await post(client, "/items/xyz", None, key="del-1", method="DELETE"), 422)
    assert len(await stored_jobs(app)) == 2


async def test_200_concurrent_submits_with_one_key_make_one_job(start):
    """200 concurrent submits with one Idempotency-Key create exactly one job, and every answer names it."""
    client, app = await start()
    body = {"task": "block", "params": {"seconds": 30}}
    replies = await asyncio.gather(*(post(client, "/jobs", body, key="same-key") for _ in range(200)))
    assert {r.status for r in replies} == {202}, {r.status for r in replies}
    ids = {r.body["id"] for r in replies}
    assert len(ids) == 1, ids
    fresh = [r for r in replies if "Idempotent-Replayed" not in r.headers]
    assert len(fresh) == 1, f"{len(fresh)} answers were not marked as replays"
    assert all(r.headers.get("Idempotent-Replayed") == "true" for r in replies if r is not fresh[0])
    job_id = ids.pop()
    assert [j["id"] for j in await list_jobs(client)] == [job_id]
    assert [j.id for j in await stored_jobs(app)] == [job_id]
    assert await app.store.count_queued() <= 1
    await cancel_all(client, [job_id])


async def test_idempotency_keys_are_scoped_per_principal(start):
    """Alice and Bob using the same Idempotency-Key (with equal or different bodies) get their own jobs."""
    client, app = await start(auth={"tokens": TOKENS})
    body = {"task": "block", "params": {"seconds": 30}}
    alice = await post(client, "/jobs", body, key="shared", headers=ALICE)
    bob = await post(client, "/jobs", body, key="shared", headers=BOB)
    assert alice.status == bob.status == 202
    assert alice.body["id"] != bob.body["id"]
    assert "Idempotent-Replayed" not in bob.headers

    bob_again = await post(client, "/jobs", body, key="shared", headers=BOB)
    alice_again = await post(client, "/jobs", body, key="shared", headers=ALICE)
    assert bob_again.body["id"] == bob.body["id"] and bob_again.headers.get("Idempotent-Replayed") == "true"
    assert alice_again.body["id"] == alice.body["id"] and alice_again.headers.get("Idempotent-Replayed") == "true"

    # A different body under a key another principal used is no conflict.
    a2 = await post(client, "/jobs", body, key="second", headers=ALICE)
    b2 = await post(client, "/jobs", {"task": "block", "params": {"seconds": 29}}, key="second", headers=BOB)
    assert a2.status == b2.status == 202 and a2.body["id"] != b2.body["id"]

    assert {j["id"] for j in await list_jobs(client, headers=ALICE)} == {alice.body["id"], a2.body["id"]}
    assert {j["id"] for j in await list_jobs(client, headers=BOB)} == {bob.body["id"], b2.body["id"]}
    assert len(await stored_jobs(app)) == 4
    await cancel_all(client, [alice.body["id"], a2.body["id"]], ALICE)
    await cancel_all(client, [bob.body["id"], b2.body["id"]], BOB)


async def test_idempotency_key_expires_with_its_job(start):
    """Once the job of a key has outlived its retention and tombstone, the same key creates a new job."""
    client, app = await start(jobs={"retention": 0.3, "tombstone_retention": 0.3})
    body = {"task": "noop", "params": {}}
    first = await post(client, "/jobs", body, key="short-lived")
    assert first.status == 202
    await wait_status(client, first.body["id"], "succeeded")
    await poll_monitor_status(client, first.body["id"], 404)
    again = await post(client, "/jobs", body, key="short-lived")
    assert again.status == 202, again.body
    assert again.body["id"] != first.body["id"]
    assert "Idempotent-Replayed" not in again.headers


async def test_idempotency_key_expires_as_soon_as_the_retention_ends(app_factory, aiohttp_client):
    """Once its job's retention ran out (the monitor answers 410) a key is not replayed, even before the sweep ran."""
    app = app_factory(jobs={"retention": 0.3, "tombstone_retention": 60}, queue={"shutdown_grace": 0.5})
    app.workers.sweep_interval_s = 3600  # keep the expired job in the store: only the retention decides
    client = await aiohttp_client(app.web)
    body = {"task": "noop", "params": {}}
    first = await post(client, "/jobs", body, key="retained")
    assert first.status == 202
    await wait_status(client, first.body["id"], "succeeded")
    await poll_monitor_status(client, first.body["id"], 410)
    again = await post(client, "/jobs", body, key="retained")
    assert again.status == 202, again.body
    assert again.body["id"] != first.body["id"], "the key was replayed to a job whose retention had ended (410)"
    assert "Idempotent-Replayed" not in again.headers


@pytest.mark.parametrize("value", ["k" * 300, "k" * 256, ""])
async def test_malformed_idempotency_key_is_400(start, value):
    """An Idempotency-Key that is empty or longer than 255 characters is a 400 problem, and nothing is stored."""
    client, app = await start()
    reply = await post(client, "/jobs", {"task": "noop"}, key=value)
    assert_problem(reply, 400)
    assert await stored_jobs(app) == []
    ok = await post(client, "/jobs", {"task": "noop"}, key="k" * 255)
    assert ok.status == 202, ok.body


# -- 2. unique tasks -------------------------------------------------------------

async def test_unique_task_answers_303_to_the_live_job(start):
    """A unique task with equal params gets 303 to the live job; other params, or after it finished, a new 202."""
    client, app = await start()
    key = fresh_key()
    first = await submit(client, "dedupe", {"key": key, "seconds": 1.0})
    dup = await post(client, "/jobs", {"task": "dedupe", "params": {"seconds": 1.0, "key": key}})
    assert dup.status == 303, dup.body
    assert dup.headers["Location"] == f"/jobs/{first['id']}"
    assert dup.body["id"] == first["id"]
    assert dup.body["status"] in ("queued", "running")

    other = await submit(client, "dedupe", {"key": fresh_key(), "seconds": 1.0})
    assert other["id"] != first["id"]

    await wait_status(client, first["id"], "succeeded")
    later = await post(client, "/jobs", {"task": "dedupe", "params": {"key": key, "seconds": 1.0}})
    assert later.status == 202, later.body
    assert later.body["id"] not in (first["id"], other["id"])
    assert len(await stored_jobs(app)) == 3
    await cancel_all(client, [other["id"], later.body["id"]])


async def test_200_racing_submits_of_a_unique_task_make_one_job(start):
    """200 racing submits of a unique task with equal params create one job: one 202, and 199 answers of 303 to it."""
    client, app = await start()
    body = {"task": "dedupe", "params": {"key": fresh_key(), "seconds": 30}}
    replies = await asyncio.gather(*(post(client, "/jobs", body) for _ in range(200)))
    statuses = [r.status for r in replies]
    assert statuses.count(202) == 1 and statuses.count(303) == 199, sorted(set(statuses))
    job_id = next(r.body["id"] for r in replies if r.status == 202)
    assert {r.headers["Location"] for r in replies if r.status == 303} == {f"/jobs/{job_id}"}
    assert [j["id"] for j in await list_jobs(client, "&task=dedupe")] == [job_id]
    assert [j.id for j in await stored_jobs(app)] == [job_id]
    await cancel_all(client, [job_id])


# -- 3. retries and delays -------------------------------------------------------------

def test_backoff_doubles_from_the_retry_delay_with_a_quarter_of_jitter_and_a_cap():
    """The wait before attempt n + 1 is retry_delay * 2^(n-1), jittered by +-25%, at most an hour."""
    spec: Any = SimpleNamespace(retry_delay=0.5)
    for attempts, base in ((1, 0.5), (2, 1.0), (3, 2.0), (6, 16.0)):
        waits = [backoff_s(spec, attempts) for _ in range(500)]
        assert all(base * 0.75 <= w <= base * 1.25 for w in waits), (attempts, min(waits), max(waits))
        assert max(waits) - min(waits) > base * 0.3, "no jitter"
    assert backoff_s(spec, 40) == MAX_BACKOFF_S


async def test_retries_back_off_exponentially_with_jitter(start):
    """A failing task is retried with visible attempts and run_at, after backoffs that double and are jittered."""
    client, app = await start(tasks={"flaky": {"retry_delay": 0.5}})
    sub = app.hub.subscribe(everything=True, maxsize=100_000)
    ids = [(await submit(client, "flaky", {"key": fresh_key(), "fail_times": 2}))["id"] for _ in range(6)]

    backing_off = await poll_job(client, ids[0], lambda b: b["status"] == "queued" and b["attempts"] >= 1,
                                 what="queued again after a failure")
    seen_at = time.time()
    assert backing_off["run_at"] is not None and parse_time(backing_off["run_at"]) > seen_at - 0.05, backing_off
    assert parse_time(backing_off["run_at"]) - seen_at < 2.0, backing_off

    for job_id in ids:
        done = await wait_status(client, job_id, TERMINAL, timeout_s=15)
        assert done["status"] == "succeeded" and done["attempts"] == 3 and done["result"] == {"attempt": 3}, done
        assert done["run_at"] is None and done["error"] is None, done

    states = await drain(sub)
    sub.close()
    first_backoffs = []
    for job_id in ids:
        mine = [j for j in states if j.id == job_id]
        started = {j.attempts: j.started_at for j in mine if j.status == "running"}
        retry_at = {j.attempts: j.run_at for j in mine if j.status == "queued" and j.attempts > 0}
        assert sorted(started) == [1, 2, 3] and sorted(retry_at) == [1, 2], [(j.status, j.attempts) for j in mine]
        # From the attempt's start, so each includes the attempt itself and its outcome's bookkeeping: on a busy
        # 2-core machine that took 0.29 s once. The exact policy is test_backoff_doubles_... below.
        first, second = retry_at[1] - started[1], retry_at[2] - started[2]
        assert 0.5 * 0.75 - 0.01 <= first <= 0.5 * 1.25 + 1.0, first
        assert 1.0 * 0.75 - 0.01 <= second <= 1.0 * 1.25 + 1.0, second
        assert started[2] >= retry_at[1] and started[3] >= retry_at[2], "an attempt started before its run_at"
        first_backoffs.append(first)
    assert max(first_backoffs) - min(first_backoffs) > 0.02, f"no jitter: {first_backoffs}"


async def test_handler_asked_retry_waits_the_delay_and_succeeds(start):
    """A handler raising Retry(delay_s=0.5) is run again no earlier than 0.5 s later, and succeeds on attempt 2."""
    client, app = await start()
    job = await submit(client, "ask_retry", {"key": fresh_key(), "delay_s": 0.5, "times": 1})
    waiting = await poll_job(client, job["id"], lambda b: b["status"] != "running" and b["attempts"] >= 1,
                             what="back in the queue")
    if waiting["status"] == "queued":
        assert waiting["attempts"] == 1, waiting
        assert parse_time(waiting["run_at"]) - parse_time(waiting["created_at"]) >= 0.5 - 0.002, waiting
    done = await wait_status(client, job["id"], TERMINAL)
    assert done["status"] == "succeeded" and done["attempts"] == 2 and done["result"] == 2, done
    assert parse_time(done["started_at"]) - parse_time(done["created_at"]) >= 0.5 - 0.002, done


async def test_retry_without_attempts_left_fails(start):
    """A handler that keeps asking for a retry fails after 1 + retries attempts (3 for ask_retry)."""
    client, app = await start()
    job = await submit(client, "ask_retry", {"key": fresh_key(), "delay_s": 0.05, "times": 5})
    done = await wait_status(client, job["id"], TERMINAL)
    assert done["status"] == "failed" and done["attempts"] == 3, done
    assert done["error"]["type"] == "exception" and "not yet" in done["error"]["message"], done


async def test_delay_runs_a_job_no_earlier_than_asked(start):
    """A submit with delay 0.6 is queued with run_at 0.6 s after created_at and starts no earlier."""
    client, app = await start()
    job = await submit(client, "echo", {"n": 1}, delay=0.6)
    assert job["status"] == "queued" and job["run_at"] is not None, job
    assert abs(parse_time(job["run_at"]) - parse_time(job["created_at"]) - 0.6) < 0.01, job
    done = await wait_status(client, job["id"], TERMINAL)
    assert done["status"] == "succeeded" and done["result"] == {"n": 1}, done
    assert parse_time(done["started_at"]) >= parse_time(job["run_at"]) - 0.002, done


async def test_a_job_due_while_every_worker_is_busy_does_not_spin_the_dispatcher(start):
    """A delayed job falls due while the only worker runs a long job: the dispatcher waits for the worker
    (it takes almost no CPU meanwhile), and starts the job at once when the worker frees."""
    client, app = await start(queue={"workers": 1})
    blocker = await submit(client, "block", {"seconds": 30})
    await wait_status(client, blocker["id"], "running")
    job = await submit(client, "echo", {"n": 1}, delay=0.2)
    await asyncio.sleep(0.4)  # due now, no worker free
    cpu = time.process_time()
    await asyncio.sleep(1.0)
    assert time.process_time() - cpu < 0.3, "the dispatcher spun while it could start nothing"
    assert (await client.post(f"/jobs/{blocker['id']}/cancel")).status == 200
    done = await wait_status(client, job["id"], TERMINAL)
    assert done["status"] == "succeeded"
    assert parse_time(done["started_at"]) - parse_time(job["run_at"]) < 3


async def test_a_job_delayed_while_the_next_due_time_is_read_keeps_its_wake_up(start):
    """A job delayed just as the dispatcher reads the next due time from the store starts when due, not up
    to a second late: a read that began before its submit must not hide it. (The store's read is given
    a pause, to hold that window open; it still answers what the store holds.)"""
    client, app = await start(queue={"workers": 2})
    reading = asyncio.Event()
    real_read = app.store.next_run_at

    async def slow_read(*, after: float) -> float | None:
        found = await real_read(after=after)
        if not reading.is_set():
            reading.set()
            await asyncio.sleep(0.2)
        return found

    app.store.next_run_at = slow_read  # type: ignore[method-assign]
    first = await submit(client, "echo", {"n": 1}, delay=0.2)  # its claim makes the dispatcher read
    await asyncio.wait_for(reading.wait(), 10)
    second = await submit(client, "echo", {"n": 2}, delay=0.4)  # due after the read has answered
    done = await wait_status(client, second["id"], TERMINAL)
    late = parse_time(done["started_at"]) - parse_time(second["run_at"])
    assert late < 0.25, f"the job started {late:.2f}s after it was due"
    assert (await wait_status(client, first["id"], TERMINAL))["status"] == "succeeded"


async def test_a_job_that_falls_due_while_a_claim_runs_starts_after_that_claim(start):
    """The submit of a delayed job wakes the dispatcher, whose claim reads the queue before the job is due and
    answers after it (the server's loop is held here for that): the next claim follows at once, not after
    the dispatcher's idle wait of a second."""
    client, _ = await start()
    began = time.time()
    job = await submit(client, "echo", {"n": 1}, delay=0.3)
    time.sleep(max(0.0, began + 0.6 - time.time()))  # the loop is held past the job's run_at
    done = await wait_status(client, job["id"], TERMINAL)
    late = parse_time(done["started_at"]) - (began + 0.6)
    assert late < 0.5, f"the job started {late:.2f}s after the loop was free again"


# -- 4. delayed and backed-off jobs survive restarts -------------------------------------

async def test_delayed_and_backed_off_jobs_survive_kill_9(server_factory, tmp_path):
    """Delayed and backed-off jobs keep status, attempts and run_at across kill -9, then run, not before run_at."""
    db = tmp_path / "delays.db"
    delay_s = 4.0  # room for a kill and a restart before either is due
    server = server_factory(db=db)
    async with session_for(server) as http:
        delayed = await post(http, "/jobs", {"task": "echo", "params": {"n": 7}, "delay": delay_s})
        assert delayed.status == 202
        retried = await post(http, "/jobs", {"task": "ask_retry",
                                             "params": {"key": fresh_key(), "delay_s": delay_s, "times": 1}})
        assert retried.status == 202
        backing_off = await poll_job(http, retried.body["id"],
                                     lambda b: b["status"] == "queued" and b["attempts"] == 1, what="backing off")
        before = {delayed.body["id"]: (await get_job(http, delayed.body["id"])).body,
                  retried.body["id"]: backing_off}
    assert before[delayed.body["id"]]["status"] == "queued" and before[delayed.body["id"]]["attempts"] == 0
    server.kill()

    server = server_factory(db=db)
    async with session_for(server) as http:
        for job_id, old in before.items():
            now = (await get_job(http, job_id)).body
            assert time.time() < parse_time(old["run_at"]), "the restart took longer than the delay"
            assert (now["status"], now["attempts"], now["run_at"]) == ("queued", old["attempts"], old["run_at"]), now
        # Neither runs before its run_at ...
        due = min(parse_time(b["run_at"]) for b in before.values())
        while time.time() < due - 0.3:
            for job_id, old in before.items():
                now = (await get_job(http, job_id)).body
                assert now["status"] == "queued" and now["attempts"] == old["attempts"], now
            await asyncio.sleep(0.1)
        # ... and both run after it.
        done = await poll_job(http, delayed.body["id"], lambda b: b["status"] in TERMINAL, timeout_s=15)
        assert done["status"] == "succeeded" and done["result"] == {"n": 7} and done["attempts"] == 1, done
        assert parse_time(done["started_at"]) >= parse_time(before[delayed.body["id"]]["run_at"]) - 0.002, done
        old = before[retried.body["id"]]
        again = await poll_job(http, retried.body["id"], lambda b: b["attempts"] >= 2 and b["status"] != "running",
                               timeout_s=15, what="run again")
        if again["status"] == "queued":  # this process's attempt counter is new: attempt 2 asked again
            assert again["attempts"] == 2, again
            assert parse_time(again["run_at"]) >= parse_time(old["run_at"]) + delay_s - 0.01, again
            await cancel_all(http, [retried.body["id"]])
        else:
            assert again["status"] == "succeeded", again
            assert parse_time(again["started_at"]) >= parse_time(old["run_at"]) - 0.002, again


async def test_a_delete_accepted_before_a_kill_stands_after_the_restart(server_factory, tmp_path):
    """A delete answered 202 (the sync handler, which ignores its cancel, still runs), then a kill -9: the next
    process neither runs the job again nor keeps it as canceled; it forgets it (404), as the delete promised."""
    db = tmp_path / "deleted.db"
    config = config_text(jobs={"cancel_grace": 0.3})
    server = server_factory(db=db, config_text=config)
    async with session_for(server) as http:
        job = await post(http, "/jobs", {"task": "stubborn", "params": {"seconds": 30}})
        await poll_job(http, job.body["id"], lambda b: b["status"] == "running", what="running")
        deleted = await post(http, f"/jobs/{job.body['id']}", method="DELETE")
        assert deleted.status == 202, deleted  # accepted; the handler is still running
    server.kill()

    server = server_factory(db=db, config_text=config)
    async with session_for(server) as http:
        deadline = time.monotonic() + 15
        while (now := await get_job(http, job.body["id"])).status != 404:
            assert now.status == 200 and now.body["status"] == "canceled", now  # never run again
            assert time.monotonic() < deadline, "the deleted job is still kept after the restart"
            await asyncio.sleep(0.1)


# -- 5. backpressure -----------------------------------------------------------------

async def test_full_queue_answers_503_and_stores_nothing(start):
    """At queue.max_queued a submit gets 503 with Retry-After and stores nothing; after a cancel one is accepted."""
    client, app = await start(queue={"max_queued": 3, "workers": 1})
    running = await submit(client, "block", {"seconds": 60})
    await wait_status(client, running["id"], "running")
    queued = [(await submit(client, "block", {"seconds": 60}))["id"] for _ in range(3)]
    before = [j["id"] for j in await list_jobs(client)]

    for path, body, key in (("/jobs", {"task": "noop"}, None),
                            ("/jobs", {"task": "noop"}, "full-1"),
                            ("/thumbnails", {"url": "http://img/c.png"}, None),
                            ("/jobs", {"task": "dedupe", "params": {"key": fresh_key()}}, None)):
        reply = await post(client, path, body, key=key)
        assert_problem(reply, 503)
        assert re.fullmatch(r"\d+", reply.headers.get("Retry-After", "")), reply.headers
        assert int(reply.headers["Retry-After"]) >= 1
    assert [j["id"] for j in await list_jobs(client)] == before
    assert await app.store.count_queued() == 3
    assert len(await stored_jobs(app)) == 4

    await cancel_all(client, queued[:1])
    accepted = await post(client, "/jobs", {"task": "noop"}, key="full-1")  # the refused key left nothing behind
    assert accepted.status == 202, accepted.body
    assert "Idempotent-Replayed" not in accepted.headers
    assert_problem(await post(client, "/jobs", {"task": "noop"}), 503)  # full again
    await cancel_all(client, [accepted.body["id"], *queued[1:], running["id"]])
    assert (await post(client, "/jobs", {"task": "noop"})).status == 202


async def test_full_queue_still_replays_keys_and_redirects_unique_submits(start):
    """A full queue refuses only new jobs: a key's replay still gets its first answer, a unique duplicate its 303."""
    client, app = await start(queue={"max_queued": 2, "workers": 1})
    running = await submit(client, "block", {"seconds": 60})
    await wait_status(client, running["id"], "running")
    keyed_body = {"task": "block", "params": {"seconds": 60}}
    unique_body = {"task": "dedupe", "params": {"key": fresh_key(), "seconds": 60}}
    keyed = await post(client, "/jobs", keyed_body, key="before-full")
    unique = await post(client, "/jobs", unique_body)
    assert keyed.status == unique.status == 202
    assert_problem(await post(client, "/jobs", {"task": "noop"}), 503)

    replay = await post(client, "/jobs", keyed_body, key="before-full")
    dup = await post(client, "/jobs", unique_body)
    assert (replay.status, replay.body.get("id")) == (202, keyed.body["id"]), replay.body
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert (dup.status, dup.headers.get("Location")) == (303, f"/jobs/{unique.body['id']}"), dup.body
    assert len(await stored_jobs(app)) == 3
    await cancel_all(client, [running["id"], keyed.body["id"], unique.body["id"]])


# -- 6. kill -9 under load ------------------------------------------------------------

async def test_kill_9_under_load_loses_no_acknowledged_job(server_factory, tmp_path):
    """SIGKILLed while 16 clients submit short sleeps, the restarted server has every 202'd job, once, and ends them."""
    db = tmp_path / "load.db"
    server = server_factory("--workers", "4", db=db)
    accepted: dict[str, float] = {}  # id -> seconds
    refused: list[str] = []
    unknown = 0  # submits cut off by the kill: they may or may not be stored
    finished_loops = 0
    rng = random.Random(20261123)
    target = 300
    enough = asyncio.Event()

    async def client_loop(http: aiohttp.ClientSession) -> None:
        nonlocal unknown, finished_loops
        for _ in range(120):
            seconds = round(rng.uniform(0.01, 0.2), 3)
            try:
                async with http.post("/jobs", json={"task": "sleep", "params": {"seconds": seconds, "steps": 2}},
                                     timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    body = await resp.json(content_type=None)
                    if resp.status == 202:
                        accepted[body["id"]] = seconds
                    else:
                        refused.append(f"{resp.status} {body}")
            except aiohttp.ClientConnectorError:
                return  # never reached the server
            except (aiohttp.ClientError, asyncio.TimeoutError):
                unknown += 1
                return
            if len(accepted) >= target:
                enough.set()
        finished_loops += 1

    async with session_for(server) as http:
        loops = [asyncio.create_task(client_loop(http)) for _ in range(16)]
        await asyncio.wait_for(enough.wait(), 40)
        resp = await http.get("/jobs?status=queued&limit=1")
        assert (await resp.json())["jobs"], "nothing was queued at the kill"
        server.kill()
        assert finished_loops == 0, "the kill came after the submits had stopped"
        await asyncio.wait_for(asyncio.gather(*loops), 20)
    assert not refused, refused[:5]
    assert len(accepted) >= target

    server = server_factory("--workers", "4", db=db)
    async with session_for(server) as http:
        gate = asyncio.Semaphore(16)

        async def exists(job_id: str) -> int:
            async with gate:
                return (await get_job(http, job_id)).status

        codes = await asyncio.gather(*(exists(job_id) for job_id in accepted))
        missing = [job_id for job_id, code in zip(accepted, codes) if code != 200]
        assert not missing, f"{len(missing)} acknowledged jobs are gone after the restart"

        deadline = time.monotonic() + 40
        while True:
            pending = await list_jobs(http, "&status=queued") + await list_jobs(http, "&status=running")
            if not pending:
                break
            assert time.monotonic() < deadline, f"{len(pending)} jobs never finished after the restart"
            await asyncio.sleep(0.2)

        jobs = await list_jobs(http)
    ids = [j["id"] for j in jobs]
    assert len(ids) == len(set(ids)), "a job is listed twice"
    assert set(accepted) <= set(ids)
    assert len(ids) <= len(accepted) + unknown, (len(ids), len(accepted), unknown)
    for job in jobs:
        assert job["status"] in ("succeeded", "failed"), job
        if job["status"] == "failed":  # running at the kill, and sleep has no retries
            assert job["error"]["type"] == "interrupted" and job["attempts"] == 1, job
        else:
            assert job["attempts"] == 1, job
            if job["id"] in accepted:
                assert job["result"] == {"slept": accepted[job["id"]]}, job


# -- 7. hostile input -----------------------------------------------------------------

@dataclass
class Raw:
    """One raw exchange: what was sent, what came back (status None: the server closed without answering)."""

    case: str
    status: int | None = None
    headers: dict[str, str] | None = None
    body: bytes = b""
    head_request: bool = False


def _final_answer(raw: bytes) -> bytes:
    """The bytes from the final answer on, past any interim (1xx) ones."""
    while re.match(rb"HTTP/1\.\d 1\d\d", raw) and b"\r\n\r\n" in raw:
        raw = raw.partition(b"\r\n\r\n")[2]
    return raw


def _answer_complete(raw: bytes, head_request: bool) -> bool:
    """Whether ``raw`` holds a whole final answer (so there is no need to wait for the close)."""
    raw = _final_answer(raw)
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep or re.match(rb"HTTP/1\.\d 1\d\d", raw):
        return False
    if head_request or re.match(rb"HTTP/1\.\d (204|304)", raw):
        return True
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if match:
        return len(body) >= int(match.group(1))
    return re.search(rb"(?im)^transfer-encoding:\s*chunked", head) is not None and body.endswith(b"0\r\n\r\n")


def _parse_answer(case: str, raw: bytes, head_request: bool) -> Raw:
    raw = _final_answer(raw)
    if not raw:
        return Raw(case)
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1."), f"{case}: not an HTTP answer: {raw[:200]!r}"
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = rest
    if "content-length" in headers:
        body = rest[:int(headers["content-length"])]
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body, data = b"", rest
        while data:
            size_line, _, data = data.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            body, data = body + data[:size], data[size + 2:]
    return Raw(case, int(lines[0].split()[1]), headers, body, head_request)


async def raw_exchange(url: str, case: str, pieces: list[bytes | float], *, half_close: bool = False,
                       read: bool = True, timeout_s: float = 10.0) -> Raw:
    """Send ``pieces`` (a float is a pause) on a fresh connection and read until the server closes it."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    first_line = next((p for p in pieces if isinstance(p, bytes)), b"")
    head_request = first_line.startswith(b"HEAD ")
    raw = b""
    try:
        for piece in pieces:
            if isinstance(piece, float):
                await asyncio.sleep(piece)
                continue
            writer.write(piece)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        if half_close:
            with contextlib.suppress(OSError):
                writer.write_eof()
        if read:
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(timeout_s):
                    while not _answer_complete(raw, head_request) and (chunk := await reader.read(65536)):
                        raw += chunk
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
    return _parse_answer(case, raw, head_request)


def request(method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None,
            *, content_type: str | None = "application/json", length: bool = True) -> bytes:
    """One HTTP/1.1 request with Connection: close (so the answer ends at the close)."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if content_type is not None and body:
        lines.append(f"Content-Type: {content_type}")
    if length and body:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def submit_body(params: str) -> bytes:
    return b'{"task": "echo", "params": ' + params.encode() + b"}"


def hostile_cases(rng: random.Random) -> list[tuple[str, list[bytes | float], dict[str, Any]]]:
    """A few hundred malformed, hostile or odd requests: (name, pieces to send, options)."""
    cases: list[tuple[str, list[bytes | float], dict[str, Any]]] = []

    def add(name: str, *pieces: bytes | float, **options: Any) -> None:
        cases.append((name, list(pieces), options))

    for i in range(60):
        add(f"random bytes {i}", rng.randbytes(rng.randint(1, 4096)), half_close=True)
    for i in range(10):
        add(f"random header bytes {i}", b"POST /jobs HTTP/1.1\r\nHost: x\r\n" + rng.randbytes(rng.randint(1, 2000)),
            half_close=True)
    add("tls client hello", bytes.fromhex("16030100a5010000a10303") + rng.randbytes(160), half_close=True)
    add("http2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", half_close=True)
    add("http 0.9", b"GET /\r\n", half_close=True)

    # Bad UTF-8, odd JSON.
    add("bad utf-8 in params", request("POST", "/jobs", b'{"task": "echo", "params": {"x": "\xff\xfe\xfd"}}'))
    add("bad utf-8 raw", request("POST", "/jobs", b'{"task": "\xff\xfe", "params": {}}'))
    add("bad utf-8 on a task route", request("POST", "/thumbnails", b'{"url": "\xc0\xaf"}'))
    add("bad utf-8 in a header", request("POST", "/jobs", b'{"task": "noop"}', {"Idempotency-Key": "\xff\xfe"}))
    add("lone surrogate", request("POST", "/jobs", submit_body('{"x": "\\ud800"}')))
    add("NUL in a string", request("POST", "/jobs", submit_body('{"x": "a\\u0000b"}')))
    add("utf-16 body", request("POST", "/jobs", '{"task": "noop"}'.encode("utf-16"),
                                content_type="application/json; charset=utf-16"))
    add("utf-8 BOM", request("POST", "/jobs", b'\xef\xbb\xbf{"task": "noop"}'))
    add("NaN", request("POST", "/jobs", submit_body('{"x": NaN}')))
    add("huge exponent", request("POST", "/jobs", submit_body('{"x": 1e400}')))
    add("huge integer", request("POST", "/jobs", submit_body('{"x": ' + "9" * 5000 + "}")))
    add("huge priority", request("POST", "/jobs", b'{"task": "noop", "priority": 99999999999999999999}'))
    add("huge delay", request("POST", "/jobs", b'{"task": "noop", "delay": 1e308}'))
    add("negative delay", request("POST", "/jobs", b'{"task": "noop", "delay": -1}'))
    add("task is a list", request("POST", "/jobs", b'{"task": ["noop"]}'))
    add("long task name", request("POST", "/jobs", b'{"task": "' + b"t" * 20000 + b'"}'))
    add("params a list", request("POST", "/jobs", b'{"task": "echo", "params": [1, 2]}'))
    add("body a string", request("POST", "/jobs", b'"noop"'))
    add("body null", request("POST", "/jobs", b"null"))
    add("trailing garbage", request("POST", "/jobs", b'{"task": "noop"} xyz'))
    add("duplicate members", request("POST", "/jobs", b'{"task": "noop", "task": "echo"}'))
    add("typed with wrong types", request("POST", "/jobs", b'{"task": "typed", "params": {"name": 1, "count": "x"}}'))
    add("long callback url", request("POST", "/jobs", b'{"task": "noop", "callback_url": "http://' + b"a" * 5000
                                     + b'"}'))

    # Deep and huge JSON.
    add("10000 [", request("POST", "/jobs", b"[" * 10000))
    add("10000 {", request("POST", "/jobs", b'{"a":' * 10000))
    for depth in (300, 1000):
        nested = "[" * depth + "]" * depth
        add(f"params nested {depth} deep", request("POST", "/jobs", submit_body('{"x": ' + nested + "}")))
        add(f"params nested {depth} deep with a key", request("POST", "/jobs", submit_body('{"x": ' + nested + "}"),
                                                              {"Idempotency-Key": f"deep-{depth}"}))
        add(f"route body nested {depth} deep", request("POST", "/thumbnails",
                                                      b'{"url": "u", "x": ' + nested.encode() + b"}"))
    add("huge JSON within the limit", request("POST", "/jobs", submit_body('{"blob": "' + "a" * 60000 + '"}')))
    add("many members within the limit", request("POST", "/jobs", submit_body(
        json.dumps({f"k{i}": i for i in range(3000)}))))
    add("huge JSON over the limit", request("POST", "/jobs", submit_body('{"blob": "' + "a" * 70000 + '"}')))
    add("huge declared length", request("POST", "/jobs", b'{"task"', {"Content-Length": "100000000"}, length=False))
    over = submit_body('{"blob": "' + "a" * 70000 + '"}')
    add("huge chunked body", request("POST", "/jobs", b"", {"Transfer-Encoding": "chunked",
                                                            "Content-Type": "application/json"}, length=False)
        + b"".join(b"%x\r\n%s\r\n" % (len(over[i:i + 8192]), over[i:i + 8192]) for i in range(0, len(over), 8192))
        + b"0\r\n\r\n")
    add("gzip bomb", request("POST", "/jobs", gzip.compress(b"[" + b"0," * 2_000_000 + b"0]"),
                             {"Content-Encoding": "gzip"}))
    add("not gzip", request("POST", "/jobs", b'{"task": "noop"}', {"Content-Encoding": "gzip"}))
    add("unknown encoding", request("POST", "/jobs", b'{"task": "noop"}', {"Content-Encoding": "zstd-x"}))

    # Wrong methods on every route, and odd ones.
    routes = ["/jobs", "/jobs/nosuchjob", "/jobs/nosuchjob/result", "/jobs/nosuchjob/cancel",
              "/jobs/nosuchjob/events", "/ws", "/tasks", "/healthz", "/thumbnails", "/items/abc", "/", "/nowhere"]
    for route in routes:
        for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "BREW"):
            add(f"{method} {route}", request(method, route, b'{"x": 1}' if method in ("PUT", "PATCH") else b""))
    add("CONNECT", request("CONNECT", "127.0.0.1:80"))
    add("lower-case method", request("get", "/healthz"))

    # Wrong content types.
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                         "application/xml", "application/jsonx", ";;;;", "application/json-patch+json",
                         "application/json; charset=latin-1", "*/*", "application/json\x7f"):
        for route in ("/jobs", "/thumbnails"):
            add(f"content type {content_type!r} on {route}",
                request("POST", route, b'{"task": "noop", "url": "u"}', content_type=content_type))
    add("no content type", request("POST", "/jobs", b'{"task": "noop"}', content_type=None))
    add("form body", request("POST", "/jobs", b"task=noop&params=x", content_type="application/x-www-form-urlencoded"))

    # Enormous and many headers.
    add("100 KB header", request("GET", "/healthz", headers={"X-Big": "a" * 100_000}))
    add("100 KB header on a submit", request("POST", "/jobs", b'{"task": "noop"}', {"X-Big": "b" * 100_000}))
    add("100 KB Idempotency-Key", request("POST", "/jobs", b'{"task": "noop"}', {"Idempotency-Key": "k" * 100_000}))
    add("8 KB Idempotency-Key", request("POST", "/jobs", b'{"task": "noop"}', {"Idempotency-Key": "k" * 8000}))
    add("200 headers", request("GET", "/healthz", headers={f"X-H{i}": "v" * 50 for i in range(200)}))
    add("2000 headers", request("GET", "/jobs", headers={f"X-H{i}": "v" for i in range(2000)}))
    add("huge Authorization", request("GET", "/jobs", headers={"Authorization": "Bearer " + "t" * 8000}))
    add("huge Prefer", request("POST", "/jobs", b'{"task": "noop"}', {"Prefer": "wait=1e400, " + "x=1, " * 1000}))
    add("huge If-None-Match", request("GET", "/jobs/nosuchjob", headers={"If-None-Match": ", ".join(['"1"'] * 1500)}))
    add("header without colon", b"GET /healthz HTTP/1.1\r\nHost: x\r\nThis is not a header\r\n\r\n")
    add("header name with space", b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Name: v\r\nConnection: close\r\n\r\n")
    add("obs-fold header", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\r\n  folded\r\nConnection: close\r\n\r\n")
    add("NUL in a header", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\nConnection: close\r\n\r\n")
    add("bare LF", b"GET /healthz HTTP/1.1\nHost: x\nConnection: close\n\n")
    add("no Host", b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
    add("HTTP/9.9", b"GET /healthz HTTP/9.9\r\nHost: x\r\nConnection: close\r\n\r\n")
    add("absolute form", b"GET http://evil.example/jobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    add("negative length", request("POST", "/jobs", b'{"task": "noop"}', {"Content-Length": "-5"}, length=False))
    add("non-numeric length", request("POST", "/jobs", b'{"task": "noop"}', {"Content-Length": "1e3"}, length=False))
    add("two lengths", request("POST", "/jobs", b'{"task": "noop"}', {"Content-Length": "16, 3"}, length=False))
    add("expect 100-continue too large", request("POST", "/jobs", b"", {
        "Expect": "100-continue", "Content-Length": "10000000", "Content-Type": "application/json"}, length=False))
    add("expect something else", request("POST", "/jobs", b'{"task": "noop"}', {"Expect": "teapot"}))

    # Bad chunked encoding.
    chunked = {"Transfer-Encoding": "chunked", "Content-Type": "application/json"}
    for name, body in (("bad chunk size", b"zz\r\nabc\r\n0\r\n\r\n"),
                       ("huge chunk size", b"ffffffffffffffffffff\r\nabc\r\n0\r\n\r\n"),
                       ("chunk longer than said", b"3\r\nabcdef\r\n0\r\n\r\n"),
                       ("chunk extension garbage", b"3;\x00\x01=\r\nabc\r\n0\r\n\r\n"),
                       ("no final chunk", b"3\r\nabc\r\n")):
        add(name, request("POST", "/jobs", b"", chunked, length=False) + body, half_close=name == "no final chunk")
    add("chunked and length", request("POST", "/jobs", b"", {**chunked, "Content-Length": "5"}, length=False)
        + b"3\r\nabc\r\n0\r\n\r\n")
    add("chunked twice", request("POST", "/jobs", b"", {"Transfer-Encoding": "chunked, chunked"}, length=False)
        + b"0\r\n\r\n")
    add("gzip transfer coding", request("POST", "/jobs", b"", {"Transfer-Encoding": "gzip"}, length=False)
        + b"xxxx")

    # Invalid percent-encoding, odd paths, very long URLs.
    for path in ("/jobs/%ZZ", "/jobs/%", "/jobs/%F", "/jobs/%FF%FE", "/jobs/%C0%AF", "/jobs/%00", "/jobs/%2e%2e",
                 "/jobs/..%2F..%2Fetc%2Fpasswd", "/jobs/%u2215", "/items/%ZZ", "/jobs?status=%FF",
                 "/jobs?limit=99999999999999999999999", "/jobs?cursor=-1", "/jobs?cursor=1e9",
                 "/jobs?limit=%00", "/jobs/nosuchjob?wait=1e309", "/jobs/nosuchjob?wait=nan",
                 "/jobs/nosuchjob?wait=-1", "/jobs/nosuchjob/events?access_token=%FF",
                 "/jobs?" + "&".join(f"status={i}" for i in range(500)), "//jobs", "/jobs/", "/jobs//x"):
        add(f"path {path[:40]}", request("GET" if not path.startswith("/items") else "DELETE", path))
    add("raw bytes in the path", b"GET /jobs/\xff\xfe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    add("space in the path", b"GET /jobs/a b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    add("long path", request("GET", "/jobs/" + "a" * 7000))
    add("very long URL", request("GET", "/jobs/" + "a" * 20000))
    add("very long query", request("GET", "/jobs?task=" + "q" * 100_000))
    add("long route param", request("DELETE", "/items/" + "i" * 7000))
    return cases


SLOW = b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"


async def test_hostile_input_burst_gets_no_5xx_and_the_server_goes_on(server_factory, http):
    """A few hundred malformed requests get 4xx problems (or a closed connection), never a 5xx; the server goes on."""
    server = server_factory(config_text=config_text(server={"max_body_bytes": 65536}, queue={"shutdown_grace": 1}))
    rng = random.Random(1123)
    cases = hostile_cases(rng)
    gate = asyncio.Semaphore(16)

    async def run(name: str, pieces: list[bytes | float], options: dict[str, Any]) -> Raw:
        async with gate:
            return await raw_exchange(server.url, name, pieces, **options)

    slow = [  # slow bodies: a little at a time, then the client goes away
        run(f"slow body {i}", [SLOW, b'{"task"', 0.3, b': "echo", ', 0.3, b'"params"'], {"read": False})
        for i in range(5)
    ] + [run(f"slow headers {i}", [b"POST /jobs HTTP/1.1\r\n", 0.3, b"Host: x\r\n", 0.3, b"X-A: "], {"read": False})
         for i in range(3)]
    started = time.monotonic()
    async with asyncio.timeout(45):
        results = await asyncio.gather(*(run(*case) for case in cases), *slow)
        # A slow body that does complete is served normally.
        body = b'{"task": "echo", "params": {"slow": true}}'
        complete = await raw_exchange(server.url, "slow complete body", [
            request("POST", "/jobs", b"", {"Content-Length": str(len(body)), "Content-Type": "application/json"},
                    length=False), body[:10], 0.3, body[10:20], 0.3, body[20:]])
    assert time.monotonic() - started < 40
    assert complete.status == 202, complete

    # First: the server is still there and serving.
    assert server.proc.poll() is None, server.log()
    async with http.get(server.url + "/healthz", timeout=REQUEST_TIMEOUT) as resp:
        assert resp.status == 200
    async with http.post(server.url + "/jobs", json={"task": "echo", "params": {"after": 1}},
                         timeout=REQUEST_TIMEOUT) as resp:
        assert resp.status == 202

    answered = [r for r in results if r.status is not None]
    assert len(answered) >= len(cases) // 2, "most hostile requests got no answer at all"
    by_case = {r.case: r.status for r in results}
    expected = {"100 KB header": 431, "huge JSON over the limit": 413, "huge chunked body": 413,
                "huge declared length": 413, "10000 [": 400, "bad utf-8 raw": 400, "bad chunk size": 400,
                "content type 'text/plain' on /jobs": 415, "PUT /jobs": 405, "GET /jobs/nosuchjob": 404}
    wrong = [f"{case}: expected {status}, got {by_case[case]}" for case, status in expected.items()
             if by_case[case] != status]
    for r in answered:
        if r.status >= 500:
            wrong.append(f"{r.case}: {r.status} {r.body[:120]!r}")
        if r.status >= 400 and r.body and not r.head_request:
            content_type = r.headers.get("content-type", "").split(";")[0].strip()
            if content_type != PROBLEM_TYPE:
                wrong.append(f"{r.case}: {r.status} answered with {content_type!r}: {r.body[:80]!r}")
            else:
                problem = json.loads(r.body)
                if problem["status"] != r.status or not problem["title"] or "Traceback" in problem["detail"]:
                    wrong.append(f"{r.case}: bad problem {problem}")
        if r.status == 405 and not r.headers.get("allow"):
            wrong.append(f"{r.case}: 405 without Allow")
    log = server.log()
    if "Traceback" in log:
        exception_line = r"(?m)^((?:[\w.]+\.)?\w+(?:Error|Exception|Long|Line|Message)\b[^\n]{0,60})"
        logged = sorted(set(re.findall(exception_line, log)))
        wrong.append(f"the log has {log.count('Traceback')} tracebacks, of: {logged[:12]}")
    assert not wrong, "\n".join(wrong)


# -- 8. store errors ------------------------------------------------------------------

def run_serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run `asyncjobs serve` expecting it to stop by itself (a start-up error); a hang is a failure."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCJOBS_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    config = tmp_path / "ok.toml"
    config.write_text(config_text())
    command = [sys.executable, "-m", "asyncjobs", "serve", "--host", "127.0.0.1", "--port", "0",
               "--config", str(config), *args]
    try:
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"`asyncjobs serve {' '.join(args)}` did not stop: {exc.stderr!r}") from None


JUNK = {
    "text": b"this is not a database, it is a shopping list\n" * 200,
    "random bytes": random.Random(7).randbytes(16384),
    "sqlite magic then garbage": b"SQLite format 3\x00" + b"\xff" * 4080,
}


@pytest.mark.sqlite_only  # a junk SQLite file
@pytest.mark.parametrize("kind", list(JUNK))
def test_store_file_that_is_not_sqlite_stops_the_start(tmp_path, kind):
    """A store file that is not SQLite stops the start: non-zero exit, a message naming it, no traceback, file kept."""
    db = tmp_path / "junk.db"
    db.write_bytes(JUNK[kind])
    done = run_serve(tmp_path, "--db", str(db))
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "junk.db" in output, output
    assert "Traceback" not in output, output
    assert "listening on" not in output, output
    assert db.read_bytes() == JUNK[kind], "the store file was changed"


@pytest.mark.sqlite_only  # holds the SQLite file's write lock
async def test_a_locked_store_delays_submits_but_never_fails_them(start, tmp_path):
    """While another connection holds the SQLite write lock for a second, submits wait and then succeed; reads go on."""
    client, app = await start()
    other = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None, timeout=10)
    try:
        other.execute("BEGIN IMMEDIATE")
        pending = [asyncio.create_task(post(client, "/jobs", {"task": "noop"})) for _ in range(20)]
        listed = await client.get("/jobs")
        assert listed.status == 200, await listed.text()
        done, _ = await asyncio.wait(pending, timeout=1.0)
        assert not done, "a submit answered while the store was locked"
    finally:
        other.execute("COMMIT")
        other.close()
    replies = await asyncio.wait_for(asyncio.gather(*pending), 10)
    assert [r.status for r in replies] == [202] * 20, [(r.status, r.body) for r in replies if r.status != 202]
    assert len(await stored_jobs(app)) == 20
