"""Bearer-token auth and isolation between principals, on every endpoint and every push channel."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any, Callable

import aiohttp
import pytest

from asyncjobs import App
from asyncjobs.errors import ConfigError
from asyncjobs.web import common
from asyncjobs.web.common import find_principal
from tests.conftest import ROOT, TEST_MODULES, make_config, recv, recv_until, wait_status

PROBLEM = "application/problem+json"
ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789ab"
TOKENS = {"alice": ALICE, "bob": BOB}


# -- helpers -------------------------------------------------------------------

def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def start(make_client):
    """An App with alice and bob as principals and a short shutdown grace (blocked jobs end quickly)."""

    async def start_(**sections: dict[str, Any]):
        queue = {"shutdown_grace": 0.2, **sections.pop("queue", {})}
        return await make_client(auth={"tokens": TOKENS}, queue=queue, **sections)

    return start_


async def submit_as(client, token: str, task: str, params: dict | None = None,
                    headers: dict[str, str] | None = None, **extra: Any) -> dict:
    resp = await client.post("/jobs", json={"task": task, "params": params or {}, **extra},
                             headers={**bearer(token), **(headers or {})})
    assert resp.status == 202, await resp.text()
    return await resp.json()


async def wait_as(client, token: str, job_id: str, statuses: set[str] | str, timeout_s: float = 10.0) -> dict:
    """Poll the monitor as ``token``'s principal until the job reaches one of ``statuses``."""
    return await wait_status(client, job_id, statuses, timeout_s, headers=bearer(token))


async def assert_problem(resp: aiohttp.ClientResponse, status: int, what: str) -> dict:
    text = await resp.text()
    assert resp.status == status, f"{what}: {resp.status} {text}"
    assert resp.content_type == PROBLEM, f"{what}: {resp.content_type}"
    body = json.loads(text)
    assert body["status"] == status, f"{what}: {body}"
    return body


async def assert_unauthorized(resp: aiohttp.ClientResponse, what: str) -> None:
    await assert_problem(resp, 401, what)
    challenge = resp.headers.get("WWW-Authenticate", "")
    assert challenge.split(" ")[0].lower() == "bearer", f"{what}: WWW-Authenticate {challenge!r}"


async def list_ids(client, token: str, url: str = "/jobs") -> tuple[list[str], str | None]:
    resp = await client.get(url, headers=bearer(token))
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    return [job["id"] for job in body["jobs"]], body["next"]




def is_final(job_id: str) -> Callable[[dict], bool]:
    return lambda f: f.get("type") == "job" and f["job"]["id"] == job_id and f["job"]["status"] == "succeeded"


def job_ids_in(frames: list[dict]) -> set[str]:
    return {f["job"]["id"] for f in frames if f.get("type") == "job"}


async def read_sse_events(resp: aiohttp.ClientResponse, timeout_s: float = 10.0) -> list[dict]:
    """The jobs of every event until the server ends the stream."""
    events, data = [], []
    async with asyncio.timeout(timeout_s):
        while raw := await resp.content.readline():
            line = raw.decode().rstrip("\r\n")
            if line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and data:
                events.append(json.loads("\n".join(data)))
                data = []
    return events


def endpoints(job_id: str) -> list[tuple[str, str, dict | None]]:
    """Every protected endpoint (method, path, JSON body), on a job that exists."""
    return [
        ("POST", "/jobs", {"task": "echo", "params": {"n": 1}}),
        ("GET", "/jobs", None),
        ("GET", f"/jobs/{job_id}", None),
        ("GET", f"/jobs/{job_id}?wait=1", None),
        ("DELETE", f"/jobs/{job_id}", None),
        ("GET", f"/jobs/{job_id}/result", None),
        ("POST", f"/jobs/{job_id}/cancel", None),
        ("GET", f"/jobs/{job_id}/events", None),
        ("GET", "/ws", None),
        ("GET", "/tasks", None),
        ("POST", "/thumbnails", {"url": "http://example.com/a.png"}),
        ("DELETE", "/items/abc", None),
    ]


# -- 1. 401 everywhere but /healthz ------------------------------------------------

BAD_CREDENTIALS = {
    "no token": {},
    "wrong token": bearer("mallory-token-0123456789"),
    "token of a prefix": bearer(ALICE[:-1]),
    "empty bearer": {"Authorization": "Bearer "},
    "bare scheme": {"Authorization": "Bearer"},
    "basic scheme": {"Authorization": "Basic YWxpY2U6YWxpY2UtdG9rZW4tMDEyMzQ1Njc4OQ=="},
    "token without scheme": {"Authorization": ALICE},
}


@pytest.mark.parametrize("credentials", BAD_CREDENTIALS.values(), ids=BAD_CREDENTIALS.keys())
async def test_every_endpoint_but_healthz_answers_401_without_a_valid_bearer_token(start, credentials):
    """Each endpoint (task routes included) answers a 401 problem with a Bearer challenge and does nothing."""
    client, _ = await start()
    job = await submit_as(client, ALICE, "block", {"seconds": 30})
    await wait_as(client, ALICE, job["id"], "running")
    presented = credentials in (BAD_CREDENTIALS["wrong token"], BAD_CREDENTIALS["token of a prefix"])
    for method, path, body in endpoints(job["id"]):
        resp = await client.request(method, path, json=body, headers=credentials)
        await assert_unauthorized(resp, f"{method} {path}")
        # RFC 6750, 3.1: a token presented and refused is invalid_token; no error code when none came
        assert ('error="invalid_token"' in resp.headers["WWW-Authenticate"]) == presented, resp.headers
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/ws", headers=credentials)
    assert refused.value.status == 401
    health = await client.get("/healthz", headers=credentials)
    assert health.status == 200, await health.text()
    # Nothing the refused requests asked for happened.
    assert (await wait_as(client, ALICE, job["id"], "running"))["status"] == "running"
    assert (await list_ids(client, ALICE))[0] == [job["id"]]
    assert (await list_ids(client, BOB))[0] == []


async def test_a_result_that_holds_markup_runs_no_script_in_this_sites_origin(start):
    """A task returns what a user gave as its result bytes (here an SVG picture with a script). Opened in a
    browser, the result is not sniffed as another type and is a sandboxed document: its script cannot act
    with the viewer's session. The same goes for a file result and for a JSON one."""
    client, _ = await start()
    headers = {"Authorization": f"Bearer {ALICE}"}
    for task, params in (("markup", {"text": "hi"}), ("echo", {"n": 1}), ("bytes", {"size": 300_001, "seed": "x"})):
        job = await submit_as(client, ALICE, task, params)
        await wait_status(client, job["id"], "succeeded", headers=headers)
        resp = await client.get(f"/jobs/{job['id']}/result", headers=headers)
        assert resp.status == 200, task
        assert resp.headers["X-Content-Type-Options"] == "nosniff", task
        assert resp.headers["Content-Security-Policy"] == "sandbox", task
    assert resp.headers["Content-Disposition"].startswith("attachment")  # a file result is a download


async def test_healthz_needs_no_token_and_valid_tokens_are_accepted(start):
    """/healthz answers 200 without a token; each principal's token (scheme in any case) is accepted."""
    client, _ = await start()
    resp = await client.get("/healthz")
    assert resp.status == 200, await resp.text()
    for headers in (bearer(ALICE), bearer(BOB), {"Authorization": f"bearer {ALICE}"}):
        resp = await client.get("/tasks", headers=headers)
        assert resp.status == 200, (headers, await resp.text())


# -- 2. isolation ------------------------------------------------------------------

async def test_another_principals_jobs_answer_404_on_every_job_endpoint(start):
    """Bob gets an unknown id's 404 on every endpoint of alice's jobs, and his cancel and delete change nothing."""
    client, _ = await start()
    running = await submit_as(client, ALICE, "block", {"seconds": 30})
    done = await submit_as(client, ALICE, "echo", {"secret": "alice's"})
    await wait_as(client, ALICE, running["id"], "running")
    await wait_as(client, ALICE, done["id"], "succeeded")
    unknown = "A" * 22
    for job_id in (running["id"], done["id"], unknown):
        requests = [
            ("GET", f"/jobs/{job_id}", {}),
            ("GET", f"/jobs/{job_id}?redirect=false", {}),
            ("GET", f"/jobs/{job_id}?wait=1", {}),
            ("GET", f"/jobs/{job_id}", {"Prefer": "wait=1"}),
            ("GET", f"/jobs/{job_id}/result", {}),
            ("POST", f"/jobs/{job_id}/cancel", {}),
            ("DELETE", f"/jobs/{job_id}", {}),
            ("GET", f"/jobs/{job_id}/events", {}),
        ]
        for method, path, headers in requests:
            resp = await client.request(method, path, headers={**bearer(BOB), **headers}, allow_redirects=False)
            body = await assert_problem(resp, 404, f"bob {method} {path}")
            assert "job_status" not in body and "error" not in body, (path, body)
            assert "Retry-After" not in resp.headers and "ETag" not in resp.headers, (path, dict(resp.headers))
            assert "alice" not in json.dumps(body), body
    # Bob's cancel and delete did nothing: alice still has both, as they were.
    assert (await wait_as(client, ALICE, running["id"], "running"))["status"] == "running"
    result = await client.get(f"/jobs/{done['id']}/result", headers=bearer(ALICE))
    assert result.status == 200 and await result.json() == {"secret": "alice's"}
    cancel = await client.post(f"/jobs/{running['id']}/cancel", headers=bearer(ALICE))
    assert cancel.status == 200 and (await cancel.json())["status"] == "canceled", await cancel.text()


async def test_list_shows_each_principal_only_its_own_jobs_through_filters_and_pages(start):
    """GET /jobs, with any filter, limit or cursor (even alice's), lists only the caller's own jobs."""
    client, _ = await start()
    bob_first = await submit_as(client, BOB, "echo", {"who": "bob"})
    alice_jobs = [await submit_as(client, ALICE, "echo", {"n": n}) for n in range(3)]
    alice_running = await submit_as(client, ALICE, "block", {"seconds": 30})
    for job in alice_jobs:
        await wait_as(client, ALICE, job["id"], "succeeded")
    await wait_as(client, BOB, bob_first["id"], "succeeded")
    await wait_as(client, ALICE, alice_running["id"], "running")
    alice_ids = {job["id"] for job in alice_jobs} | {alice_running["id"]}

    for url in ("/jobs", "/jobs?status=succeeded", "/jobs?task=echo", "/jobs?limit=1",
                "/jobs?status=running", "/jobs?task=block", "/jobs?status=succeeded&task=echo&limit=500"):
        ids, _ = await list_ids(client, BOB, url)
        assert not alice_ids & set(ids), (url, ids)
    assert (await list_ids(client, BOB))[0] == [bob_first["id"]]
    assert (await list_ids(client, BOB, "/jobs?status=running"))[0] == []
    assert (await list_ids(client, BOB, "/jobs?limit=1")) == ([bob_first["id"]], None)

    # Alice pages through her own four jobs; bob replays each of her cursors and sees only his.
    seen, url = [], "/jobs?limit=1"
    for _ in range(10):
        ids, next_url = await list_ids(client, ALICE, url)
        seen += ids
        if next_url is None:
            break
        bob_ids, _ = await list_ids(client, BOB, next_url)
        assert set(bob_ids) <= {bob_first["id"]}, (next_url, bob_ids)
        url = next_url
    assert set(seen) == alice_ids and len(seen) == 4, seen


async def test_websocket_subscribe_to_another_principals_job_gets_a_404_frame(start):
    """Bob's subscribe to alice's ids (running or finished) answers an error 404 frame and never sends her job."""
    client, _ = await start()
    running = await submit_as(client, ALICE, "block", {"seconds": 30})
    done = await submit_as(client, ALICE, "echo", {"n": 1})
    await wait_as(client, ALICE, done["id"], "succeeded")
    await wait_as(client, ALICE, running["id"], "running")
    mine = await submit_as(client, BOB, "echo", {"n": 2})
    async with client.ws_connect("/ws", headers=bearer(BOB)) as ws:
        await ws.send_json({"op": "subscribe", "jobs": [running["id"], done["id"], mine["id"]], "progress": True})
        frames = await recv_until(ws, is_final(mine["id"]))
        subscribed = [f for f in frames if f["type"] == "subscribed"]
        assert subscribed and subscribed[0]["jobs"] == [mine["id"]], frames
        errors = {f["id"]: f for f in frames if f["type"] == "error"}
        assert set(errors) == {running["id"], done["id"]}, frames
        assert all(e["status"] == 404 for e in errors.values()), errors
        assert job_ids_in(frames) == {mine["id"]}, frames
        # Alice's running job ends now; bob hears nothing of it.
        cancel = await client.post(f"/jobs/{running['id']}/cancel", headers=bearer(ALICE))
        assert cancel.status == 200, await cancel.text()
        probe = await submit_as(client, BOB, "echo", {"n": 3})
        await ws.send_json({"op": "subscribe", "jobs": [probe["id"]]})
        frames = await recv_until(ws, is_final(probe["id"]))
        assert job_ids_in(frames) == {probe["id"]}, frames


async def test_websocket_star_carries_only_the_callers_own_jobs(start):
    """A "*" subscription gets every change of the caller's jobs and none of another principal's."""
    client, _ = await start()
    async with client.ws_connect("/ws", headers=bearer(ALICE)) as alice_ws, \
            client.ws_connect("/ws", headers=bearer(BOB)) as bob_ws:
        for ws in (alice_ws, bob_ws):
            await ws.send_json({"op": "subscribe", "jobs": "*", "progress": True})
            assert (await recv(ws))["type"] == "subscribed"
        alice_1 = await submit_as(client, ALICE, "sleep", {"seconds": 0.1, "steps": 3})
        await wait_as(client, ALICE, alice_1["id"], "succeeded")
        bob_1 = await submit_as(client, BOB, "sleep", {"seconds": 0.1, "steps": 3})
        # Changes reach a socket in order: by bob's final frame, alice's earlier ones would have come.
        bob_frames = await recv_until(bob_ws, is_final(bob_1["id"]))
        assert job_ids_in(bob_frames) == {bob_1["id"]}, bob_frames
        assert {f["job"]["status"] for f in bob_frames if f["type"] == "job"} >= {"running", "succeeded"}
        alice_2 = await submit_as(client, ALICE, "echo", {"n": 2})
        alice_frames = await recv_until(alice_ws, is_final(alice_2["id"]))
        assert job_ids_in(alice_frames) == {alice_1["id"], alice_2["id"]}, alice_frames


async def test_events_stream_of_own_job_works_and_of_anothers_is_404(start):
    """SSE answers the owner with the job's events and anyone else with a 404 before any stream."""
    client, _ = await start()
    job = await submit_as(client, ALICE, "echo", {"n": 1})
    resp = await client.get(f"/jobs/{job['id']}/events", headers=bearer(ALICE))
    assert resp.status == 200 and resp.content_type == "text/event-stream", await resp.text()
    events = await read_sse_events(resp)
    assert events and events[-1]["status"] == "succeeded", events
    resp = await client.get(f"/jobs/{job['id']}/events", headers=bearer(BOB))
    await assert_problem(resp, 404, "bob's events of alice's job")


async def test_submit_with_prefer_wait_is_unaffected_by_another_principals_jobs(start):
    """Bob's Prefer: wait submit answers 201 with his own result while alice's jobs run."""
    client, _ = await start()
    alice = await submit_as(client, ALICE, "block", {"seconds": 30})
    await wait_as(client, ALICE, alice["id"], "running")
    resp = await client.post("/jobs", json={"task": "echo", "params": {"who": "bob"}},
                             headers={**bearer(BOB), "Prefer": "wait=5"}, allow_redirects=False)
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    assert body["result"] == {"who": "bob"} and body["id"] != alice["id"]
    assert resp.headers["Location"] == f"/jobs/{body['id']}/result"
    assert (await list_ids(client, BOB))[0] == [body["id"]]


async def test_unique_tasks_do_not_cross_principals(start):
    """Equal params of a unique task share a live job within a principal (303) but never across principals (202)."""
    client, _ = await start()
    params = {"key": "same", "seconds": 5}
    alice = await submit_as(client, ALICE, "dedupe", params)
    bob = await submit_as(client, BOB, "dedupe", params)
    assert bob["id"] != alice["id"]
    for token, own in ((ALICE, alice), (BOB, bob)):
        resp = await client.post("/jobs", json={"task": "dedupe", "params": params}, headers=bearer(token),
                                 allow_redirects=False)
        assert resp.status == 303, await resp.text()
        assert resp.headers["Location"] == f"/jobs/{own['id']}"
    assert (await list_ids(client, BOB))[0] == [bob["id"]]


async def test_idempotency_keys_do_not_cross_principals(start):
    """The same Idempotency-Key replays within a principal but is a fresh key for another principal."""
    client, _ = await start()
    key = {"Idempotency-Key": "order-42"}
    alice = await submit_as(client, ALICE, "echo", {"n": 1}, headers=key)
    resp = await client.post("/jobs", json={"task": "echo", "params": {"n": 1}}, headers={**bearer(BOB), **key})
    assert resp.status == 202, await resp.text()
    assert "Idempotent-Replayed" not in resp.headers
    bob = await resp.json()
    assert bob["id"] != alice["id"]
    # Each principal's repeat replays its own job; another body is a 422 only against one's own key.
    resp = await client.post("/jobs", json={"task": "echo", "params": {"n": 1}}, headers={**bearer(BOB), **key})
    assert resp.status == 202 and resp.headers.get("Idempotent-Replayed") == "true", await resp.text()
    assert (await resp.json())["id"] == bob["id"]
    resp = await client.post("/jobs", json={"task": "echo", "params": {"n": 1}}, headers={**bearer(ALICE), **key})
    assert resp.status == 202 and resp.headers.get("Idempotent-Replayed") == "true", await resp.text()
    assert (await resp.json())["id"] == alice["id"]
    resp = await client.post("/jobs", json={"task": "echo", "params": {"n": 2}}, headers={**bearer(ALICE), **key})
    await assert_problem(resp, 422, "alice reusing her key with another body")
    # A key alice used is free for bob with any body: no 422 from her request's fingerprint.
    other = {"Idempotency-Key": "order-43"}
    alice_2 = await submit_as(client, ALICE, "echo", {"n": 3}, headers=other)
    resp = await client.post("/jobs", json={"task": "echo", "params": {"n": 4}}, headers={**bearer(BOB), **other})
    assert resp.status == 202 and "Idempotent-Replayed" not in resp.headers, await resp.text()
    bob_2 = await resp.json()
    assert bob_2["id"] != alice_2["id"]
    assert sorted((await list_ids(client, ALICE))[0]) == sorted([alice["id"], alice_2["id"]])
    assert sorted((await list_ids(client, BOB))[0]) == sorted([bob["id"], bob_2["id"]])


async def test_an_expired_job_is_404_not_410_to_another_principal(start):
    """A tombstone answers 410 to its owner and 404 to anyone else, so nobody learns that the id existed."""
    client, _ = await start(jobs={"retention": 0.3})
    job = await submit_as(client, ALICE, "echo", {"n": 1})
    deadline = time.monotonic() + 10
    while (resp := await client.get(f"/jobs/{job['id']}", headers=bearer(ALICE))).status != 410:
        assert time.monotonic() < deadline, f"alice's job never became a tombstone: {resp.status}"
        await asyncio.sleep(0.05)
    for path in (f"/jobs/{job['id']}", f"/jobs/{job['id']}/result", f"/jobs/{job['id']}/events"):
        await assert_problem(await client.get(path, headers=bearer(BOB)), 404, f"bob GET {path}")


# -- 3. ?access_token= only where browsers need it -------------------------------------

async def test_access_token_query_works_for_websocket_and_event_stream(start):
    """Browsers' ?access_token= authenticates /ws and /jobs/{id}/events as its principal, isolation included."""
    client, _ = await start()
    job = await submit_as(client, ALICE, "echo", {"n": 1})
    await wait_as(client, ALICE, job["id"], "succeeded")

    async with client.ws_connect(f"/ws?access_token={ALICE}") as ws:
        await ws.send_json({"op": "subscribe", "jobs": [job["id"]]})
        frames = await recv_until(ws, is_final(job["id"]))
        assert frames[0] == {"type": "subscribed", "jobs": [job["id"]]}, frames
    async with client.ws_connect(f"/ws?access_token={BOB}") as ws:
        await ws.send_json({"op": "subscribe", "jobs": [job["id"]]})
        frames = await recv_until(ws, lambda f: f["type"] == "error")
        assert frames[-1]["status"] == 404 and frames[-1]["id"] == job["id"], frames
        assert job_ids_in(frames) == set()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/ws?access_token=mallory-token-0123456789")
    assert refused.value.status == 401

    resp = await client.get(f"/jobs/{job['id']}/events", params={"access_token": ALICE})
    assert resp.status == 200, await resp.text()
    assert (await read_sse_events(resp))[-1]["status"] == "succeeded"
    resp = await client.get(f"/jobs/{job['id']}/events", params={"access_token": BOB})
    await assert_problem(resp, 404, "bob's access_token on alice's events")
    resp = await client.get(f"/jobs/{job['id']}/events", params={"access_token": "mallory-token-0123456789"})
    await assert_unauthorized(resp, "a wrong access_token on events")


async def test_access_token_query_is_refused_on_other_endpoints(start):
    """?access_token= is not a credential for the REST endpoints: they answer 401."""
    client, _ = await start()
    job = await submit_as(client, ALICE, "echo", {"n": 1})
    await wait_as(client, ALICE, job["id"], "succeeded")
    for method, path, body in endpoints(job["id"]):
        if path.endswith(("/events", "/ws")):
            continue
        sep = "&" if "?" in path else "?"
        resp = await client.request(method, f"{path}{sep}access_token={ALICE}", json=body)
        await assert_unauthorized(resp, f"{method} {path} with ?access_token=")
    # Nor on a route whose path merely ends as theirs do: a task route's DELETE /items/ws submits a job.
    for path in ("/items/ws", "/items/events"):
        await assert_unauthorized(await client.delete(f"{path}?access_token={ALICE}"), f"DELETE {path}")
    assert (await list_ids(client, ALICE))[0] == [job["id"]]  # the refused POSTs stored nothing


# -- 4. configuration ------------------------------------------------------------------

@pytest.mark.parametrize("tokens, key", [
    ({"alice": "short-token"}, "auth.tokens.alice"),
    ({"alice": ALICE, "bob": "b" * 15}, "auth.tokens.bob"),
    ({"alice": ALICE, "bob": ALICE}, "auth.tokens."),
], ids=["short", "short second", "shared"])
def test_weak_or_shared_tokens_stop_the_app(tmp_path, tokens, key):
    """A token under 16 characters, or one token for two principals, is a ConfigError naming the key."""
    with pytest.raises(ConfigError) as error:
        App(make_config(tmp_path, auth={"tokens": tokens}))
    message = str(error.value)
    assert key in message, message
    if key == "auth.tokens.":
        assert "auth.tokens.alice" in message or "auth.tokens.bob" in message, message
        assert ALICE not in message, "the error must not print the token"


def _config_text(tokens: dict[str, str]) -> str:
    modules = json.dumps(TEST_MODULES)
    lines = [f"[tasks]\nmodules = {modules}\n", "[auth.tokens]"]
    lines += [f'{principal} = "{token}"' for principal, token in tokens.items()]
    return "\n".join(lines) + "\n"


async def test_served_process_enforces_tokens(server_factory, http):
    """`asyncjobs serve` with [auth] tokens in its config refuses requests without a valid token."""
    server = await asyncio.to_thread(server_factory, config_text=_config_text(TOKENS))
    async with http.get(f"{server.url}/healthz") as resp:
        assert resp.status == 200
    async with http.get(f"{server.url}/jobs") as resp:
        await assert_unauthorized(resp, "GET /jobs without a token")
    async with http.post(f"{server.url}/jobs", json={"task": "echo", "params": {"n": 1}},
                         headers=bearer(BOB)) as resp:
        assert resp.status == 202, await resp.text()
        job = await resp.json()
    async with http.get(f"{server.url}/jobs/{job['id']}", headers=bearer(ALICE)) as resp:
        await assert_problem(resp, 404, "alice reading bob's job")
    async with http.get(f"{server.url}/jobs/{job['id']}?redirect=false", headers=bearer(BOB)) as resp:
        assert resp.status == 200, await resp.text()


def test_served_process_refuses_a_short_token(tmp_path):
    """`asyncjobs serve` stops at start with a message naming the short token's key."""
    config = tmp_path / "config.toml"
    config.write_text(_config_text({"alice": "short"}))
    done = subprocess.run([sys.executable, "-m", "asyncjobs", "serve", "--config", str(config), "--host", "127.0.0.1",
                           "--port", "0", "--db", str(tmp_path / "db.sqlite")],
                          cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": ""}, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "auth.tokens.alice" in done.stderr, done.stderr


# -- 5. find_principal ---------------------------------------------------------------

def test_find_principal_maps_tokens_to_principals():
    """find_principal returns the principal of an exact token and None for anything else."""
    tokens = tuple((p, t.encode()) for p, t in TOKENS.items())
    assert find_principal(tokens, ALICE) == "alice"
    assert find_principal(tokens, BOB) == "bob"
    for other in ("", "mallory-token-0123456789", ALICE[:-1], ALICE + "x", ALICE.upper(), f" {ALICE}", "ålice"):
        assert find_principal(tokens, other) is None, other
    assert find_principal((), ALICE) is None


def test_find_principal_compares_every_token_even_after_a_match(monkeypatch):
    """The lookup does not stop at the first match, and compares with hmac.compare_digest, so timing tells nothing."""
    calls: list[tuple[bytes, bytes]] = []
    real = common.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(common.hmac, "compare_digest", spy)
    tokens = tuple((f"p{i}", f"token-number-{i:04d}-xxxx".encode()) for i in range(5))
    for presented, expected in (("token-number-0000-xxxx", "p0"), ("token-number-0004-xxxx", "p4"),
                                ("nobody-has-this-token", None)):
        calls.clear()
        assert find_principal(tokens, presented) == expected
        assert sorted(b for _, b in calls) == sorted(t for _, t in tokens), presented


# -- 5. with sign-in: what is open, and the bearer token still decides ---------------------------

async def test_only_the_sign_in_routes_and_static_files_are_open_besides_healthz(start):
    client, _ = await start()
    assert (await client.get("/login")).status == 200
    assert (await client.get("/static/app.js")).status == 200
    resp = await client.post("/logout", allow_redirects=False)  # no session: nothing to end
    assert resp.status == 303 and resp.headers["Location"] == "/login"
    for path in ("/", "/jobs", "/tasks", "/metrics", "/openapi.json", "/loginx", "/static"):
        await assert_unauthorized(await client.get(path), path)


async def test_a_bearer_token_decides_alone_whatever_cookie_comes_with_it(start):
    client, _ = await start()
    resp = await client.post("/login", data={"token": ALICE, "next": "/"}, allow_redirects=False)
    assert resp.status == 303
    session = resp.cookies["asyncjobs_session"].value
    client.session.cookie_jar.clear()
    headers = {"Cookie": f"asyncjobs_session={session}"}
    assert (await client.get("/jobs", headers=headers)).status == 200
    await assert_unauthorized(await client.get("/jobs", headers={**headers, **bearer("mallory-token-0123456789")}),
                              "a wrong token with a valid cookie")
    job = await submit_as(client, BOB, "noop", headers=headers)  # bob's token, alice's cookie: bob's job
    assert job["owner"] == "bob"
