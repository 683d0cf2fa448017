"""Submit, monitor and result endpoints against PROTOCOL.md, through a real aiohttp test server."""

from __future__ import annotations

import asyncio
import os
import hashlib
import re
import secrets
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import pytest
from yarl import URL

from tests.conftest import submit, wait_status

JOB_FIELDS = {
    "id", "task", "status", "created_at", "started_at", "finished_at", "expires_at", "attempts",
    "priority", "version", "progress", "eta", "queue_position", "result", "error", "links",
}
PROBLEM_TYPE = "application/problem+json"
RFC3339_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")


# -- helpers ---------------------------------------------------------------------

@pytest.fixture
def start(make_client):
    """make_client with a short shutdown grace, so a test's leftover handler never delays teardown."""

    async def start_(**sections: dict[str, Any]):
        queue = {"shutdown_grace": 0.5, **sections.pop("queue", {})}
        return await make_client(queue=queue, **sections)

    return start_


def path_of(url: str | None) -> str:
    """The path a (relative or absolute) URL header points at."""
    assert url, "expected a URL header"
    return URL(url).path


def assert_no_traceback(text: str) -> None:
    assert "Traceback" not in text, text
    assert 'File "' not in text, text


def assert_time(value: Any) -> datetime:
    assert isinstance(value, str) and RFC3339_Z.match(value), value
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert parsed.tzinfo is not None and parsed.utcoffset().total_seconds() == 0
    return parsed


def assert_retry_after(resp) -> int:
    value = resp.headers.get("Retry-After")
    assert value is not None and re.fullmatch(r"\d+", value), f"Retry-After={value!r}"
    assert int(value) >= 1
    return int(value)


def assert_job_headers(resp) -> None:
    assert resp.headers.get("ETag"), "every answer about a job carries an ETag"
    assert resp.headers.get("Cache-Control") == "no-store"


def assert_job_shape(job: dict[str, Any], job_id: str | None = None) -> None:
    """Every field of "The job representation" is there, with the right forms."""
    assert JOB_FIELDS <= set(job), f"missing {JOB_FIELDS - set(job)}"
    if job_id is not None:
        assert job["id"] == job_id
    jid = job["id"]
    assert job["status"] in {"queued", "running", "succeeded", "failed", "canceled"}
    assert_time(job["created_at"])
    assert_time(job["expires_at"])
    for key in ("started_at", "finished_at", "eta"):
        if job[key] is not None:
            assert_time(job[key])
    assert isinstance(job["attempts"], int) and job["attempts"] >= 0
    assert isinstance(job["priority"], int)
    assert isinstance(job["version"], int) and job["version"] >= 1
    assert job["links"] == {
        "self": f"/jobs/{jid}",
        "result": f"/jobs/{jid}/result",
        "events": f"/jobs/{jid}/events",
        "cancel": {"href": f"/jobs/{jid}/cancel", "method": "POST"},
        "delete": {"href": f"/jobs/{jid}", "method": "DELETE"},
    }


async def read_problem(resp, status: int) -> dict[str, Any]:
    """Check an RFC 9457 problem answer with ``status``; return its body."""
    text = await resp.text()
    assert resp.status == status, f"expected {status}, got {resp.status}: {text}"
    assert resp.content_type == PROBLEM_TYPE, f"{resp.content_type}: {text}"
    assert_no_traceback(text)
    body = await resp.json(content_type=None)
    assert {"type", "title", "status", "detail"} <= set(body), body
    assert body["status"] == status
    assert isinstance(body["title"], str) and isinstance(body["detail"], str)
    return body


def error_fields(problem: dict[str, Any]) -> set[str]:
    """The fields named in ``errors``, without a leading ``params.``."""
    errors = problem.get("errors")
    assert isinstance(errors, list) and errors, problem
    for error in errors:
        assert isinstance(error.get("field"), str) and isinstance(error.get("message"), str), error
        assert error["message"]
    return {e["field"].removeprefix("params.") for e in errors}


async def listed_ids(client) -> list[str]:
    resp = await client.get("/jobs", params={"limit": "500"})
    assert resp.status == 200, await resp.text()
    return [job["id"] for job in (await resp.json())["jobs"]]


async def poll(client, path: str, until, timeout_s: float = 10.0, **kwargs):
    """GET ``path`` (no redirects) until ``until(resp, text)`` is true; return (resp, text)."""
    deadline = time.monotonic() + timeout_s
    while True:
        resp = await client.get(path, allow_redirects=False, **kwargs)
        text = await resp.text()
        if until(resp, text):
            return resp, text
        if time.monotonic() > deadline:
            raise AssertionError(f"GET {path} still {resp.status} {text} after {timeout_s}s")
        await asyncio.sleep(0.02)


async def occupy_worker(client) -> dict[str, Any]:
    """Submit a ``block`` job and wait until it runs (with one worker, later jobs stay queued)."""
    job = await submit(client, "block", {"seconds": 30})
    await wait_status(client, job["id"], "running")
    return job


async def cancel(client, job_id: str) -> dict[str, Any]:
    resp = await client.post(f"/jobs/{job_id}/cancel")
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def raw_post(client, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """A hand-written HTTP/1.1 request, so that no client library adds a Content-Type."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        head = [f"POST {path} HTTP/1.1", f"Host: {client.host}:{client.port}", "Connection: close",
                f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    raw_head, _, raw_body = data.partition(b"\r\n\r\n")
    lines = raw_head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    parsed = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return status, parsed, raw_body


def iterated_sha256(data: str, rounds: int) -> str:
    digest = data.encode()
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()


# -- 1. submit -------------------------------------------------------------------

async def test_submit_answers_202_with_headers_and_full_job(start):
    """A valid submit answers 202 with Location, Content-Location, Retry-After, ETag, no-store and the full job."""
    client, _ = await start()
    before = datetime.now(timezone.utc)
    resp = await client.post("/jobs", json={"task": "echo", "params": {"a": 1}, "priority": 3})
    text = await resp.text()
    assert resp.status == 202, text
    assert resp.content_type == "application/json"
    job = await resp.json()
    assert_job_shape(job)
    assert path_of(resp.headers.get("Location")) == f"/jobs/{job['id']}"
    assert path_of(resp.headers.get("Content-Location")) == f"/jobs/{job['id']}"
    assert_retry_after(resp)
    assert_job_headers(resp)
    assert job["task"] == "echo"
    assert job["status"] in {"queued", "running"}
    assert job["priority"] == 3
    assert job["finished_at"] is None and job["result"] is None and job["error"] is None
    created = assert_time(job["created_at"])
    assert abs((created - before).total_seconds()) < 60
    assert assert_time(job["expires_at"]) > created


async def test_submit_defaults_priority_zero(start):
    """Without ``priority`` and ``params`` the job gets priority 0 and empty params."""
    client, _ = await start()
    resp = await client.post("/jobs", json={"task": "echo"})
    assert resp.status == 202, await resp.text()
    job = await resp.json()
    assert job["priority"] == 0
    done = await wait_status(client, job["id"], "succeeded")
    assert done["result"] == {}


async def test_submitted_job_is_readable_at_location_at_once(start):
    """The job is committed before the 202, so its Location answers with it immediately."""
    client, _ = await start()
    for _ in range(5):
        resp = await client.post("/jobs", json={"task": "noop"})
        assert resp.status == 202, await resp.text()
        job_id = (await resp.json())["id"]
        monitor = await client.get(resp.headers["Location"], allow_redirects=False)
        assert monitor.status in (200, 303), await monitor.text()
        assert (await monitor.json())["id"] == job_id
        assert_job_headers(monitor)


async def test_job_ids_are_url_safe_random_and_distinct(start):
    """Job ids are URL-safe, long enough for 122+ random bits, and never repeat."""
    client, _ = await start()
    ids: list[str] = []
    for _ in range(8):
        batch = await asyncio.gather(*(submit(client, "noop") for _ in range(25)))
        ids += [job["id"] for job in batch]
    assert len(ids) == 200
    assert len(set(ids)) == 200
    for job_id in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]{22,}", job_id), job_id
    # Random, not a counter or a clock: each of the first 21 characters (6 bits each, 126 bits in
    # all) takes nearly all 64 values over 200 ids (about 61 expected; a padding character may not).
    for pos in range(21):
        assert len({i[pos] for i in ids}) >= 40, f"position {pos} barely varies"


# -- 2. bad submits --------------------------------------------------------------

BAD_SUBMITS = [
    # (case, body bytes, content type, status, fields named in errors or None)
    ("malformed json", b'{"task": "echo",', "application/json", 400, None),
    ("invalid utf-8", b'{"task": "echo", "params": {"s": "\xff\xfe"}}', "application/json", 400, None),
    ("json array", b'[{"task": "echo"}]', "application/json", 400, None),
    ("json string", b'"echo"', "application/json", 400, None),
    ("json null", b"null", "application/json", 400, None),
    ("missing task", b'{"params": {}}', "application/json", 400, {"task"}),
    ("task not a string", b'{"task": 5}', "application/json", 400, {"task"}),
    ("unknown task", b'{"task": "no_such_task"}', "application/json", 400, {"task"}),
    ("params not an object", b'{"task": "echo", "params": [1, 2]}', "application/json", 400, {"params"}),
    ("params a string", b'{"task": "echo", "params": "x"}', "application/json", 400, {"params"}),
    ("typed: missing required name", b'{"task": "typed", "params": {"count": 1}}', "application/json", 400,
     {"name"}),
    ("typed: wrong type for count", b'{"task": "typed", "params": {"name": "n", "count": "three"}}',
     "application/json", 400, {"count"}),
    ("typed: bad mode enum", b'{"task": "typed", "params": {"name": "n", "count": 1, "mode": "z"}}',
     "application/json", 400, {"mode"}),
    ("typed: unknown extra param", b'{"task": "typed", "params": {"name": "n", "count": 1, "colour": "red"}}',
     "application/json", 400, {"colour"}),
    ("typed: every mistake at once", b'{"task": "typed", "params": {"count": 1.5, "mode": "z", "colour": 1}}',
     "application/json", 400, {"name", "count", "mode", "colour"}),
    ("sleep: negative seconds", b'{"task": "sleep", "params": {"seconds": -1}}', "application/json", 400,
     {"seconds"}),
    ("unknown top-level field", b'{"task": "echo", "colour": "red"}', "application/json", 400, {"colour"}),
    ("priority a string", b'{"task": "echo", "priority": "high"}', "application/json", 400, {"priority"}),
    ("priority a float", b'{"task": "echo", "priority": 1.5}', "application/json", 400, {"priority"}),
    ("priority a boolean", b'{"task": "echo", "priority": true}', "application/json", 400, {"priority"}),
    ("negative delay", b'{"task": "echo", "delay": -5}', "application/json", 400, {"delay"}),
    ("delay a string", b'{"task": "echo", "delay": "soon"}', "application/json", 400, {"delay"}),
    ("text/plain", b'{"task": "echo"}', "text/plain", 415, None),
    ("form encoded", b"task=echo", "application/x-www-form-urlencoded", 415, None),
]


@pytest.mark.parametrize("case,body,content_type,status,fields", BAD_SUBMITS, ids=[c[0] for c in BAD_SUBMITS])
async def test_bad_submit_is_a_problem_and_stores_nothing(start, case, body, content_type, status, fields):
    """Each kind of bad submit gets its 4xx problem (naming the bad fields) and stores no job."""
    client, _ = await start()
    kept = await submit(client, "noop")
    before = await listed_ids(client)
    assert before == [kept["id"]]
    resp = await client.post("/jobs", data=body, headers={"Content-Type": content_type})
    problem = await read_problem(resp, status)
    if fields is not None:
        assert fields <= error_fields(problem), problem
    assert await listed_ids(client) == before
    assert (await client.get("/healthz")).status == 200


async def test_submit_without_content_type_is_415(start):
    """A body sent with no Content-Type at all is refused with 415 and stores nothing."""
    client, _ = await start()
    status, headers, body = await raw_post(client, "/jobs", b'{"task": "echo"}', {})
    assert status == 415, body
    assert headers.get("content-type", "").startswith(PROBLEM_TYPE)
    assert_no_traceback(body.decode(errors="replace"))
    assert await listed_ids(client) == []


async def test_submit_over_body_limit_is_413(start):
    """A body over ``server.max_body_bytes`` is refused with 413 and stores nothing."""
    client, _ = await start(server={"max_body_bytes": 1000})
    big = {"task": "echo", "params": {"pad": "x" * 2000}}
    resp = await client.post("/jobs", json=big)
    await read_problem(resp, 413)
    assert await listed_ids(client) == []
    small = await client.post("/jobs", json={"task": "echo", "params": {"pad": "x" * 100}})
    assert small.status == 202, await small.text()


async def test_chunked_submit_over_body_limit_is_413(start):
    """A chunked body (no Content-Length) that grows past the limit is refused with 413 too."""
    client, _ = await start(server={"max_body_bytes": 1000})

    async def chunks():
        yield b'{"task": "echo", "params": {"pad": "'
        for _ in range(20):
            yield b"x" * 200
        yield b'"}}'

    resp = await client.post("/jobs", data=chunks(), headers={"Content-Type": "application/json"})
    await read_problem(resp, 413)
    assert await listed_ids(client) == []


async def test_a_body_in_an_unknown_content_coding_is_415_naming_the_codings_taken(start):
    """RFC 9110: a body whose Content-Encoding the server cannot undo (an unknown coding, or a list of them)
    is 415 with Accept-Encoding, and nothing is stored; plain, identity and gzip bodies are taken."""
    import gzip
    client, _ = await start()
    body = b'{"task": "echo", "params": {"n": 1}}'
    for coding in ("br2", "gzip, br", "compress", "x-unknown"):
        status, headers, answer = await raw_post(client, "/jobs", body,
                                                 {"Content-Type": "application/json", "Content-Encoding": coding})
        assert status == 415, (coding, status, answer)
        assert headers.get("content-type", "").startswith(PROBLEM_TYPE), coding
        assert "gzip" in headers.get("accept-encoding", ""), headers
    assert await listed_ids(client) == []
    for coding, sent in (("identity", body), ("gzip", gzip.compress(body)), ("GZIP", gzip.compress(body))):
        status, _, answer = await raw_post(client, "/jobs", sent,
                                           {"Content-Type": "application/json", "Content-Encoding": coding})
        assert status == 202, (coding, status, answer)
    assert len(await listed_ids(client)) == 3


# -- 3. the monitor, rest style ----------------------------------------------------

async def test_monitor_queued_and_running_answer_200_with_retry_after(start):
    """A queued job (with its queue position) and a running job both answer 200 with Retry-After."""
    client, _ = await start(queue={"workers": 1})
    blocker = await occupy_worker(client)
    waiting = await submit(client, "echo", {"n": 1})

    resp = await client.get(f"/jobs/{blocker['id']}", allow_redirects=False)
    assert resp.status == 200
    assert_retry_after(resp)
    assert_job_headers(resp)
    running = await resp.json()
    assert_job_shape(running, blocker["id"])
    assert running["status"] == "running"
    assert running["attempts"] == 1
    assert_time(running["started_at"])
    assert running["queue_position"] is None

    resp = await client.get(f"/jobs/{waiting['id']}", allow_redirects=False)
    assert resp.status == 200
    assert_retry_after(resp)
    assert_job_headers(resp)
    queued = await resp.json()
    assert_job_shape(queued, waiting["id"])
    assert queued["status"] == "queued"
    assert queued["queue_position"] == 1
    assert queued["started_at"] is None and queued["attempts"] == 0

    second = await submit(client, "echo", {"n": 2})
    resp = await client.get(f"/jobs/{second['id']}")
    assert (await resp.json())["queue_position"] == 2
    await cancel(client, blocker["id"])
    await wait_status(client, second["id"], "succeeded")


async def test_monitor_succeeded_is_303_to_result_without_retry_after(start):
    """A succeeded job answers 303 See Other to its result, with the job as body and no Retry-After."""
    client, _ = await start()
    job = await submit(client, "echo", {"k": "v"})
    await wait_status(client, job["id"], "succeeded")
    resp = await client.get(f"/jobs/{job['id']}", allow_redirects=False)
    assert resp.status == 303, await resp.text()
    assert path_of(resp.headers.get("Location")) == f"/jobs/{job['id']}/result"
    assert "Retry-After" not in resp.headers
    assert_job_headers(resp)
    body = await resp.json()
    assert_job_shape(body, job["id"])
    assert body["status"] == "succeeded"
    assert body["result"] == {"k": "v"}
    assert body["error"] is None and body["eta"] is None and body["queue_position"] is None
    assert_time(body["finished_at"]) >= assert_time(body["started_at"]) >= assert_time(body["created_at"])

    followed = await client.get(f"/jobs/{job['id']}")
    assert followed.status == 200
    assert await followed.json() == {"k": "v"}


async def test_monitor_redirect_false_answers_200_with_job(start):
    """``?redirect=false`` answers 200 with the succeeded job instead of the 303."""
    client, _ = await start()
    job = await submit(client, "echo", {"k": 1})
    await wait_status(client, job["id"], "succeeded")
    resp = await client.get(f"/jobs/{job['id']}", params={"redirect": "false"}, allow_redirects=False)
    assert resp.status == 200, await resp.text()
    assert_job_headers(resp)
    body = await resp.json()
    assert_job_shape(body, job["id"])
    assert body["status"] == "succeeded" and body["result"] == {"k": 1}


async def test_monitor_failed_answers_200_with_error(start):
    """A failed job answers 200 with ``error`` of type exception and its message."""
    client, _ = await start()
    job = await submit(client, "fail", {"message": "it broke"})
    await wait_status(client, job["id"], "failed")
    resp = await client.get(f"/jobs/{job['id']}", allow_redirects=False)
    assert resp.status == 200
    assert_job_headers(resp)
    body = await resp.json()
    assert_job_shape(body, job["id"])
    assert body["error"] == {"type": "exception", "message": "it broke"}
    assert body["result"] is None
    assert_time(body["finished_at"])


async def test_monitor_canceled_answers_200_with_canceled_error(start):
    """A canceled job answers 200 with ``error`` of type canceled."""
    client, _ = await start()
    job = await submit(client, "block", {"seconds": 30})
    await wait_status(client, job["id"], "running")
    await cancel(client, job["id"])
    resp = await client.get(f"/jobs/{job['id']}", allow_redirects=False)
    assert resp.status == 200
    assert_job_headers(resp)
    body = await resp.json()
    assert_job_shape(body, job["id"])
    assert body["status"] == "canceled"
    assert body["error"]["type"] == "canceled"
    assert isinstance(body["error"]["message"], str)


async def test_monitor_unknown_id_is_404_problem(start):
    """An id that was never issued answers 404 problem details, on the monitor and the result."""
    client, _ = await start()
    for path in (f"/jobs/{secrets.token_urlsafe(16)}", f"/jobs/{secrets.token_urlsafe(16)}/result"):
        resp = await client.get(path, allow_redirects=False)
        await read_problem(resp, 404)


async def test_the_monitors_json_404_and_410_vary_on_accept(start):
    """A browser asking the monitor for a missing or expired job gets a page, anyone else problem details: the
    JSON 404 and 410 say so with Vary: Accept, as the pages do."""
    client, _ = await start(jobs={"retention": 0.2})
    job = await submit(client, "echo", {"x": 1})
    resp, _ = await poll(client, f"/jobs/{job['id']}", lambda r, t: r.status == 410)
    for path, status in ((f"/jobs/{secrets.token_urlsafe(16)}", 404), (f"/jobs/{job['id']}", 410)):
        for accept in ("application/json", "text/html"):
            resp = await client.get(path, headers={"Accept": accept}, allow_redirects=False)
            assert resp.status == status, (path, accept)
            vary = {v.strip().lower() for v in resp.headers.get("Vary", "").split(",")}
            assert "accept" in vary, (path, accept, resp.headers)


async def test_monitor_and_result_are_410_after_retention_and_as_tombstone(start):
    """Past its retention a finished job answers 410, and still 410 once the sweep left only a tombstone."""
    client, _ = await start(jobs={"retention": 0.3})
    job = await submit(client, "echo", {"x": 1})
    job_id = job["id"]
    # The job finishes, then expires 0.3 s later: wait for the 410 directly.
    resp, _ = await poll(client, f"/jobs/{job_id}", lambda r, t: r.status == 410)
    problem = await read_problem(resp, 410)
    assert problem.get("job_status") in (None, "succeeded")
    await read_problem(await client.get(f"/jobs/{job_id}/result"), 410)

    # The sweep removes the record and leaves a tombstone: no longer listed, still 410.
    deadline = time.monotonic() + 10
    while job_id in await listed_ids(client):
        assert time.monotonic() < deadline, "the sweep never removed the expired job"
        await asyncio.sleep(0.05)
    await read_problem(await client.get(f"/jobs/{job_id}", allow_redirects=False), 410)
    await read_problem(await client.get(f"/jobs/{job_id}/result"), 410)


async def test_tombstone_turns_into_404_after_tombstone_retention(start):
    """A tombstone answers 410 for ``tombstone_retention``, then the job answers 404."""
    client, _ = await start(jobs={"retention": 0.2, "tombstone_retention": 0.5})
    job = await submit(client, "noop")
    await poll(client, f"/jobs/{job['id']}", lambda r, t: r.status == 410)
    gone_at = time.monotonic()
    resp, _ = await poll(client, f"/jobs/{job['id']}", lambda r, t: r.status != 410, timeout_s=15)
    await read_problem(resp, 404)
    # It was not dropped straight away: the 410 lasted for (roughly) the tombstone retention.
    assert time.monotonic() - gone_at >= 0.3
    await read_problem(await client.get(f"/jobs/{job['id']}/result"), 404)


# -- 4. ETag / If-None-Match --------------------------------------------------------

async def test_if_none_match_gives_304_until_the_job_changes(start):
    """Same ETag while nothing changed gives 304 (with ETag and no-store); after a change, 200."""
    client, _ = await start(queue={"workers": 1})
    blocker = await occupy_worker(client)
    job = await submit(client, "echo", {"e": 1})
    first = await client.get(f"/jobs/{job['id']}")
    second = await client.get(f"/jobs/{job['id']}")
    assert first.status == second.status == 200
    tag = first.headers["ETag"]
    assert second.headers["ETag"] == tag

    resp = await client.get(f"/jobs/{job['id']}", headers={"If-None-Match": tag})
    assert resp.status == 304
    assert resp.headers.get("ETag") == tag
    assert resp.headers.get("Cache-Control") == "no-store"
    assert await resp.read() == b""

    await cancel(client, job["id"])
    resp = await client.get(f"/jobs/{job['id']}", headers={"If-None-Match": tag}, allow_redirects=False)
    assert resp.status == 200
    assert resp.headers["ETag"] != tag
    assert (await resp.json())["status"] == "canceled"
    unchanged = await client.get(f"/jobs/{job['id']}", headers={"If-None-Match": resp.headers["ETag"]})
    assert unchanged.status == 304
    await cancel(client, blocker["id"])


async def test_version_grows_by_one_with_each_change(start):
    """``version`` is 1 at submit and grows by one per change (queued, running, succeeded; queued, canceled)."""
    client, _ = await start(queue={"workers": 1})
    blocker = await occupy_worker(client)
    queued = await submit(client, "echo", {"v": 1})
    assert queued["version"] == 1
    canceled = await cancel(client, queued["id"])
    assert canceled["version"] == 2
    await cancel(client, blocker["id"])

    job = await submit(client, "echo", {"v": 2})
    assert job["version"] == 1
    done = await wait_status(client, job["id"], "succeeded")
    assert done["version"] == 3

    # With progress reports every change, progress included, moves the version on.
    slept = await submit(client, "sleep", {"seconds": 0.2, "steps": 4})
    seen: list[tuple[int, str]] = []
    deadline = time.monotonic() + 10
    while True:
        body = await (await client.get(f"/jobs/{slept['id']}", allow_redirects=False)).json()
        if not seen or seen[-1][0] != body["version"]:
            seen.append((body["version"], body["status"]))
        if body["status"] == "succeeded":
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    versions = [v for v, _ in seen]
    assert versions == sorted(set(versions)), seen
    # queued 1, running 2, four progress reports, succeeded: 7.
    assert versions[-1] == 7, seen


# -- 5. the monitor, flow style --------------------------------------------------------

async def test_flow_monitor_202_while_pending_200_when_terminal(start):
    """Flow style answers 202 with Location and Retry-After while queued or running, 200 with the job when done."""
    client, _ = await start(protocol={"monitor": "flow"}, queue={"workers": 1})
    blocker = await submit(client, "block", {"seconds": 30})
    await wait_status(client, blocker["id"], "running")
    queued = await submit(client, "echo", {"f": 1})
    for job_id, status in ((blocker["id"], "running"), (queued["id"], "queued")):
        resp = await client.get(f"/jobs/{job_id}", allow_redirects=False)
        assert resp.status == 202, await resp.text()
        assert path_of(resp.headers.get("Location")) == f"/jobs/{job_id}"
        assert_retry_after(resp)
        assert_job_headers(resp)
        assert (await resp.json())["status"] == status
    await cancel(client, blocker["id"])

    resp, _ = await poll(client, f"/jobs/{queued['id']}", lambda r, t: r.status != 202)
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "succeeded" and body["result"] == {"f": 1}
    assert "Retry-After" not in resp.headers

    failed = await submit(client, "fail", {"message": "flow failure"})
    resp, _ = await poll(client, f"/jobs/{failed['id']}", lambda r, t: r.status != 202)
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "failed"
    assert body["error"] == {"type": "exception", "message": "flow failure"}


# -- 6. the result resource --------------------------------------------------------------

async def test_result_of_succeeded_job_is_its_json(start):
    """The result of a succeeded job is 200 with the handler's JSON value."""
    client, _ = await start()
    job = await submit(client, "echo", {"list": [1, 2], "s": "ü"})
    await wait_status(client, job["id"], "succeeded")
    resp = await client.get(f"/jobs/{job['id']}/result")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert await resp.json() == {"list": [1, 2], "s": "ü"}

    noop = await submit(client, "noop")
    await wait_status(client, noop["id"], "succeeded")
    resp = await client.get(f"/jobs/{noop['id']}/result")
    assert resp.status == 200 and await resp.json() is None

    # A client that holds the result's ETag is told it has not changed (RFC 9110 13.1.2).
    resp = await client.get(f"/jobs/{job['id']}/result")
    again = await client.get(f"/jobs/{job['id']}/result", headers={"If-None-Match": resp.headers["ETag"]})
    assert again.status == 304 and await again.read() == b""
    assert again.headers["ETag"] == resp.headers["ETag"] and again.headers["Cache-Control"] == "no-store"


async def test_result_of_binary_job_is_bytes_with_its_content_type(start):
    """A handler returning bytes has them served as the result with its own content type."""
    client, _ = await start()
    job = await submit(client, "binary")
    await wait_status(client, job["id"], "succeeded")
    resp = await client.get(f"/jobs/{job['id']}/result")
    assert resp.status == 200
    assert resp.content_type == "image/png"
    assert await resp.read() == b"\x89PNG fake image"


async def test_result_while_pending_is_404_with_retry_after(start):
    """Before the job finishes its result answers 404 with Retry-After and ``job_status``."""
    client, _ = await start(queue={"workers": 1})
    blocker = await occupy_worker(client)
    queued = await submit(client, "echo")
    for job_id, status in ((blocker["id"], "running"), (queued["id"], "queued")):
        resp = await client.get(f"/jobs/{job_id}/result")
        problem = await read_problem(resp, 404)
        assert problem["job_status"] == status
        assert_retry_after(resp)
    await cancel(client, blocker["id"])
    await wait_status(client, queued["id"], "succeeded")


async def test_result_of_failed_or_canceled_job_is_409(start):
    """A failed or canceled job's result answers 409 with ``job_status`` and ``error``."""
    client, _ = await start()
    failed = await submit(client, "fail", {"message": "no result"})
    await wait_status(client, failed["id"], "failed")
    problem = await read_problem(await client.get(f"/jobs/{failed['id']}/result"), 409)
    assert problem["job_status"] == "failed"
    assert problem["error"] == {"type": "exception", "message": "no result"}

    blocked = await submit(client, "block", {"seconds": 30})
    await wait_status(client, blocked["id"], "running")
    await cancel(client, blocked["id"])
    problem = await read_problem(await client.get(f"/jobs/{blocked['id']}/result"), 409)
    assert problem["job_status"] == "canceled"
    assert problem["error"]["type"] == "canceled"


# -- 7. task routes -------------------------------------------------------------------------

async def test_post_task_route_submits_with_body_as_params(start):
    """``POST /thumbnails`` with a JSON body answers 202 like POST /jobs; the result echoes the params."""
    client, _ = await start()
    resp = await client.post("/thumbnails", json={"url": "https://example.com/a.png", "width": 64})
    assert resp.status == 202, await resp.text()
    job = await resp.json()
    assert_job_shape(job)
    assert job["task"] == "thumbnail"
    assert path_of(resp.headers.get("Location")) == f"/jobs/{job['id']}"
    assert path_of(resp.headers.get("Content-Location")) == f"/jobs/{job['id']}"
    assert_retry_after(resp)
    assert_job_headers(resp)
    done = await wait_status(client, job["id"], "succeeded")
    assert done["result"] == {"url": "https://example.com/a.png", "width": 64}


async def test_a_task_on_a_get_route_submits_on_get_and_head_does_not(start):
    """GET on a task's GET route submits (202); HEAD, which must be safe, answers 405 naming GET and makes no
    job (a link checker's HEAD must not start work)."""
    client, _ = await start(tasks={"modules": ["asyncjobs.builtin", "tests.get_route_tasks"]})
    head = await client.head("/lookups/abc")
    assert head.status == 405 and "GET" in head.headers["Allow"]
    assert (await (await client.get("/jobs")).json())["jobs"] == []
    resp = await client.get("/lookups/abc", allow_redirects=False)
    assert resp.status == 202, await resp.text()
    job = await wait_status(client, (await resp.json())["id"], "succeeded")
    assert job["result"] == {"key": "abc"}


async def test_delete_task_route_takes_params_from_path(start):
    """``DELETE /items/{item_id}`` with no body answers 202 and the handler gets ``item_id`` from the path."""
    client, _ = await start()
    resp = await client.delete("/items/abc-123")
    assert resp.status == 202, await resp.text()
    job = await resp.json()
    assert job["task"] == "delete_item"
    assert path_of(resp.headers.get("Location")) == f"/jobs/{job['id']}"
    done = await wait_status(client, job["id"], "succeeded")
    assert done["result"] == {"deleted": "abc-123"}


async def test_task_route_with_bad_params_is_400_with_errors(start):
    """Bad params on a task route get 400 with ``errors`` naming the fields, and nothing is stored."""
    client, _ = await start()
    resp = await client.post("/thumbnails", json={"width": "wide"})
    problem = await read_problem(resp, 400)
    assert {"url", "width"} <= error_fields(problem)
    resp = await client.post("/thumbnails", json={"url": "u", "colour": "red"})
    assert "colour" in error_fields(await read_problem(resp, 400))
    resp = await client.post("/thumbnails", data=b"[1]", headers={"Content-Type": "application/json"})
    await read_problem(resp, 400)
    assert await listed_ids(client) == []


# -- 8. operations ------------------------------------------------------------------------------

async def test_tasks_lists_registered_tasks(start):
    """``GET /tasks`` lists each task with name, route, params schema, timeout and retries."""
    client, _ = await start()
    resp = await client.get("/tasks")
    assert resp.status == 200
    tasks = {t["name"]: t for t in (await resp.json())["tasks"]}
    for name in ("noop", "echo", "sleep", "fail", "hash", "typed", "thumbnail", "delete_item", "slow", "flaky"):
        assert name in tasks, name
        assert {"name", "route", "params_schema", "timeout", "retries"} <= set(tasks[name]), tasks[name]
    assert tasks["thumbnail"]["route"] == {"method": "POST", "path": "/thumbnails"}
    assert tasks["delete_item"]["route"] == {"method": "DELETE", "path": "/items/{item_id}"}
    assert tasks["echo"]["route"] is None
    assert tasks["slow"]["timeout"] == 0.3
    assert tasks["echo"]["timeout"] is None
    assert tasks["flaky"]["retries"] == 2 and tasks["echo"]["retries"] == 0
    typed = tasks["typed"]["params_schema"]
    assert typed["type"] == "object"
    assert set(typed["required"]) == {"name", "count"}
    assert typed["properties"]["mode"]["enum"] == ["a", "b"]


async def test_healthz_answers_200(start):
    """``GET /healthz`` answers 200 and names this node (the holder of its running jobs' leases) and the
    state of its store and feed; 503 while the store does not answer."""
    client, app = await start()
    resp = await client.get("/healthz")
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "ok" and body["node"] == app.queue.node and str(os.getpid()) in body["node"]
    assert (body["store"], body["feed"]) == ("up", "up")
    await app.store.close()  # the store stops answering: 503, and the node says so
    resp = await client.get("/healthz")
    assert resp.status == 503 and resp.headers["Retry-After"] == "5"
    body = await resp.json()
    assert (body["status"], body["store"]) == ("unavailable", "down")


# -- 9. aiohttp's own errors ---------------------------------------------------------------------

async def test_unknown_path_is_404_problem(start):
    """A path no route serves answers 404 as problem details, not HTML."""
    client, _ = await start()
    await read_problem(await client.get("/no/such/thing"), 404)


@pytest.mark.parametrize("method,path,allowed", [
    ("PUT", "/jobs", {"GET", "POST"}),
    ("PATCH", "/jobs", {"GET", "POST"}),
    ("GET", "/jobs/{id}/cancel", {"POST"}),
    ("POST", "/jobs/{id}/result", {"GET"}),
])
async def test_wrong_method_is_405_problem_with_allow(start, method, path, allowed):
    """A known path with the wrong method answers 405 problem details with an Allow header."""
    client, _ = await start()
    job = await submit(client, "noop")
    resp = await client.request(method, path.replace("{id}", job["id"]), allow_redirects=False)
    await read_problem(resp, 405)
    allow = {m.strip() for m in resp.headers.get("Allow", "").split(",") if m.strip()}
    assert allowed <= allow, resp.headers.get("Allow")


# -- 10. handler outcomes ---------------------------------------------------------------------------

async def assert_final_bodies_clean(client, job_id: str) -> None:
    for path in (f"/jobs/{job_id}", f"/jobs/{job_id}/result", "/jobs?limit=500"):
        assert_no_traceback(await (await client.get(path, allow_redirects=False)).text())


async def test_fail_task_fails_with_exception_error(start):
    """The ``fail`` builtin fails its job with error type exception and the given message."""
    client, _ = await start()
    job = await submit(client, "fail", {"message": "deliberate"})
    done = await wait_status(client, job["id"], {"failed", "succeeded"})
    assert done["status"] == "failed"
    assert done["error"] == {"type": "exception", "message": "deliberate"}
    assert done["attempts"] == 1
    await assert_final_bodies_clean(client, job["id"])


async def test_task_failure_carries_handler_chosen_type(start):
    """A handler raising ``TaskFailure(type=...)`` fails the job with that error type and message."""
    client, _ = await start()
    job = await submit(client, "custom_error")
    done = await wait_status(client, job["id"], {"failed", "succeeded"})
    assert done["error"] == {"type": "upstream_rejected", "message": "the input was rejected upstream"}
    await assert_final_bodies_clean(client, job["id"])


async def test_handler_over_its_timeout_fails_with_timeout(start):
    """A handler running past its task's timeout fails the job with error type timeout."""
    client, _ = await start()
    started = time.monotonic()
    job = await submit(client, "slow", {"seconds": 30})
    done = await wait_status(client, job["id"], {"failed", "succeeded"})
    assert done["status"] == "failed"
    assert done["error"]["type"] == "timeout"
    assert isinstance(done["error"]["message"], str)
    assert time.monotonic() - started < 10
    await assert_final_bodies_clean(client, job["id"])


async def test_flaky_task_succeeds_on_a_retry(start):
    """A task with retries that fails once succeeds on its second attempt, and ``attempts`` says 2."""
    client, _ = await start()
    key = uuid.uuid4().hex
    job = await submit(client, "flaky", {"key": key, "fail_times": 1})
    done = await wait_status(client, job["id"], {"failed", "succeeded"})
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    assert done["result"] == {"attempt": 2}
    assert done["error"] is None


async def test_flaky_task_fails_after_its_attempts_run_out(start):
    """A task failing more often than it may retry fails after 1 + retries attempts with type exception."""
    client, _ = await start()
    key = uuid.uuid4().hex
    job = await submit(client, "flaky", {"key": key, "fail_times": 5})
    done = await wait_status(client, job["id"], {"failed", "succeeded"})
    assert done["status"] == "failed", done
    assert done["attempts"] == 3
    assert done["error"]["type"] == "exception"
    assert "flaky failure 3" in done["error"]["message"]
    await assert_final_bodies_clean(client, job["id"])


# -- 11. hash ----------------------------------------------------------------------------------------

async def test_hash_returns_iterated_sha256(start):
    """The ``hash`` builtin returns the hex digest of iterated SHA-256."""
    client, _ = await start()
    for data, rounds in (("hello", 1), ("asyncjobs", 1000)):
        job = await submit(client, "hash", {"data": data, "rounds": rounds})
        done = await wait_status(client, job["id"], "succeeded")
        assert done["result"] == iterated_sha256(data, rounds)
    assert iterated_sha256("hello", 1) == hashlib.sha256(b"hello").hexdigest()


async def test_healthz_answers_while_a_large_hash_runs(start):
    """A CPU-bound hash job runs off the event loop: ``/healthz`` keeps answering quickly meanwhile."""
    client, _ = await start()
    rounds = 2_000_000
    job = await submit(client, "hash", {"data": "load", "rounds": rounds})
    await wait_status(client, job["id"], {"running", "succeeded"})
    latencies: list[float] = []
    while True:
        t0 = time.monotonic()
        health = await client.get("/healthz")
        latencies.append(time.monotonic() - t0)
        assert health.status == 200
        body = await (await client.get(f"/jobs/{job['id']}", allow_redirects=False)).json()
        if body["status"] != "running":
            break
        await asyncio.sleep(0.02)
    assert body["status"] == "succeeded", body
    assert re.fullmatch(r"[0-9a-f]{64}", body["result"]), body["result"]
    assert max(latencies) < 1.0, latencies


# -- 12. priority ------------------------------------------------------------------------------------

async def test_higher_priority_runs_first_then_submission_order(start):
    """With one worker, queued jobs run by priority (higher first), then in submission order."""
    client, _ = await start(queue={"workers": 1})
    blocker = await occupy_worker(client)
    submitted = []
    for label, priority in (("a", 0), ("b", 5), ("c", 0), ("d", 10), ("e", 5), ("f", -1), ("g", 10)):
        job = await submit(client, "echo", {"label": label}, priority=priority)
        assert job["priority"] == priority
        submitted.append(job)
    await cancel(client, blocker["id"])
    finished = [await wait_status(client, job["id"], "succeeded") for job in submitted]
    by_label = {job["result"]["label"]: job for job in finished}
    expected = ["d", "g", "b", "e", "a", "c", "f"]
    starts = [assert_time(by_label[label]["started_at"]) for label in expected]
    ends = [assert_time(by_label[label]["finished_at"]) for label in expected]
    # One worker: each job starts no earlier than the previous one finished.
    assert ends == sorted(ends), list(zip(expected, ends))
    for prev_end, next_start in zip(ends, starts[1:]):
        assert next_start >= prev_end
