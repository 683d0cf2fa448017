"""Waiting without polling: long polls, submit with `Prefer: wait`, progress reports and ETAs, over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
import time
from datetime import datetime
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.conftest import submit, wait_status, eventually

PROBLEM = "application/problem+json"
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30)


# -- helpers -------------------------------------------------------------------

@pytest.fixture
def start(make_client):
    """make_client with a short shutdown grace, so a job left running never slows the teardown."""

    async def start_(**sections: dict[str, Any]):
        queue = {"shutdown_grace": 0.5, **sections.pop("queue", {})}
        return await make_client(queue=queue, **sections)

    return start_


def ts(value: str) -> float:
    """An RFC 3339 time of the protocol as epoch seconds."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def path_of(url: str | None) -> str:
    assert url, "expected a URL header"
    return URL(url).path


def vary_names(resp) -> set[str]:
    return {name.strip().lower() for name in resp.headers.get("Vary", "").split(",") if name.strip()}



async def waiting(client) -> dict[str, int]:
    """The waiter counts that GET /healthz exposes."""
    resp = await client.get("/healthz")
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["status"] == "ok"
    return body["waiting"]


async def _long_polls_are(client, n: int) -> bool:
    return (await waiting(client))["long_polls"] == n


async def _equals(value, expected) -> bool:
    return (await value) == expected


async def assert_problem(resp, status: int) -> dict:
    text = await resp.text()
    assert resp.status == status, f"expected {status}, got {resp.status}: {text}"
    assert resp.content_type == PROBLEM, text
    assert "Traceback" not in text
    problem = await resp.json(content_type=None)
    assert problem["status"] == status and {"type", "title", "detail"} <= problem.keys()
    return problem


async def cancel(client, job_id: str) -> dict:
    resp = await client.post(f"/jobs/{job_id}/cancel")
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def running_job(client, task: str, params: dict | None = None) -> tuple[dict, str]:
    """Submit ``task``, wait until it runs; return its job and current ETag."""
    job = await submit(client, task, params)
    await wait_status(client, job["id"], "running")
    resp = await client.get(f"/jobs/{job['id']}")
    assert resp.status == 200, await resp.text()
    return await resp.json(), resp.headers["ETag"]


async def wait_for_progress(client, job_id: str, etag: str, timeout_s: float = 15.0) -> tuple[dict, str, float]:
    """Chain If-None-Match long polls until the job shows progress; return (job, ETag, arrival time)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        resp = await client.get(f"/jobs/{job_id}", params={"wait": "10"}, headers={"If-None-Match": etag},
                                allow_redirects=False)
        arrived = time.time()
        if resp.status == 304:
            continue
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        etag = resp.headers["ETag"]
        if body["progress"] is not None:
            return body, etag, arrived
    raise AssertionError(f"job {job_id} reported no progress within {timeout_s}s")


# -- long poll -------------------------------------------------------------------

async def test_long_poll_returns_within_a_second_of_completion(start):
    """`GET /jobs/{id}?wait=N` is held while the job runs and answers 303 within 1 s of its completion."""
    client, _ = await start()
    job = await submit(client, "sleep", {"seconds": 1.5, "steps": 1})
    asked = time.monotonic()
    resp = await client.get(f"/jobs/{job['id']}", params={"wait": "20"}, allow_redirects=False)
    arrived = time.time()
    body = await resp.json()
    assert resp.status == 303, body
    assert path_of(resp.headers.get("Location")) == f"/jobs/{job['id']}/result"
    assert body["status"] == "succeeded" and body["result"] == {"slept": 1.5}
    assert time.monotonic() - asked >= 1.0, "the poll was answered before the job finished"
    assert arrived - ts(body["finished_at"]) < 1.0
    assert resp.headers.get("Preference-Applied") == "wait=20"
    assert (await waiting(client))["long_polls"] == 0


async def test_prefer_wait_on_monitor_is_a_long_poll(start):
    """`Prefer: wait=N` on the monitor holds like `?wait=N` and says so in `Preference-Applied` with `Vary: Prefer`."""
    client, _ = await start()
    job = await submit(client, "sleep", {"seconds": 1.0, "steps": 1})
    resp = await client.get(f"/jobs/{job['id']}", headers={"Prefer": "wait=20"}, params={"redirect": "false"})
    arrived = time.time()
    body = await resp.json()
    assert resp.status == 200 and body["status"] == "succeeded", body
    assert arrived - ts(body["finished_at"]) < 1.0
    assert resp.headers.get("Preference-Applied") == "wait=20"
    assert "prefer" in vary_names(resp)


async def test_long_poll_on_finished_job_answers_at_once(start):
    """A long poll that arrives after the job finished gets the final state at once."""
    client, _ = await start()
    job = await submit(client, "echo", {"x": 1})
    await wait_status(client, job["id"], "succeeded")
    for how in ({"params": {"wait": "30"}}, {"headers": {"Prefer": "wait=30"}}):
        began = time.monotonic()
        resp = await client.get(f"/jobs/{job['id']}", allow_redirects=False, **how)
        body = await resp.json()
        assert time.monotonic() - began < 1.0, how
        assert resp.status == 303 and body["status"] == "succeeded" and body["result"] == {"x": 1}


async def test_long_poll_answers_current_state_when_wait_runs_out(start):
    """A long poll on a job that does not finish answers 200 with its current state after N seconds."""
    client, _ = await start()
    job, _ = await running_job(client, "block", {"seconds": 30})
    began = time.monotonic()
    resp = await client.get(f"/jobs/{job['id']}", params={"wait": "0.5"})
    held = time.monotonic() - began
    body = await resp.json()
    assert resp.status == 200 and body["status"] == "running", body
    assert 0.4 <= held < 5.0, held
    assert int(resp.headers["Retry-After"]) >= 1
    assert resp.headers.get("Preference-Applied") == "wait=0.5"
    await cancel(client, job["id"])


async def test_long_poll_returns_on_cancel(start):
    """A held long poll answers as soon as the job is canceled, not when N runs out."""
    client, _ = await start()
    job, _ = await running_job(client, "block", {"seconds": 30})
    poll = asyncio.create_task(client.get(f"/jobs/{job['id']}", params={"wait": "30"}))
    await eventually(lambda: _long_polls_are(client, 1), "the long poll to be held")
    canceled_at = time.monotonic()
    await cancel(client, job["id"])
    resp = await asyncio.wait_for(poll, 10)
    assert time.monotonic() - canceled_at < 1.0
    body = await resp.json()
    assert resp.status == 200 and body["status"] == "canceled" and body["error"]["type"] == "canceled"


async def test_if_none_match_long_poll_returns_on_progress_change(start):
    """With If-None-Match and wait, the long poll answers at the next progress report, while the job still runs."""
    client, _ = await start()
    job, etag = await running_job(client, "sleep", {"seconds": 2.0, "steps": 2})
    assert job["progress"] is None
    resp = await client.get(f"/jobs/{job['id']}", params={"wait": "20"}, headers={"If-None-Match": etag})
    arrived = time.time()
    body = await resp.json()
    assert resp.status == 200, body
    assert body["status"] == "running"
    assert body["progress"] == {"fraction": 0.5, "message": "step 1 of 2"}
    assert body["version"] > job["version"]
    assert resp.headers["ETag"] != etag
    assert arrived - ts(body["started_at"]) < 1.9  # the report comes at about 1 s, the completion at 2 s


async def test_if_none_match_long_poll_answers_304_when_nothing_changes(start):
    """With If-None-Match and wait, a job that does not change gives 304 Not Modified once N seconds pass."""
    client, _ = await start()
    job, etag = await running_job(client, "block", {"seconds": 30})
    began = time.monotonic()
    resp = await client.get(f"/jobs/{job['id']}", params={"wait": "0.6"}, headers={"If-None-Match": etag})
    held = time.monotonic() - began
    assert resp.status == 304, await resp.text()
    assert 0.5 <= held < 5.0, held
    assert resp.headers["ETag"] == etag
    assert await resp.read() == b""
    assert (await waiting(client))["long_polls"] == 0
    await cancel(client, job["id"])


async def test_if_none_match_long_poll_with_prefer_wait_returns_on_completion(start):
    """`Prefer: wait` with If-None-Match answers when the job completes (a change), with the final state."""
    client, _ = await start()
    job, etag = await running_job(client, "block", {"seconds": 1.0})
    resp = await client.get(f"/jobs/{job['id']}", headers={"If-None-Match": etag, "Prefer": "wait=20"},
                            params={"redirect": "false"})
    arrived = time.time()
    body = await resp.json()
    assert resp.status == 200 and body["status"] == "succeeded", body
    assert arrived - ts(body["finished_at"]) < 1.0


async def test_if_none_match_with_stale_etag_answers_at_once(start):
    """A long poll whose If-None-Match no longer matches answers at once with the current state."""
    client, _ = await start()
    job, etag = await running_job(client, "block", {"seconds": 30})
    began = time.monotonic()
    resp = await client.get(f"/jobs/{job['id']}", params={"wait": "20"}, headers={"If-None-Match": 'W/"1"'})
    assert time.monotonic() - began < 1.0
    assert resp.status == 200 and resp.headers["ETag"] == etag
    await cancel(client, job["id"])


async def test_if_none_match_without_wait_answers_304_at_once(start):
    """Without wait, a matching If-None-Match answers 304 at once."""
    client, _ = await start()
    job, etag = await running_job(client, "block", {"seconds": 30})
    began = time.monotonic()
    resp = await client.get(f"/jobs/{job['id']}", headers={"If-None-Match": etag})
    assert resp.status == 304 and time.monotonic() - began < 1.0
    await cancel(client, job["id"])


async def test_long_poll_on_finished_job_with_its_current_etag_is_not_held(start):
    """A finished job is never held: If-None-Match with its final ETag and wait answers 304 at once."""
    client, _ = await start()
    job = await submit(client, "noop")
    await wait_status(client, job["id"], "succeeded")
    resp = await client.get(f"/jobs/{job['id']}", params={"redirect": "false"})
    etag = resp.headers["ETag"]
    began = time.monotonic()
    resp = await client.get(f"/jobs/{job['id']}", params={"wait": "3"}, headers={"If-None-Match": etag})
    held = time.monotonic() - began
    assert resp.status == 304
    assert held < 1.0, f"a terminal job was held {held:.1f}s though it can no longer change"


@pytest.mark.parametrize("held_request", ["monitor", "submit"])
async def test_disconnected_long_poll_frees_its_waiter(start, held_request):
    """A client that drops a held long poll (or held submit) frees its waiter at once (healthz long_polls back to 0)."""
    client, app = await start()
    job, _ = await running_job(client, "block", {"seconds": 30})
    if held_request == "monitor":
        poll = asyncio.create_task(client.get(f"/jobs/{job['id']}", params={"wait": "30"}))
    else:
        poll = asyncio.create_task(client.post("/jobs", json={"task": "block", "params": {"seconds": 30}},
                                               headers={"Prefer": "wait=30"}))
    await eventually(lambda: _long_polls_are(client, 1), "the long poll to be counted")
    subscribed = app.hub.subscriptions
    assert subscribed >= 1
    poll.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await poll
    dropped = time.monotonic()
    await eventually(lambda: _long_polls_are(client, 0), "the dropped long poll to be freed", timeout_s=3.0)
    assert time.monotonic() - dropped < 2.0
    assert app.hub.subscriptions == subscribed - 1
    await cancel(client, job["id"])


async def test_many_long_polls_on_one_job_all_wake_at_completion(start):
    """Twenty concurrent long polls on one job all answer within 1 s of its completion."""
    client, app = await start()
    job = await submit(client, "sleep", {"seconds": 1.0, "steps": 1})

    async def poll() -> tuple[int, dict, float]:
        resp = await client.get(f"/jobs/{job['id']}", params={"wait": "20", "redirect": "false"})
        return resp.status, await resp.json(), time.time()

    answers = await asyncio.gather(*(poll() for _ in range(20)))
    for status, body, arrived in answers:
        assert status == 200 and body["status"] == "succeeded"
        assert arrived - ts(body["finished_at"]) < 1.0
    assert (await waiting(client))["long_polls"] == 0
    assert app.hub.subscriptions == 0


# -- submit and wait -------------------------------------------------------------

async def test_submit_prefer_wait_succeeded_answers_201(start):
    """`POST /jobs` with `Prefer: wait=N` answers 201 with Location of the result once the job succeeds in time."""
    client, _ = await start()
    resp = await client.post("/jobs", json={"task": "sleep", "params": {"seconds": 0.3, "steps": 1}},
                             headers={"Prefer": "wait=20"})
    body = await resp.json()
    assert resp.status == 201, body
    assert path_of(resp.headers.get("Location")) == f"/jobs/{body['id']}/result"
    assert resp.headers.get("Preference-Applied") == "wait=20"
    assert "prefer" in vary_names(resp)
    assert resp.headers.get("ETag") and resp.headers.get("Cache-Control") == "no-store"
    assert body["status"] == "succeeded" and body["result"] == {"slept": 0.3}
    result = await client.get(resp.headers["Location"])
    assert result.status == 200 and await result.json() == {"slept": 0.3}


async def test_submit_prefer_wait_failed_answers_200(start):
    """`Prefer: wait=N` on a job that fails in time answers 200 with the failed job."""
    client, _ = await start()
    resp = await client.post("/jobs", json={"task": "fail", "params": {"message": "no"}},
                             headers={"Prefer": "wait=20"})
    body = await resp.json()
    assert resp.status == 200, body
    assert body["status"] == "failed" and body["error"]["type"] == "exception"
    assert resp.headers.get("Preference-Applied") == "wait=20"
    assert "prefer" in vary_names(resp)
    assert "Location" not in resp.headers or path_of(resp.headers["Location"]) != f"/jobs/{body['id']}/result"


async def test_submit_prefer_wait_canceled_answers_200(start):
    """`Prefer: wait=N` on a job canceled in time answers 200 with the canceled job."""
    client, app = await start()
    held = asyncio.create_task(client.post("/jobs", json={"task": "block", "params": {"seconds": 30}},
                                           headers={"Prefer": "wait=20"}))
    job_ids = await eventually(lambda: list(app.workers.running), "the job to run")
    await eventually(lambda: _long_polls_are(client, 1), "the submit to be held")
    await cancel(client, job_ids[0])
    resp = await asyncio.wait_for(held, 10)
    body = await resp.json()
    assert resp.status == 200, body
    assert body["id"] == job_ids[0] and body["status"] == "canceled"
    assert resp.headers.get("Preference-Applied") == "wait=20"


async def test_submit_prefer_wait_on_a_job_that_expires_meanwhile_answers_200_canceled(start):
    """`Prefer: wait=N` longer than `max_age`, on a job not due before it: the job is canceled when its
    `expires_at` passes, and the submit answers that (200, the canceled job, whose id the client learns),
    not a 410 for the job it has just created."""
    client, _ = await start(jobs={"max_age": 1})
    began = time.monotonic()
    resp = await client.post("/jobs", json={"task": "echo", "params": {}, "delay": 60}, headers={"Prefer": "wait=10"})
    body = await resp.json()
    assert resp.status == 200, body
    assert body["status"] == "canceled" and body["error"]["type"] == "canceled", body
    assert time.monotonic() - began < 8
    assert path_of(resp.headers.get("Content-Location")) == f"/jobs/{body['id']}"
    assert resp.headers.get("Preference-Applied") == "wait=10"
    assert (await client.get(f"/jobs/{body['id']}")).status == 410


async def test_an_equal_submit_waiting_on_a_job_that_expires_meanwhile_answers_200_canceled(start):
    """An equal submit of a unique task, with `Prefer: wait`, waits on the queued job it is answered with
    (the only worker is busy); that job's `expires_at` passes during the wait: 200 with the canceled job,
    as for a job canceled within the wait, not a 410."""
    client, _ = await start(jobs={"max_age": 1}, queue={"workers": 1})
    blocker = await submit(client, "block", {"seconds": 30})
    await wait_status(client, blocker["id"], "running")
    first = await submit(client, "dedupe", {"key": "k"})
    resp = await client.post("/jobs", json={"task": "dedupe", "params": {"key": "k"}},
                             headers={"Prefer": "wait=10"}, allow_redirects=False)
    body = await resp.json()
    assert resp.status == 200, body
    assert body["id"] == first["id"] and body["status"] == "canceled", body
    assert resp.headers.get("Preference-Applied") == "wait=10"


async def test_submit_prefer_wait_not_done_in_time_answers_202(start):
    """`Prefer: wait=N` on a job still running after N seconds answers the normal 202, held about N seconds."""
    client, _ = await start()
    began = time.monotonic()
    resp = await client.post("/jobs", json={"task": "block", "params": {"seconds": 30}},
                             headers={"Prefer": "wait=0.5"})
    held = time.monotonic() - began
    body = await resp.json()
    assert resp.status == 202, body
    assert 0.4 <= held < 5.0, held
    assert path_of(resp.headers.get("Location")) == f"/jobs/{body['id']}"
    assert int(resp.headers["Retry-After"]) >= 1
    assert resp.headers.get("Preference-Applied") == "wait=0.5"
    assert "prefer" in vary_names(resp)
    assert body["status"] in ("queued", "running")
    await cancel(client, body["id"])


async def test_submit_without_prefer_varies_on_prefer(start):
    """A plain submit answers 202 at once, with `Vary: Prefer` and no `Preference-Applied`."""
    client, _ = await start()
    resp = await client.post("/jobs", json={"task": "block", "params": {"seconds": 30}})
    body = await resp.json()
    assert resp.status == 202
    assert "prefer" in vary_names(resp)
    assert "Preference-Applied" not in resp.headers
    await cancel(client, body["id"])


async def test_submit_prefer_wait_among_other_preferences(start):
    """`wait` is found among unknown preferences and parameters, which are ignored."""
    client, _ = await start()
    resp = await client.post("/jobs", json={"task": "echo", "params": {"a": 1}},
                             headers={"Prefer": 'respond-async, foo="bar"; baz, WAIT=20; x=y'})
    body = await resp.json()
    assert resp.status == 201, body
    assert body["result"] == {"a": 1}


async def test_prefer_and_if_none_match_on_several_field_lines_count_as_one_list(start):
    """RFC 9110 5.3: `Prefer: a` then `Prefer: wait=N` on a second line is `Prefer: a, wait=N`; so too for
    `If-None-Match` (the current tag on the second line still matches)."""
    client, _ = await start()
    resp = await client.post("/jobs", json={"task": "echo", "params": {"a": 1}},
                             headers=[("Prefer", "respond-async"), ("Prefer", "wait=20")], allow_redirects=False)
    body = await resp.json()
    assert resp.status == 201 and resp.headers["Preference-Applied"] == "wait=20", body
    etag = f'W/"{body["version"]}"'
    again = await client.get(f"/jobs/{body['id']}", headers=[("If-None-Match", 'W/"0"'), ("If-None-Match", etag)],
                             allow_redirects=False)
    assert again.status == 304
    stale = await client.get(f"/jobs/{body['id']}", headers=[("If-None-Match", 'W/"0"'), ("If-None-Match", 'W/"1"')],
                             allow_redirects=False)
    assert stale.status == 303


async def test_task_route_honours_prefer_wait(start):
    """A task mounted on its own route answers `Prefer: wait` like `POST /jobs`."""
    client, _ = await start()
    resp = await client.post("/thumbnails", json={"url": "http://x/y.png"}, headers={"Prefer": "wait=20"})
    body = await resp.json()
    assert resp.status == 201, body
    assert body["result"] == {"url": "http://x/y.png", "width": 128}
    assert path_of(resp.headers.get("Location")) == f"/jobs/{body['id']}/result"


# -- bad input ---------------------------------------------------------------------

@pytest.mark.parametrize("value", ["abc", "-1", "nan", "", "1s", "0x10"])
async def test_malformed_wait_query_is_a_400_problem(start, value):
    """`?wait=` that is not a non-negative number answers a 400 problem naming the field."""
    client, _ = await start()
    job = await submit(client, "noop")
    resp = await client.get(f"/jobs/{job['id']}", params={"wait": value})
    problem = await assert_problem(resp, 400)
    assert any(e["field"] == "wait" for e in problem.get("errors", [])), problem
    assert problem["job_status"] in ("queued", "running", "succeeded") and "ETag" in resp.headers  # the job exists
    resp = await client.get("/jobs/00000000000000000000000000000000", params={"wait": value})
    assert "job_status" not in await assert_problem(resp, 400)  # no such job: the request is still malformed


async def test_huge_wait_is_clamped_to_max_wait(start):
    """An absurdly large wait, in the query or in Prefer, is held only server.max_wait and says so."""
    client, _ = await start(server={"max_wait": 0.5})
    job, _ = await running_job(client, "block", {"seconds": 30})
    for how in ({"params": {"wait": "1000000000000"}}, {"headers": {"Prefer": "wait=1e12"}}):
        began = time.monotonic()
        resp = await client.get(f"/jobs/{job['id']}", **how)
        held = time.monotonic() - began
        assert resp.status == 200, await resp.text()
        assert 0.4 <= held < 5.0, (how, held)
        assert resp.headers.get("Preference-Applied") == "wait=0.5", how
    began = time.monotonic()
    resp = await client.post("/jobs", json={"task": "block", "params": {"seconds": 30}},
                             headers={"Prefer": "wait=99999999"})
    held = time.monotonic() - began
    assert resp.status == 202 and 0.4 <= held < 5.0, held
    assert resp.headers.get("Preference-Applied") == "wait=0.5"
    await cancel(client, (await resp.json())["id"])
    await cancel(client, job["id"])


async def test_long_poll_on_unknown_job_is_404_at_once(start):
    """A long poll on a job that does not exist answers a 404 problem at once."""
    client, _ = await start()
    began = time.monotonic()
    resp = await client.get("/jobs/no-such-job", params={"wait": "20"})
    await assert_problem(resp, 404)
    assert time.monotonic() - began < 1.0


@pytest.mark.parametrize("prefer", ["wait=abc", "wait=-3", "wait", "wait=", "=,;;=;", ",,,", "wait=1e999",
                                    'wait="', "wait=nan", "wait=inf", "\u00e9=\u00e9", "x" * 4000])
async def test_malformed_prefer_is_tolerated(start, prefer):
    """A malformed Prefer header never causes a 5xx: the monitor and submit answer as if it were absent."""
    client, _ = await start()
    job, _ = await running_job(client, "block", {"seconds": 30})
    began = time.monotonic()
    resp = await client.get(f"/jobs/{job['id']}", headers={"Prefer": prefer})
    assert resp.status == 200, await resp.text()
    resp = await client.post("/jobs", json={"task": "noop"}, headers={"Prefer": prefer})
    assert resp.status == 202, await resp.text()
    assert time.monotonic() - began < 2.0
    await cancel(client, job["id"])


@pytest.mark.parametrize("inm", ["garbage", "W/", '"', ", ,", 'W/"x", "', "W/" * 2000, '"\u00e9"'])
async def test_malformed_if_none_match_is_tolerated(start, inm):
    """A malformed If-None-Match never causes a 5xx; with wait it only fails to match."""
    client, _ = await start()
    job, _ = await running_job(client, "block", {"seconds": 30})
    resp = await client.get(f"/jobs/{job['id']}", headers={"If-None-Match": inm})
    assert resp.status == 200, await resp.text()
    began = time.monotonic()
    resp = await client.get(f"/jobs/{job['id']}", params={"wait": "5"}, headers={"If-None-Match": inm})
    assert resp.status == 200, await resp.text()
    assert time.monotonic() - began < 1.0
    await cancel(client, job["id"])


# -- progress ------------------------------------------------------------------------

async def test_progress_reaches_waiters_at_once_and_the_store_throttled(start):
    """Every progress report reaches long polls at once, while the store is written at most every 0.5 s."""
    client, app = await start()
    app.workers.persist_interval_s = 0.5  # SQLite's (a shared store's is shorter: other nodes read it there)
    commits_before = app.store.commits
    job, etag = await running_job(client, "sleep", {"seconds": 1.5, "steps": 30})
    seen: set[int] = set()
    while True:
        resp = await client.get(f"/jobs/{job['id']}", params={"wait": "10", "redirect": "false"},
                                headers={"If-None-Match": etag})
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        etag = resp.headers["ETag"]
        if body["status"] != "running":
            break
        if body["progress"] is not None:
            seen.add(body["version"])
    assert body["status"] == "succeeded"
    assert body["version"] == 1 + 1 + 30 + 1  # submitted, started, 30 reports, succeeded
    assert len(seen) >= 10, f"long polls saw only {len(seen)} of 30 progress reports"
    writes = app.store.commits - commits_before
    assert writes <= 12, f"{writes} store commits for 30 progress reports in 1.5 s"


async def test_a_fast_reporter_is_stored_at_most_every_half_second_and_keeps_its_last_report(start):
    """A handler reporting as fast as it can (20,000 reports) still costs the store a write at most every half
    second (reports beyond the unstored bound wait for the next write in its time, not a write of their own),
    and its last report is in its terminal state, on the wire and in the store."""
    client, app = await start(tasks={"modules": ["asyncjobs.builtin", "tests.sample_tasks"]})
    app.workers.persist_interval_s = 0.5  # SQLite's (a shared store's is shorter: other nodes read it there)
    commits_before, began = app.store.commits, time.monotonic()
    job = await submit(client, "whoami", {"seconds": 0, "steps": 20000})
    done = await wait_status(client, job["id"], "succeeded", timeout_s=30)
    elapsed = time.monotonic() - began
    assert done["progress"] == {"fraction": 1.0, "message": "step 20000"}, done["progress"]
    stored = (await app.store.lookup(job["id"])).job
    assert stored is not None and stored.progress == done["progress"]
    # The submit, the claim, the outcome, a look or two of the dispatcher and the sweep (and on a shared store
    # its rescue and counts); and the progress, the first report's write at once, then one each half second.
    writes = app.store.commits - commits_before
    assert writes <= 8 + elapsed / 0.5, f"{writes} store commits in {elapsed:.2f} s"


@pytest.mark.sqlite_only  # changes the job's row behind the worker, as another writer would
async def test_progress_writes_the_store_refuses_are_not_retried_in_a_loop(start):
    """Once another writer changed a running job (its version moved on, as a node that took it over would),
    the runner's progress writes all fail: each later report tries again in its time, and with reports held
    back (past the unstored bound) nothing tries in a loop."""
    client, app = await start(tasks={"modules": ["asyncjobs.builtin", "tests.sample_tasks"]})
    job = await submit(client, "whoami", {"seconds": 1.5, "steps": 3000})
    await eventually(lambda: job["id"] in app.workers.running, "the job to run")
    with sqlite3.connect(app.config.store.path) as other:
        other.execute("UPDATE jobs SET version = version + 100000 WHERE id = ?", (job["id"],))
    await asyncio.sleep(0.3)  # more than a hundred reports: the runner holds them back
    commits_before = app.store.commits
    await asyncio.sleep(0.5)
    writes = app.store.commits - commits_before
    assert writes <= 5, f"{writes} store commits in half a second of refused progress writes"


async def test_the_last_report_of_a_burst_reaches_the_store(start):
    """A report inside the store's half second is stored once it is over, not dropped: other nodes and a
    restart read progress from the store."""
    client, app = await start(tasks={"modules": ["asyncjobs.builtin", "tests.sample_tasks"]})
    job = await submit(client, "two_reports", {"hold": 5})

    async def stored_message() -> str | None:
        found = await app.store.lookup(job["id"])
        return ((found.job.progress if found.job else None) or {}).get("message")

    await eventually(lambda: _is(stored_message(), "second"), "the second report in the store", timeout_s=3)
    await client.post(f"/jobs/{job['id']}/cancel")


async def test_reports_shown_run_at_most_a_bounded_number_of_versions_ahead_of_the_store(start):
    """A handler that reports as fast as it can is shown at most rules.UNSTORED_VERSIONS versions past the
    store's (the later reports wait for a write), so a restart after a crash, which goes on that many past
    the stored version, never reuses a version a client saw."""
    from asyncjobs.rules import UNSTORED_VERSIONS
    client, app = await start(tasks={"modules": ["asyncjobs.builtin", "tests.sample_tasks"]})
    job = await submit(client, "whoami", {"seconds": 0, "steps": 20000})
    widest = 0
    deadline = asyncio.get_running_loop().time() + 30
    while asyncio.get_running_loop().time() < deadline:
        shown = app.queue.hub.latest(job["id"])
        found = (await app.store.lookup(job["id"])).job
        assert found is not None
        if found.terminal:
            break
        if shown is not None:
            widest = max(widest, shown.version - found.version)
    else:
        raise AssertionError("the job did not finish")
    assert 0 < widest <= UNSTORED_VERSIONS, widest


async def _is(value, expected) -> bool:
    return await value == expected


@pytest.mark.parametrize(("task", "params", "last"), [
    ("sleep", {"seconds": 0.3, "steps": 3}, {"fraction": 1.0, "message": "step 3 of 3"}),
    ("hash", {"data": "x", "rounds": 40000}, {"fraction": 1.0, "message": "40000 of 40000 rounds"}),
])
async def test_last_progress_before_terminal_state_is_kept(start, task, params, last):
    """The last progress report (async or sync handler) is in the terminal state, on the wire and in the store."""
    client, app = await start()
    job = await submit(client, task, params)
    done = await wait_status(client, job["id"], "succeeded")
    assert done["progress"] == last
    stored = (await app.store.lookup(job["id"])).job
    assert stored is not None and stored.progress == last


async def test_sync_progress_is_pushed_and_is_where_a_cancel_is_learned(start):
    """A sync handler's progress reaches a long poll while it runs, and its next report stops it on cancel."""
    client, _ = await start()
    job, etag = await running_job(client, "hash", {"data": "x", "rounds": 20_000_000})
    body, etag, _ = await wait_for_progress(client, job["id"], etag)
    assert body["status"] == "running"
    assert 0 < body["progress"]["fraction"] < 1
    assert body["progress"]["message"].endswith("of 20000000 rounds")
    began = time.monotonic()
    resp = await client.post(f"/jobs/{job['id']}/cancel")
    canceled = await resp.json()
    assert resp.status == 200, canceled  # 200: the thread has stopped (202 would mean it is still running)
    assert canceled["status"] == "canceled" and canceled["error"]["type"] == "canceled"
    assert time.monotonic() - began < 5.0


async def test_spin_handler_stops_at_its_progress_call_on_cancel(start):
    """A sync handler that reports progress is stopped by a cancel at its next report."""
    client, _ = await start()
    job, _ = await running_job(client, "spin", {"seconds": 60})
    resp = await client.post(f"/jobs/{job['id']}/cancel")
    body = await resp.json()
    assert resp.status == 200 and body["status"] == "canceled", body
    assert body["progress"] == {"fraction": None, "message": "spinning"}


# -- ETA and Retry-After -----------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
async def test_queued_eta_and_retry_after_follow_run_time_position_and_workers(start, workers):
    """A queued job's eta is now + ceil(position / workers) x the task's mean run time; Retry-After follows it."""
    client, app = await start(queue={"workers": workers})
    resp = await client.post("/jobs", json={"task": "sleep", "params": {"seconds": 0.4, "steps": 1}})
    first = await resp.json()
    assert first["eta"] is None or first["status"] != "queued"  # no run time known yet
    assert int(resp.headers["Retry-After"]) >= 1
    await wait_status(client, first["id"], "succeeded")
    mean = app.queue.run_times.mean("sleep")
    assert mean is not None and 0.35 <= mean < 3.0
    blockers = [await submit(client, "block", {"seconds": 30}) for _ in range(workers)]
    for blocker in blockers:
        running = await wait_status(client, blocker["id"], "running")
        assert running["queue_position"] is None
    queued = [await submit(client, "sleep", {"seconds": 0.4, "steps": 1}) for _ in range(3)]
    for position, job in enumerate(queued, start=1):
        before = time.time()
        resp = await client.get(f"/jobs/{job['id']}")
        after = time.time()
        body = await resp.json()
        assert resp.status == 200 and body["status"] == "queued", body
        assert body["queue_position"] == position
        ahead = math.ceil(position / workers) * mean
        eta = ts(body["eta"])
        assert before + ahead - 0.05 <= eta <= after + ahead + 0.05, (position, eta - before, ahead)
        retry_after = int(resp.headers["Retry-After"])
        assert max(1, math.ceil(eta - after - 0.01)) <= retry_after <= max(1, math.ceil(eta - before + 0.01))
    for blocker in blockers:
        await cancel(client, blocker["id"])
    for job in queued:
        done = await wait_status(client, job["id"], "succeeded")
        assert done["eta"] is None and done["queue_position"] is None


async def test_submit_retry_after_follows_the_eta(start):
    """The 202 of a submit behind a busy worker carries eta, queue_position and a Retry-After derived from the eta."""
    client, app = await start(queue={"workers": 1})
    warm = await submit(client, "sleep", {"seconds": 1.2, "steps": 1})
    await wait_status(client, warm["id"], "succeeded")
    mean = app.queue.run_times.mean("sleep")
    blocker, _ = await running_job(client, "block", {"seconds": 30})
    answers = []
    for _ in range(3):
        before = time.time()
        resp = await client.post("/jobs", json={"task": "sleep", "params": {"seconds": 1.2, "steps": 1}})
        after = time.time()
        answers.append((resp, await resp.json(), before, after))
    for position, (resp, body, before, after) in enumerate(answers, start=1):
        assert resp.status == 202 and body["queue_position"] == position
        eta = ts(body["eta"])
        assert before + position * mean - 0.05 <= eta <= after + position * mean + 0.05
        assert int(resp.headers["Retry-After"]) == pytest.approx(math.ceil(position * mean), abs=1)
    retry_afters = [int(resp.headers["Retry-After"]) for resp, *_ in answers]
    assert retry_afters == sorted(retry_afters) and retry_afters[-1] >= 3
    await cancel(client, blocker["id"])


async def test_a_progress_message_that_is_not_valid_unicode_is_shown_with_a_replacement(start):
    """A handler reports a file name with bytes that are not UTF-8 (lone surrogates in Python): the monitor,
    the list and the job's page still answer, showing "?", and the job ends as its handler does."""
    client, _ = await start()
    job = await submit(client, "odd_name_progress", {"hold": 1.0})
    body = await eventually(lambda: _progress_of(client, job["id"]), "the progress report")
    assert body["progress"]["message"] == "file ?.bin", body
    assert (await client.get("/jobs")).status == 200
    page = await client.get(f"/jobs/{job['id']}", headers={"Accept": "text/html"})
    assert page.status == 200 and page.content_type == "text/html"
    done = await wait_status(client, job["id"], "succeeded")
    assert done["result"] == "done" and done["progress"]["message"] == "file ?.bin"


async def _progress_of(client, job_id: str) -> dict | None:
    resp = await client.get(f"/jobs/{job_id}", params={"redirect": "false"})
    body = await resp.json() if resp.status == 200 else None
    return body if body and body.get("progress") else None


async def test_running_eta_comes_from_progress_fraction(start):
    """A running job's eta is started_at + elapsed / fraction once it reports progress."""
    client, _ = await start()
    job, etag = await running_job(client, "sleep", {"seconds": 2.0, "steps": 4})
    body, _, arrived = await wait_for_progress(client, job["id"], etag)
    fraction = body["progress"]["fraction"]
    started = ts(body["started_at"])
    eta = ts(body["eta"])
    assert body["status"] == "running" and body["queue_position"] is None
    assert started + 2.0 - 0.05 <= eta <= started + (arrived - started) / fraction + 0.05, (eta - started, fraction)


async def test_running_eta_without_progress_comes_from_mean_run_time(start):
    """A running job that reports no progress gets eta = started_at + the task's mean run time."""
    client, app = await start()
    warm = await submit(client, "block", {"seconds": 0.4})
    await wait_status(client, warm["id"], "succeeded")
    mean = app.queue.run_times.mean("block")
    job, _ = await running_job(client, "block", {"seconds": 30})
    after = time.time()
    started = ts(job["started_at"])
    eta = ts(job["eta"])
    assert started + mean - 0.05 <= eta <= max(started + mean, after) + 0.05, (eta - started, mean)
    await cancel(client, job["id"])


# -- a real server process ------------------------------------------------------------------

async def test_serve_disconnected_long_poll_frees_its_waiter(server_factory):
    """On `asyncjobs serve`, a client that drops a held long poll frees its waiter at once."""
    server = server_factory()
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as http:

        async def long_polls() -> int:
            async with http.get(f"{server.url}/healthz") as resp:
                return (await resp.json())["waiting"]["long_polls"]

        async with http.post(f"{server.url}/jobs", json={"task": "block", "params": {"seconds": 30}}) as resp:
            assert resp.status == 202
            job = await resp.json()
        poll = asyncio.create_task(http.get(f"{server.url}/jobs/{job['id']}", params={"wait": "30"}))
        await eventually(lambda: _equals(long_polls(), 1), "the long poll to be counted")
        poll.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poll
        dropped = time.monotonic()
        await eventually(lambda: _equals(long_polls(), 0), "the dropped long poll to be freed", timeout_s=3.0)
        assert time.monotonic() - dropped < 2.0
