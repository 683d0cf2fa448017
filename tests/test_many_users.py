"""Many callers on one service: reuse of equal requests, quotas, fair dispatch and admins, over HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from tests.conftest import TEST_MODULES, eventually, wait_status

ALICE, BOB, ROOT = "alice-token-0123456789", "bob-token-0123456789ab", "root-token-0123456789ab"
TOKENS = {"alice": ALICE, "bob": BOB, "root": ROOT}

@pytest.fixture
def make_client(make_client):
    """The conftest's, with a short shutdown grace: these tests leave jobs running at their end."""

    async def make(**sections):
        return await make_client(**{**sections, "queue": {"shutdown_grace": 0.2, **sections.get("queue", {})}})

    return make



def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def reusing(**tasks: dict) -> dict:
    """A [tasks] section with the test modules and per-task overrides (``reuse`` etc.)."""
    return {"tasks": {"modules": TEST_MODULES, **tasks}}


async def jobs_of(client, headers: dict[str, str] | None = None, **query: str) -> list[dict]:
    resp = await client.get("/jobs", params={"limit": "500", **query}, headers=headers)
    assert resp.status == 200, await resp.text()
    return (await resp.json())["jobs"]


# -- reuse of equal requests -----------------------------------------------------------

async def test_an_equal_submit_reuses_a_recently_succeeded_job(make_client):
    """With reuse = N, params equal under RFC 8785 (key order, spacing, escapes, 1 vs 1.0) get 303 to the
    job that succeeded, its body, and no new job; other params make a new one."""
    client, _ = await make_client(**reusing(echo={"reuse": 60}))
    first = await client.post("/jobs", json={"task": "echo", "params": {"a": 1, "b": [2.0, "x"]}})
    assert first.status == 202
    job = await wait_status(client, (await first.json())["id"], "succeeded")
    for raw in ('{"task": "echo", "params": {"b": [2, "x"], "a": 1.0}}',
                '{"params":{"\\u0061":1,"b":[2e0,"\\u0078"]},"task":"echo"}'):
        again = await client.post("/jobs", data=raw, headers={"Content-Type": "application/json"},
                                  allow_redirects=False)
        assert again.status == 303, await again.text()
        assert again.headers["Location"] == f"/jobs/{job['id']}"
        assert (await again.json())["id"] == job["id"]
    other = await client.post("/jobs", json={"task": "echo", "params": {"a": 2, "b": [2, "x"]}})
    assert other.status == 202
    assert len(await jobs_of(client)) == 2


async def test_an_idempotency_key_answered_by_reuse_replays_and_refuses_another_body(make_client):
    """A keyed submit answered by an equal job keeps its key: the same request again is that answer with
    Idempotent-Replayed, the same key with another body is 422, and no job is made by either."""
    client, _ = await make_client(**reusing(echo={"reuse": 60}))
    first = await client.post("/jobs", json={"task": "echo", "params": {"n": 7}})
    job = await wait_status(client, (await first.json())["id"], "succeeded")
    keyed = {"Idempotency-Key": "k-77"}
    for attempt in range(2):
        again = await client.post("/jobs", json={"task": "echo", "params": {"n": 7}}, headers=keyed,
                                  allow_redirects=False)
        assert again.status == 303, await again.text()
        assert again.headers["Location"] == f"/jobs/{job['id']}"
        assert again.headers.get("Idempotent-Replayed") == ("true" if attempt else None)
    other = await client.post("/jobs", json={"task": "echo", "params": {"n": 8}}, headers=keyed)
    assert other.status == 422, await other.text()
    assert len(await jobs_of(client)) == 1


async def test_no_cache_forces_a_new_job_and_the_newest_equal_job_is_reused(make_client):
    """Cache-Control: no-cache makes a new job even with an equal one live; later equal submits get the newest."""
    client, _ = await make_client(**reusing(block={"reuse": 60}))
    body = {"task": "block", "params": {"seconds": 30}}
    first = await (await client.post("/jobs", json=body)).json()
    fresh = await client.post("/jobs", json=body, headers={"Cache-Control": "no-cache"})
    assert fresh.status == 202
    newest = await fresh.json()
    assert newest["id"] != first["id"]
    again = await client.post("/jobs", json=body, allow_redirects=False)
    assert again.status == 303 and again.headers["Location"] == f"/jobs/{newest['id']}"


async def test_no_cache_on_a_second_cache_control_line_still_makes_a_new_job(make_client):
    """Several `Cache-Control` field lines are one list (RFC 9110 5.3): `no-cache` on the second counts."""
    client, _ = await make_client(**reusing(block={"reuse": 60}))
    body = {"task": "block", "params": {"seconds": 30}}
    first = await (await client.post("/jobs", json=body)).json()
    fresh = await client.post("/jobs", json=body, headers=[("Cache-Control", "max-age=0"), ("Cache-Control", "no-cache")],
                              allow_redirects=False)
    assert fresh.status == 202
    assert (await fresh.json())["id"] != first["id"]


async def test_prefer_wait_applies_to_the_reused_job(make_client):
    """A reused job that ends within the wait answers 201 as a new one would; one still running, 303."""
    client, _ = await make_client(**reusing(echo={"reuse": 60}, block={"reuse": 60}))
    first = await (await client.post("/jobs", json={"task": "echo", "params": {"k": 1}})).json()
    await wait_status(client, first["id"], "succeeded")
    again = await client.post("/jobs", json={"task": "echo", "params": {"k": 1}}, headers={"Prefer": "wait=5"},
                              allow_redirects=False)
    assert again.status == 201 and (await again.json())["id"] == first["id"]
    running = await (await client.post("/jobs", json={"task": "block", "params": {"seconds": 30}})).json()
    again = await client.post("/jobs", json={"task": "block", "params": {"seconds": 30}},
                              headers={"Prefer": "wait=0.2"}, allow_redirects=False)
    assert again.status == 303 and again.headers["Location"] == f"/jobs/{running['id']}"
    assert again.headers["Preference-Applied"] == "wait=0.2"


async def test_failed_canceled_delayed_callback_and_expired_reuse_make_new_jobs(make_client):
    """Failed and canceled jobs are never reused; a submit with a delay is never equal; past N seconds a
    succeeded job no longer answers."""
    client, _ = await make_client(**reusing(fail={"reuse": 60}, block={"reuse": 60}, echo={"reuse": 0.3}))
    failed = await (await client.post("/jobs", json={"task": "fail", "params": {"message": "x"}})).json()
    await wait_status(client, failed["id"], "failed")
    assert (await client.post("/jobs", json={"task": "fail", "params": {"message": "x"}})).status == 202
    blocked = await (await client.post("/jobs", json={"task": "block", "params": {"seconds": 30}})).json()
    await client.post(f"/jobs/{blocked['id']}/cancel")
    assert (await client.post("/jobs", json={"task": "block", "params": {"seconds": 30}})).status == 202
    delayed = {"task": "block", "params": {"seconds": 30}, "delay": 5}
    assert (await client.post("/jobs", json=delayed)).status == 202
    echo = await (await client.post("/jobs", json={"task": "echo", "params": {"z": 1}})).json()
    await wait_status(client, echo["id"], "succeeded")
    await asyncio.sleep(0.5)
    assert (await client.post("/jobs", json={"task": "echo", "params": {"z": 1}})).status == 202


async def test_racing_equal_submits_make_one_job(make_client):
    """100 equal submits at once: one 202, every other answer a 303 to that job."""
    client, _ = await make_client(**reusing(block={"reuse": 60}))
    answers = await asyncio.gather(*(client.post("/jobs", json={"task": "block", "params": {"seconds": 30}},
                                                 allow_redirects=False) for _ in range(100)))
    statuses = [a.status for a in answers]
    assert statuses.count(202) == 1 and statuses.count(303) == 99, statuses
    assert len(await jobs_of(client)) == 1


async def test_reuse_is_per_principal(make_client):
    """An equal submit of another principal is never answered with this one's job."""
    client, _ = await make_client(auth={"tokens": TOKENS}, **reusing(echo={"reuse": 60}))
    a = await client.post("/jobs", json={"task": "echo", "params": {"p": 1}}, headers=auth(ALICE))
    b = await client.post("/jobs", json={"task": "echo", "params": {"p": 1}}, headers=auth(BOB),
                          allow_redirects=False)
    assert a.status == 202 and b.status == 202
    assert (await a.json())["id"] != (await b.json())["id"]


# -- quotas ---------------------------------------------------------------------------

async def test_max_queued_per_principal_is_429_and_stores_nothing(make_client):
    """Past limits.max_queued_per_principal: 429 + Retry-After (1..60), problem+json, no job; another
    principal is not held back; a replay and a reused job take no quota."""
    client, _ = await make_client(auth={"tokens": TOKENS}, limits={"max_queued_per_principal": 2},
                                  queue={"workers": 1}, **reusing(echo={"reuse": 60}))
    await client.post("/jobs", json={"task": "block", "params": {"seconds": 30}}, headers=auth(ALICE))
    await eventually(lambda: _running(client, ALICE), "alice's first job to run")
    first = await client.post("/jobs", json={"task": "echo", "params": {"n": 1}},
                              headers={**auth(ALICE), "Idempotency-Key": "k1"})
    second = await client.post("/jobs", json={"task": "echo", "params": {"n": 2}}, headers=auth(ALICE))
    assert first.status == 202 and second.status == 202
    third = await client.post("/jobs", json={"task": "echo", "params": {"n": 3}}, headers=auth(ALICE))
    assert third.status == 429, await third.text()
    assert third.content_type == "application/problem+json"
    assert 1 <= int(third.headers["Retry-After"]) <= 60
    assert len(await jobs_of(client, auth(ALICE))) == 3
    replay = await client.post("/jobs", json={"task": "echo", "params": {"n": 1}},
                               headers={**auth(ALICE), "Idempotency-Key": "k1"})
    assert replay.status == 202 and replay.headers["Idempotent-Replayed"] == "true"
    reused = await client.post("/jobs", json={"task": "echo", "params": {"n": 2}}, headers=auth(ALICE),
                               allow_redirects=False)
    assert reused.status == 303
    assert (await client.post("/jobs", json={"task": "echo", "params": {"n": 3}}, headers=auth(BOB))).status == 202


@pytest.mark.parametrize("delays, retry_after", [((30,), {29, 30}), ((3600,), {60}), ((3600, 0), {1})])
async def test_quota_retry_after_waits_for_the_callers_delayed_job(make_client, delays, retry_after):
    """A caller whose queued job is delayed is told to come back when it is due (at most 60 s), not at once;
    with a due job of theirs as well, soon."""
    client, _ = await make_client(limits={"max_queued_per_principal": len(delays)},
                                  queue={"workers": 1, "shutdown_grace": 0.2})
    blocker = await (await client.post("/jobs", json={"task": "block", "params": {"seconds": 30}})).json()
    await wait_status(client, blocker["id"], "running")  # the one worker is busy: a due job stays queued
    for delay in delays:
        assert (await client.post("/jobs", json={"task": "noop", "delay": delay})).status == 202
    refused = await client.post("/jobs", json={"task": "noop"})
    assert refused.status == 429 and int(refused.headers["Retry-After"]) in retry_after


async def test_quota_retry_after_is_for_the_callers_job_that_starts_first(make_client):
    """The caller's job that starts first is its highest-priority one, not its oldest: the 429's Retry-After
    follows that one (about a second here), not a low-priority job twenty places back."""
    client, _ = await make_client(auth={"tokens": TOKENS}, queue={"workers": 1},
                                  limits={"max_queued_per_principal": 21})
    warm = await _block(client, ROOT, 1.0)  # the task's mean run time becomes known
    await wait_status(client, warm["id"], "succeeded", headers=auth(ROOT))
    blocker = await _block(client, ROOT, 30, priority=20)
    await wait_status(client, blocker["id"], "running", headers=auth(ROOT))
    for _ in range(21):
        await _block(client, BOB, 1.0, priority=10)
    low = await _block(client, ALICE, 1.0)
    high = await _block(client, ALICE, 1.0, priority=10)
    for _ in range(19):
        await _block(client, ALICE, 1.0, priority=10)
    assert high["queue_position"] <= 2 and low["queue_position"] >= 20, (high, low)
    refused = await client.post("/jobs", json={"task": "noop"}, headers=auth(ALICE))
    assert refused.status == 429
    assert int(refused.headers["Retry-After"]) <= 3, refused.headers["Retry-After"]


async def test_a_principals_dashboard_counts_all_its_jobs_and_only_its_own(make_client):
    """The dashboard's counts by status (GET / as JSON) are a principal's own jobs, every one of them (not
    its newest 200); an admin's are everyone's."""
    client, _ = await make_client(auth={"tokens": TOKENS, "admins": ["root"]})
    for _ in range(5):
        answers = await asyncio.gather(*[client.post("/jobs", json={"task": "noop", "delay": 3600},
                                                     headers=auth(ALICE)) for _ in range(50)])
        assert {a.status for a in answers} == {202}
    assert (await client.post("/jobs", json={"task": "noop", "delay": 3600}, headers=auth(BOB))).status == 202
    mine = (await (await client.get("/", headers=auth(ALICE))).json())["counts"]
    assert mine == {"queued": 250, "running": 0, "succeeded": 0, "failed": 0, "canceled": 0}, mine
    assert (await (await client.get("/", headers=auth(BOB))).json())["counts"]["queued"] == 1
    assert (await (await client.get("/", headers=auth(ROOT))).json())["counts"]["queued"] == 251


async def _running(client, token: str) -> bool:
    return bool(await jobs_of(client, auth(token), status="running"))


async def test_submit_rate_is_a_token_bucket_with_ratelimit_fields(make_client):
    """limits.submit_rate/submit_burst: the burst passes with RateLimit fields counting down, the next is 429
    with Retry-After; a refused submit spends no token; a token comes back after 1/rate seconds."""
    client, _ = await make_client(limits={"submit_rate": 2, "submit_burst": 3})
    lefts = []
    for i in range(3):
        resp = await client.post("/jobs", json={"task": "noop"})
        assert resp.status == 202
        assert resp.headers["RateLimit-Policy"] == '"submit";q=3;w=2'
        lefts.append(resp.headers["RateLimit"])
    assert [x.split(";")[1] for x in lefts] == ["r=2", "r=1", "r=0"]
    over = await client.post("/jobs", json={"task": "noop"})
    assert over.status == 429 and over.headers["Retry-After"] == "1"
    assert over.headers["RateLimit"].startswith('"submit";r=0;t=')
    await asyncio.sleep(0.6)
    bad = await client.post("/jobs", json={"task": "nope"})
    assert bad.status == 400  # spent nothing...
    assert (await client.post("/jobs", json={"task": "noop"})).status == 202  # ...so this one has its token
    assert (await client.post("/jobs", json={"task": "noop"})).status == 429


async def test_an_empty_bucket_still_answers_a_replay_and_a_reuse_and_every_refusal_has_the_fields(make_client):
    """A replay and a reused job take no quota, so an empty bucket does not refuse them; and while a rate is
    set every submit answer carries the RateLimit fields, refusals too (a 400, a 415, the per-principal
    quota's 429, the rate's own)."""
    client, _ = await make_client(limits={"submit_rate": 0.1, "submit_burst": 3, "max_queued_per_principal": 2},
                                  queue={"workers": 1}, **reusing(echo={"reuse": 60}))
    echo = await client.post("/jobs", json={"task": "echo", "params": {"n": 1}})
    assert echo.status == 202 and echo.headers["RateLimit"].startswith('"submit";r=2;')
    await wait_status(client, (await echo.json())["id"], "succeeded")
    keyed = {"Idempotency-Key": "k1"}
    first = await client.post("/jobs", json={"task": "block", "params": {"seconds": 30}}, headers=keyed)
    assert first.status == 202 and first.headers["RateLimit"].startswith('"submit";r=1;')
    await eventually(lambda: jobs_of(client, status="running"), "the blocking job to run")
    queued = await client.post("/jobs", json={"task": "block", "params": {"seconds": 30}})
    assert queued.status == 202 and queued.headers["RateLimit"].startswith('"submit";r=0;')

    replay = await client.post("/jobs", json={"task": "block", "params": {"seconds": 30}}, headers=keyed)
    assert replay.status == 202, await replay.text()
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.headers["RateLimit"].startswith('"submit";r=0;')
    reused = await client.post("/jobs", json={"task": "echo", "params": {"n": 1}}, allow_redirects=False)
    assert reused.status == 303, await reused.text()
    assert reused.headers["RateLimit"].startswith('"submit";r=0;')
    over = await client.post("/jobs", json={"task": "echo", "params": {"n": 2}})
    assert over.status == 429 and "per second" in (await over.json())["detail"]
    assert over.headers["RateLimit-Policy"] == '"submit";q=3;w=30'

    refusals = [
        await client.post("/jobs", json={"task": "nope"}),
        await client.post("/jobs", data=b"task=noop", headers={"Content-Type": "application/x-www-form-urlencoded"}),
        await client.post("/jobs", json={"task": "echo", "params": {"n": 3}}, headers={"Idempotency-Key": "k2"}),
    ]
    assert [r.status for r in refusals] == [400, 415, 429]
    for refusal in refusals:
        assert refusal.content_type == "application/problem+json"
        assert refusal.headers["RateLimit-Policy"] == '"submit";q=3;w=30'
        assert refusal.headers["RateLimit"].startswith('"submit";r=0;t=')


async def _raw_answer(client, head: bytes, body: bytes = b"") -> tuple[int, dict[str, str]]:
    """Send a request as written (headers aiohttp's client would not send as given) and read its answer's head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    try:
        writer.write(head + body)
        await writer.drain()
        lines = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode("latin-1").split("\r\n")
    finally:
        writer.close()
    fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), fields


async def test_refusals_before_the_submit_handler_carry_the_rate_fields_too(make_client):
    """'Every submit answer' carries the RateLimit fields: also a 413 from the Expect handler, a 417, aiohttp's
    413 for a chunked body over the limit, and a 403 for a sign-in cookie without its CSRF token; on POST /jobs
    and on a task's route alike. A caller with no valid credentials (401) has no bucket to show."""
    from tests.test_signin import cookie, sign_in

    client, _ = await make_client(auth={"tokens": TOKENS}, limits={"submit_rate": 0.1, "submit_burst": 4},
                                  server={"max_body_bytes": 1000})
    bearer = f"Authorization: Bearer {ALICE}\r\n".encode()
    heads = {
        "Expect: 100-continue, over the limit": b"Content-Length: 5000\r\nExpect: 100-continue\r\n",
        "an expectation it cannot meet": b"Content-Length: 2\r\nExpect: bogus\r\n",
        "a chunked body over the limit": b"Transfer-Encoding: chunked\r\n",
    }
    chunked = b"".join(b"400\r\n" + b" " * 1024 + b"\r\n" for _ in range(3)) + b"0\r\n\r\n"
    for path in (b"/jobs", b"/thumbnails"):
        for why, head in heads.items():
            status, fields = await _raw_answer(
                client, b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + bearer
                + head + b"\r\n", chunked if b"chunked" in head else b"{}" if b"bogus" in head else b"")
            assert status in (413, 417), (path, why, status)
            assert fields.get("RateLimit-Policy") == '"submit";q=4;w=40', (path, why, fields)
            assert fields.get("RateLimit", "").startswith('"submit";r=4;'), (path, why, fields)
    value, _csrf = await sign_in(client, ALICE)
    no_csrf = await client.post("/jobs", json={"task": "noop"}, headers=cookie(value))
    assert no_csrf.status == 403
    assert no_csrf.headers["RateLimit-Policy"] == '"submit";q=4;w=40' and "RateLimit" in no_csrf.headers
    stranger = await client.post("/jobs", json={"task": "noop"}, headers=auth("not-a-token-of-anyone-here"))
    assert stranger.status == 401 and "RateLimit" not in stranger.headers


async def test_the_queued_quota_refusal_carries_the_rate_fields_and_gives_the_token_back(make_client):
    """Over max_queued_per_principal with a rate set: the 429 says where the bucket stands, its token back."""
    client, _ = await make_client(limits={"submit_rate": 0.1, "submit_burst": 5, "max_queued_per_principal": 1},
                                  queue={"workers": 1})
    await client.post("/jobs", json={"task": "block", "params": {"seconds": 30}})
    await eventually(lambda: jobs_of(client, status="running"), "the first job to run")
    assert (await client.post("/jobs", json={"task": "noop"})).headers["RateLimit"].startswith('"submit";r=3;')
    over = await client.post("/jobs", json={"task": "noop"})
    assert over.status == 429 and "queued jobs" in (await over.json())["detail"]
    assert over.headers["RateLimit-Policy"] == '"submit";q=5;w=50'
    assert over.headers["RateLimit"].startswith('"submit";r=3;')  # the token it took is back


async def test_a_burst_from_one_principal_leaves_another_untouched(make_client):
    """Buckets are per principal: alice's exhausted bucket does not slow bob down."""
    client, _ = await make_client(auth={"tokens": TOKENS}, limits={"submit_rate": 1})
    assert (await client.post("/jobs", json={"task": "noop"}, headers=auth(ALICE))).status == 202
    assert (await client.post("/jobs", json={"task": "noop"}, headers=auth(ALICE))).status == 429
    assert (await client.post("/jobs", json={"task": "noop"}, headers=auth(BOB))).status == 202


# -- fair dispatch ----------------------------------------------------------------------

async def test_a_lone_job_waits_behind_at_most_one_job_per_worker_of_a_backlog(make_client):
    """Alice queues 300 jobs; bob's one job, submitted behind them, starts after at most `workers` of
    alice's jobs started since its submit (not after her whole backlog)."""
    client, _ = await make_client(auth={"tokens": TOKENS}, queue={"workers": 2})
    backlog = [client.post("/jobs", json={"task": "block", "params": {"seconds": 0.01}}, headers=auth(ALICE))
               for _ in range(300)]
    for chunk in range(0, 300, 50):
        assert {r.status for r in await asyncio.gather(*backlog[chunk:chunk + 50])} == {202}
    answer = await client.post("/jobs", json={"task": "block", "params": {"seconds": 0.01}}, headers=auth(BOB))
    lone = await answer.json()
    assert lone["queue_position"] <= 3, lone["queue_position"]  # its 202 says it is near the front...
    assert int(answer.headers["Retry-After"]) <= 2  # ...and not to come back after the whole backlog
    done = await wait_status(client, lone["id"], "succeeded", headers=auth(BOB), timeout_s=30)
    alice_jobs = await jobs_of(client, auth(ALICE))
    started_between = [j for j in alice_jobs if j["started_at"] and lone["created_at"] < j["started_at"] < done["started_at"]]
    assert len(started_between) <= 2, len(started_between)
    queued_left = [j for j in alice_jobs if j["status"] == "queued"]
    assert len(queued_left) > 100  # bob did not wait for the backlog


async def _block(client, token: str, seconds: float, **extra: Any) -> dict:
    """Submit a ``block`` job of ``seconds`` as the principal of ``token`` (202 asserted)."""
    resp = await client.post("/jobs", json={"task": "block", "params": {"seconds": seconds}, **extra},
                             headers=auth(token))
    assert resp.status == 202, await resp.text()
    return await resp.json()


@pytest.mark.parametrize("delayed", [0, 8])
async def test_delayed_jobs_send_neither_their_owners_due_job_behind_a_backlog_nor_count_ahead(make_client, delayed):
    """Alice's jobs delayed by an hour take no place until due: her one due job, submitted after them and after
    bob's backlog, starts after at most one of bob's jobs (one worker), and its position counts no delayed
    job ahead of it."""
    client, _ = await make_client(auth={"tokens": TOKENS}, queue={"workers": 1})

    blocker = await _block(client, ROOT, 30, priority=5)
    await wait_status(client, blocker["id"], "running", headers=auth(ROOT))
    for _ in range(delayed):
        await _block(client, ALICE, 0.01, delay=3600)
    backlog = [await _block(client, BOB, 0.05) for _ in range(8)]
    lone = await _block(client, ALICE, 0.05)
    assert lone["queue_position"] == 2, lone["queue_position"]  # behind bob's first job only
    assert (await client.post(f"/jobs/{blocker['id']}/cancel", headers=auth(ROOT))).status == 200
    done = await wait_status(client, lone["id"], "succeeded", headers=auth(ALICE), timeout_s=20)
    listed = await (await client.get("/jobs", params={"limit": "500"}, headers=auth(BOB))).json()
    ahead = [j for j in listed["jobs"] if j["id"] in {b["id"] for b in backlog}
             and j["started_at"] and j["started_at"] < done["started_at"]]
    assert len(ahead) <= 1, f"{len(ahead)} of bob's backlog started before alice's only due job"


async def test_delayed_jobs_take_their_turns_once_due(make_client):
    """Alice's three jobs delayed a second, bob's backlog of 12 due at once (one worker, 0.2 s a job): once
    alice's are due they take turns with bob's from the place his backlog has reached (as jobs submitted then
    would; ties go to the earlier submit, hers), neither at the end of his backlog nor all three at once."""
    client, _ = await make_client(auth={"tokens": TOKENS}, queue={"workers": 1})

    delayed = [await _block(client, ALICE, 0.05, delay=1.0) for _ in range(3)]
    backlog = [await _block(client, BOB, 0.2) for _ in range(12)]  # bob's first jobs run while alice's wait
    started = {}
    for job in delayed + backlog:
        done = await wait_status(client, job["id"], "succeeded", headers=auth(ALICE if job in delayed else BOB),
                                 timeout_s=30)
        started[job["id"]] = done["started_at"]
    order = sorted(started, key=started.__getitem__)
    places = [order.index(j["id"]) for j in delayed]
    assert 0 < places[0] < 9, places  # bob's jobs ran while alice's were not due; hers then came soon
    assert places[2] - places[0] in (3, 4), places  # taking turns: at most two in a row, then one of bob's


async def test_a_claim_of_another_priority_sends_no_newcomer_behind_a_backlog(make_client):
    """Alice has a backlog at priority 0 and one job at priority 1, which starts first. Bob's lone job at
    priority 0, submitted then, still waits behind at most one of alice's priority-0 jobs (one worker): a
    claim of priority 1 moves that priority's turn only."""
    client, app = await make_client(auth={"tokens": TOKENS}, queue={"workers": 1})
    blocker = await _block(client, ALICE, 30)
    await wait_status(client, blocker["id"], "running", headers=auth(ALICE))
    backlog = [await _block(client, ALICE, 0.05) for _ in range(8)]
    high = await _block(client, ALICE, 0.5, priority=1)
    assert (await client.post(f"/jobs/{blocker['id']}/cancel", headers=auth(ALICE))).status == 200
    await wait_status(client, high["id"], "running", headers=auth(ALICE))
    lone = await _block(client, BOB, 0.05)
    assert lone["queue_position"] <= 2, lone
    done = await wait_status(client, lone["id"], "succeeded", headers=auth(BOB), timeout_s=20)
    ahead = [j for j in await jobs_of(client, auth(ALICE)) if j["id"] in {b["id"] for b in backlog}
             and j["started_at"] and j["started_at"] < done["started_at"]]
    assert len(ahead) <= 1, [j["started_at"] for j in ahead]


async def test_a_backlog_at_one_priority_does_not_send_its_owners_lone_job_at_another_to_the_back(make_client):
    """Bob has a backlog at priority 0, alice one at priority 1. Bob's lone job at priority 1 waits behind at
    most one of alice's priority-1 jobs (one worker): its place follows bob's last job of priority 1 (none),
    not his last of any priority."""
    client, _ = await make_client(auth={"tokens": TOKENS}, queue={"workers": 1})
    blocker = await _block(client, ALICE, 30, priority=5)
    await wait_status(client, blocker["id"], "running", headers=auth(ALICE))
    for _ in range(8):
        await _block(client, BOB, 0.05)
    backlog = [await _block(client, ALICE, 0.05, priority=1) for _ in range(8)]
    lone = await _block(client, BOB, 0.05, priority=1)
    assert lone["queue_position"] <= 2, lone
    assert (await client.post(f"/jobs/{blocker['id']}/cancel", headers=auth(ALICE))).status == 200
    done = await wait_status(client, lone["id"], "succeeded", headers=auth(BOB), timeout_s=20)
    ahead = [j for j in await jobs_of(client, auth(ALICE)) if j["id"] in {b["id"] for b in backlog}
             and j["started_at"] and j["started_at"] < done["started_at"]]
    assert len(ahead) <= 1, [j["started_at"] for j in ahead]


# -- admins -----------------------------------------------------------------------------

async def test_admins_see_and_manage_every_job_others_only_their_own(make_client):
    """auth.admins: GET /jobs lists every job with its owner and filters by owner; cancel and delete work on
    any job. A non-admin's owner= filter never shows another's jobs."""
    client, _ = await make_client(auth={"tokens": TOKENS, "admins": ["root"]})
    a = await (await client.post("/jobs", json={"task": "block", "params": {"seconds": 30}}, headers=auth(ALICE))).json()
    b = await (await client.post("/jobs", json={"task": "block", "params": {"seconds": 30}}, headers=auth(BOB))).json()
    assert a["owner"] == "alice" and b["owner"] == "bob"
    assert {j["id"] for j in await jobs_of(client, auth(ROOT))} == {a["id"], b["id"]}
    assert [j["id"] for j in await jobs_of(client, auth(ROOT), owner="bob")] == [b["id"]]
    assert [j["id"] for j in await jobs_of(client, auth(ALICE))] == [a["id"]]
    assert await jobs_of(client, auth(ALICE), owner="bob") == []
    assert (await client.get(f"/jobs/{b['id']}", headers=auth(ALICE))).status == 404
    assert (await client.get(f"/jobs/{b['id']}", headers=auth(ROOT))).status == 200
    assert (await client.post(f"/jobs/{a['id']}/cancel", headers=auth(BOB))).status == 404
    assert (await client.post(f"/jobs/{a['id']}/cancel", headers=auth(ROOT))).status == 200
    assert (await client.delete(f"/jobs/{b['id']}", headers=auth(ROOT))).status in (202, 204)


async def test_admins_star_subscription_sees_every_job(make_client):
    """A "*" WebSocket subscription of an admin receives other principals' jobs; a non-admin's does not."""
    client, _ = await make_client(auth={"tokens": TOKENS, "admins": ["root"]})
    admin_ws = await client.ws_connect("/ws", headers=auth(ROOT))
    bob_ws = await client.ws_connect("/ws", headers=auth(BOB))
    for ws in (admin_ws, bob_ws):
        await ws.send_str(json.dumps({"op": "subscribe", "jobs": "*"}))
        assert (await ws.receive_json(timeout=5))["type"] == "subscribed"
    job = await (await client.post("/jobs", json={"task": "noop"}, headers=auth(ALICE))).json()
    seen = await admin_ws.receive_json(timeout=5)
    assert seen["type"] == "job" and seen["job"]["id"] == job["id"] and seen["job"]["owner"] == "alice"
    started = time.monotonic()
    try:
        extra = await bob_ws.receive_json(timeout=0.5)
        raise AssertionError(f"bob saw {extra}")
    except asyncio.TimeoutError:
        assert time.monotonic() - started >= 0.4
    await admin_ws.close()
    await bob_ws.close()
