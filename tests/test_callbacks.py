"""Callbacks: allow-listed URLs only, Standard Webhooks signatures checked by a real receiver, retries, restarts."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import sqlite3
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from asyncjobs import App
from asyncjobs.errors import ConfigError
from tests.conftest import TEST_MODULES, make_config, postgres_row, store_url, submit, wait_status, eventually

PROBLEM = "application/problem+json"
SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
RETRY_DELAY_S = 0.1
MAX_ATTEMPTS = 4


# -- the receiver and its own verification -------------------------------------------

def verify_signature(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Standard Webhooks: some "v1,<sig>" in webhook-signature is base64(HMAC-SHA256(key, "id.timestamp.body"))."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    for candidate in headers["webhook-signature"].split(" "):
        version, _, signature = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(signature, expected):
            return True
    return False


@dataclass
class Received:
    at: float  # time.monotonic() on arrival
    headers: dict[str, str]
    body: bytes

    @property
    def job(self) -> dict:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A webhook receiver: ``/hook/{name}`` answers the statuses planned for that name in turn, then 200."""

    plans: dict[str, list[int]] = field(default_factory=dict)
    delays_s: dict[str, float] = field(default_factory=dict)
    received: dict[str, list[Received]] = field(default_factory=lambda: defaultdict(list))
    answered: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    base: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/hook/{name}", self.handle)
        app.router.add_route("*", "/elsewhere", self.handle_elsewhere)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.received[name].append(Received(time.monotonic(), dict(request.headers), await request.read()))
        n = len(self.received[name])
        await asyncio.sleep(self.delays_s.get(name, 0.0))
        plan = self.plans.get(name, [])
        status = plan[n - 1] if n <= len(plan) else 200
        self.answered[name] += 1
        if status in (301, 302, 307, 308):
            raise web.HTTPTemporaryRedirect(f"{self.base}/elsewhere")
        return web.Response(status=status, text="noted" if status < 300 else "not now")

    async def handle_elsewhere(self, request: web.Request) -> web.Response:
        self.received["elsewhere"].append(Received(time.monotonic(), dict(request.headers), await request.read()))
        return web.Response(text="followed")

    def url(self, name: str) -> str:
        return f"{self.base}/hook/{name}"

    async def count_reaches(self, name: str, n: int, timeout_s: float = 10.0) -> list[Received]:
        await eventually(lambda: len(self.received[name]) >= n, f"{n} requests to /hook/{name}", timeout_s)
        return self.received[name]


@pytest.fixture
async def receiver(aiohttp_server) -> Receiver:
    recv = Receiver()
    server = await aiohttp_server(recv.app(), host="127.0.0.1")
    recv.base = f"http://127.0.0.1:{server.port}"
    return recv




@pytest.fixture
def start(make_client):
    """An App that may call back 127.0.0.1 (any port), signing with SECRET, with quick retries."""

    async def start_(callbacks: dict[str, Any] | None = None, **sections: dict[str, Any]):
        settings = {"allow_hosts": ["127.0.0.1"], "secret": SECRET, "retry_delay": RETRY_DELAY_S,
                    "max_attempts": MAX_ATTEMPTS, **(callbacks or {})}
        queue = {"shutdown_grace": 0.2, **sections.pop("queue", {})}
        return await make_client(callbacks=settings, queue=queue, **sections)

    return start_


async def settled(app: App, timeout_s: float = 10.0) -> None:
    """Wait until no delivery is pending (each was delivered or given up), so no request is still to come."""
    await eventually(lambda: _none_pending(app), "no pending callback deliveries", timeout_s)


async def _none_pending(app: App) -> bool:
    return await app.store.next_delivery_at() is None


def check_delivery(received: Received, job_id: str, status: str) -> dict:
    """One request is a signed, fresh, JSON POST of the job in ``status``."""
    headers = received.headers
    assert headers.get("Content-Type", "").startswith("application/json"), headers
    assert headers["webhook-id"], headers
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 30, headers
    assert verify_signature(SECRET, headers, received.body), headers
    assert not verify_signature(SECRET, headers, received.body + b" "), "the verifier accepts a tampered body"
    job = received.job
    assert job["id"] == job_id and job["status"] == status, job
    return job


# -- 1. only allow-listed callback URLs ------------------------------------------------

async def assert_callback_refused(client, url: Any) -> None:
    resp = await client.post("/jobs", json={"task": "echo", "params": {}, "callback_url": url})
    text = await resp.text()
    assert resp.status == 400, (url, resp.status, text)
    assert resp.content_type == PROBLEM, (url, resp.content_type)
    assert any(e["field"] == "callback_url" for e in json.loads(text).get("errors", [])), (url, text)


async def test_callback_url_outside_the_allow_list_is_400_and_stores_nothing(start, receiver):
    """Other hosts, non-http schemes and userinfo get a 400 naming callback_url; nothing is stored or called."""
    client, app = await start()
    port = receiver.base.rsplit(":", 1)[1]
    for url in (
        "http://example.com/hook",
        f"http://localhost:{port}/hook/x",
        f"http://127.0.0.2:{port}/hook/x",
        "http://127.0.0.1.example.com/hook",
        f"http://[::1]:{port}/hook/x",
        f"ftp://127.0.0.1:{port}/hook/x",
        "file:///etc/passwd",
        f"ws://127.0.0.1:{port}/hook/x",
        f"//127.0.0.1:{port}/hook/x",
        f"127.0.0.1:{port}/hook/x",
        f"http://user:pass@127.0.0.1:{port}/hook/x",
        f"http://user@127.0.0.1:{port}/hook/x",
        f"http://evil.example@127.0.0.1:{port}/hook/x",
        f"http://127.0.0.1:{port}@evil.example/hook/x",
        "http://127.0.0.1:99999/hook/x",
        "",
        42,
    ):
        await assert_callback_refused(client, url)
    resp = await client.get("/jobs")
    assert (await resp.json())["jobs"] == []
    assert await app.store.next_delivery_at() is None
    assert not receiver.received


async def test_callback_url_is_400_when_no_hosts_are_allowed(make_client, receiver):
    """Without callbacks.allow_hosts every callback_url is refused, even to 127.0.0.1."""
    client, _ = await make_client()
    await assert_callback_refused(client, receiver.url("x"))
    resp = await client.get("/jobs")
    assert (await resp.json())["jobs"] == []


async def test_allow_list_entry_with_a_port_matches_only_that_port(start, receiver):
    """An allow-list entry "host:port" admits that port and no other (nor the host without a port)."""
    port = int(receiver.base.rsplit(":", 1)[1])
    client, app = await start({"allow_hosts": [f"127.0.0.1:{port}"]})
    for url in (f"http://127.0.0.1:{port + 1}/hook/x", "http://127.0.0.1/hook/x", f"http://localhost:{port}/hook/x"):
        await assert_callback_refused(client, url)
    job = await submit(client, "echo", {"n": 1}, callback_url=receiver.url("port"))
    [received] = await receiver.count_reaches("port", 1)
    check_delivery(received, job["id"], "succeeded")
    await settled(app)
    assert len(receiver.received["port"]) == 1


# -- 2. terminal jobs are POSTed, signed --------------------------------------------------

async def test_a_host_taken_off_the_allow_list_gets_no_more_callbacks(start, receiver):
    """A callback accepted while its host was allowed is not sent once a restart's allow-list no longer names
    the host: the delivery is given up (the list is checked at each attempt, not only at the submit)."""
    client, _ = await start()
    resp = await client.post("/jobs", json={"task": "echo", "params": {"n": 1}, "delay": 1.5,
                                            "callback_url": receiver.url("removed")})
    assert resp.status == 202, await resp.text()
    job_id = (await resp.json())["id"]
    await client.close()  # the operator takes 127.0.0.1 off the list and restarts
    client, app = await start(callbacks={"allow_hosts": ["hooks.example"]})
    await wait_status(client, job_id, "succeeded")
    await settled(app)
    assert not receiver.received["removed"], "POSTed to a host that is not in the allow-list any more"


async def test_succeeded_job_is_posted_once_signed_per_standard_webhooks(start, receiver):
    """The succeeded job is POSTed once, with its result, a fresh timestamp and a valid v1 signature."""
    client, app = await start()
    job = await submit(client, "echo", {"greeting": "hi"}, callback_url=receiver.url("ok"))
    [received] = await receiver.count_reaches("ok", 1)
    body = check_delivery(received, job["id"], "succeeded")
    assert body["result"] == {"greeting": "hi"} and body["error"] is None
    monitor = await client.get(f"/jobs/{job['id']}?redirect=false")
    assert body == await monitor.json()
    await settled(app)
    assert len(receiver.received["ok"]) == 1


async def test_failed_and_canceled_jobs_are_delivered_too(start, receiver):
    """A failed job, a job canceled while queued and one canceled while running are each delivered once, signed."""
    client, app = await start()
    failed = await submit(client, "fail", {"message": "boom"}, callback_url=receiver.url("failed"))
    queued = await submit(client, "echo", {"n": 1}, delay=60, callback_url=receiver.url("queued"))
    running = await submit(client, "block", {"seconds": 30}, callback_url=receiver.url("running"))
    await wait_status(client, running["id"], "running")
    for job in (queued, running):
        resp = await client.post(f"/jobs/{job['id']}/cancel")
        assert resp.status == 200, await resp.text()
    for name, job, status, error_type in (("failed", failed, "failed", "exception"),
                                          ("queued", queued, "canceled", "canceled"),
                                          ("running", running, "canceled", "canceled")):
        [received] = await receiver.count_reaches(name, 1)
        body = check_delivery(received, job["id"], status)
        assert body["error"]["type"] == error_type, body
    await settled(app)
    assert {name: len(r) for name, r in receiver.received.items()} == {"failed": 1, "queued": 1, "running": 1}


# -- 3. retries with backoff -------------------------------------------------------------

async def test_receiver_failing_twice_gets_the_delivery_on_the_third_try(start, receiver):
    """After two 500s the third try succeeds: three requests, one webhook-id, every signature valid, growing gaps."""
    client, app = await start()
    receiver.plans["flaky"] = [500, 500]
    job = await submit(client, "echo", {"n": 1}, callback_url=receiver.url("flaky"))
    tries = await receiver.count_reaches("flaky", 3)
    await settled(app)
    assert len(receiver.received["flaky"]) == 3
    for received in tries:
        check_delivery(received, job["id"], "succeeded")
    assert len({r.headers["webhook-id"] for r in tries}) == 1, [r.headers["webhook-id"] for r in tries]
    gaps = [b.at - a.at for a, b in zip(tries, tries[1:])]
    # retry_delay * 2**(n-1) with +-25% jitter: each gap is at least 0.75 of its nominal value.
    assert gaps[0] >= 0.7 * RETRY_DELAY_S and gaps[1] >= 1.4 * RETRY_DELAY_S, gaps
    assert gaps[1] > gaps[0] * 1.1 or gaps[0] > 5 * RETRY_DELAY_S, gaps


async def test_receiver_that_always_fails_gets_exactly_max_attempts(start, receiver):
    """A receiver answering 500 forever gets max_attempts requests with doubling gaps, then no more."""
    client, app = await start()
    receiver.plans["down"] = [500] * 100
    job = await submit(client, "echo", {"n": 1}, callback_url=receiver.url("down"))
    tries = await receiver.count_reaches("down", MAX_ATTEMPTS)
    await settled(app)
    await asyncio.sleep(0.3)  # given up for good (nothing pending): no further request may come
    assert len(receiver.received["down"]) == MAX_ATTEMPTS
    for received in tries:
        check_delivery(received, job["id"], "succeeded")
    gaps = [b.at - a.at for a, b in zip(tries, tries[1:])]
    assert all(gap >= 0.7 * RETRY_DELAY_S * 2 ** i for i, gap in enumerate(gaps)), gaps
    assert gaps[-1] > gaps[0], gaps


async def test_receiver_timing_out_gets_the_delivery_on_a_later_try(start, receiver):
    """An attempt that exceeds callbacks.timeout counts as failed and is retried."""
    client, app = await start({"timeout": 0.5})
    receiver.delays_s["slow"] = 2.0  # the first request hangs past the timeout...
    job = await submit(client, "echo", {"n": 1}, callback_url=receiver.url("slow"))
    first = await receiver.count_reaches("slow", 1)
    receiver.delays_s["slow"] = 0.0  # ...the next ones are answered at once
    tries = await receiver.count_reaches("slow", 2)
    await settled(app)
    assert len(tries) == 2 and tries[1].at - first[0].at >= 0.5, [t.at for t in tries]
    for received in tries:
        check_delivery(received, job["id"], "succeeded")
    assert tries[0].headers["webhook-id"] == tries[1].headers["webhook-id"]


async def test_redirects_from_the_receiver_are_not_followed(start, receiver):
    """A 307 from the receiver is a failed attempt; the server never requests the URL it points to."""
    client, app = await start()
    receiver.plans["redirect"] = [307] * 100
    await submit(client, "echo", {"n": 1}, callback_url=receiver.url("redirect"))
    await receiver.count_reaches("redirect", MAX_ATTEMPTS)
    await settled(app)
    assert len(receiver.received["redirect"]) == MAX_ATTEMPTS
    assert not receiver.received["elsewhere"]


# -- 4. delivery never blocks workers ------------------------------------------------------

async def test_slow_receiver_does_not_hold_up_workers(start, receiver):
    """While a receiver takes 3 s to answer, the only worker keeps finishing other jobs at once."""
    client, app = await start({"timeout": 5}, queue={"workers": 1})
    receiver.delays_s["slow"] = 3.0
    slow = await submit(client, "echo", {"n": 0}, callback_url=receiver.url("slow"))
    await receiver.count_reaches("slow", 1)
    started = time.monotonic()
    others = [await submit(client, "echo", {"n": n}, callback_url=receiver.url("fast")) for n in range(1, 6)]
    for job in others:
        await wait_status(client, job["id"], "succeeded", timeout_s=10)
    elapsed = time.monotonic() - started
    assert receiver.answered["slow"] == 0, "the receiver answered before the other jobs finished"
    assert elapsed < 2.5, f"five echo jobs took {elapsed:.2f}s behind a slow receiver"
    # Every delivery still arrives: the slow one once, the others each once.
    await receiver.count_reaches("fast", len(others), timeout_s=15)
    await settled(app, timeout_s=15)
    check_delivery(receiver.received["slow"][0], slow["id"], "succeeded")
    assert receiver.answered["slow"] == 1 and len(receiver.received["slow"]) == 1
    assert sorted(r.job["id"] for r in receiver.received["fast"]) == sorted(j["id"] for j in others)


async def test_receivers_slow_to_answer_hold_only_their_own_delivery_slots(start, receiver):
    """Two deliveries in flight to a slow receiver (two of the four slots): a third job's callback to another
    receiver still goes out at once, not after the slow ones."""
    client, app = await start({"timeout": 10})
    receiver.delays_s["slow"] = 6.0
    for n in range(2):
        await submit(client, "echo", {"n": n}, callback_url=receiver.url("slow"))
    await receiver.count_reaches("slow", 2)
    fast = await submit(client, "echo", {"n": 9}, callback_url=receiver.url("fast"))
    await wait_status(client, fast["id"], "succeeded")
    done_at = time.monotonic()
    [received] = await receiver.count_reaches("fast", 1, timeout_s=10)
    assert received.at - done_at < 2.0, f"the callback waited {received.at - done_at:.1f}s behind the slow ones"
    assert receiver.answered["slow"] == 0
    # Meanwhile the deliverer waits for something due, not in a busy loop: nothing else is due before long.
    assert app.deliverer is not None and len(app.deliverer.in_flight) == 2
    next_at = await app.store.next_delivery_at(busy=app.deliverer.in_flight)
    assert next_at is None or next_at > time.time() + 5


# -- 5. deliveries survive a restart ------------------------------------------------------

def _served_config() -> str:
    return (f"[tasks]\nmodules = {json.dumps(TEST_MODULES)}\n\n"
            f'[callbacks]\nallow_hosts = ["127.0.0.1"]\nsecret = "{SECRET}"\nretry_delay = 1\nmax_attempts = 5\n')


def _attempts_recorded(db_path: str, job_id: str) -> int:
    """The attempts the server has stored for the job's delivery (read-only; the server is the only writer)."""
    if url := store_url(db_path):  # --store postgres: the database standing in for that file
        row = postgres_row(url, "SELECT attempts FROM deliveries WHERE job_id = $1", job_id)
        return 0 if row is None else row[0]
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=1) as db:
        row = db.execute("SELECT attempts FROM deliveries WHERE job_id = ?", (job_id,)).fetchone()
    return 0 if row is None else row[0]


async def test_delivery_resumes_after_a_kill_between_tries(server_factory, receiver, http):
    """A delivery whose first try failed is retried by the next process on the same store after a kill -9."""
    receiver.plans["restart"] = [500]
    config = _served_config()
    first = await asyncio.to_thread(server_factory, config_text=config)
    async with http.post(f"{first.url}/jobs", json={"task": "echo", "params": {"n": 7},
                                                    "callback_url": receiver.url("restart")}) as resp:
        assert resp.status == 202, await resp.text()
        job = await resp.json()
    await receiver.count_reaches("restart", 1)
    await eventually(lambda: _attempts_recorded(str(first.db), job["id"]) == 1, "the failed try to be stored", 5)
    first.kill()
    assert len(receiver.received["restart"]) == 1, "the second try came before the kill"

    second = await asyncio.to_thread(server_factory, config_text=config, db=first.db)
    tries = await receiver.count_reaches("restart", 2, timeout_s=15)
    body = check_delivery(tries[1], job["id"], "succeeded")
    assert body["result"] == {"n": 7}
    assert tries[1].headers["webhook-id"] == tries[0].headers["webhook-id"]
    async with http.get(f"{second.url}/jobs/{job['id']}?redirect=false") as resp:
        assert (await resp.json())["status"] == "succeeded"
    await eventually(lambda: _attempts_recorded(str(first.db), job["id"]) == 2, "the delivery to be stored", 5)
    assert len(receiver.received["restart"]) == 2


async def _running_job(http, url: str, body: dict) -> dict:
    """Submit ``body`` to the server at ``url`` and wait until its job runs."""
    async with http.post(f"{url}/jobs", json=body) as resp:
        assert resp.status == 202, await resp.text()
        job = await resp.json()

    async def running() -> bool:
        async with http.get(f"{url}/jobs/{job['id']}") as resp:
            return (await resp.json())["status"] == "running"

    await eventually(running, "the job to run", 10)
    return job


async def test_job_interrupted_by_a_kill_is_delivered_after_restart(server_factory, receiver, http):
    """A job running at a kill -9 becomes failed ("interrupted") at the restart, a terminal state, so it is POSTed."""
    config = _served_config()
    first = await asyncio.to_thread(server_factory, config_text=config)
    job = await _running_job(http, first.url, {"task": "block", "params": {"seconds": 60},
                                               "callback_url": receiver.url("interrupted")})
    first.kill()
    second = await asyncio.to_thread(server_factory, config_text=config, db=first.db)
    async with http.get(f"{second.url}/jobs/{job['id']}") as resp:
        monitor = await resp.json()
    assert monitor["status"] == "failed" and monitor["error"]["type"] == "interrupted", monitor
    [received] = await receiver.count_reaches("interrupted", 1, timeout_s=5)
    body = check_delivery(received, job["id"], "failed")
    assert body["error"]["type"] == "interrupted", body


async def test_a_cancel_accepted_before_a_kill_stands_after_the_restart(server_factory, receiver, http):
    """A cancel answered 202 (the sync handler, which ignores it, still runs) and then a kill -9: the next
    process does not run the job again (it has retries left), it ends canceled, and that is called back."""
    config = _served_config() + "\n[tasks.stubborn]\nretries = 2\n\n[jobs]\ncancel_grace = 0.3\n"
    first = await asyncio.to_thread(server_factory, config_text=config)
    job = await _running_job(http, first.url, {"task": "stubborn", "params": {"seconds": 30},
                                               "callback_url": receiver.url("stands")})
    async with http.post(f"{first.url}/jobs/{job['id']}/cancel") as resp:
        assert resp.status == 202, await resp.text()  # accepted; the handler is still running
    first.kill()
    second = await asyncio.to_thread(server_factory, config_text=config, db=first.db)
    [received] = await receiver.count_reaches("stands", 1, timeout_s=10)
    body = check_delivery(received, job["id"], "canceled")
    assert body["attempts"] == 1, body
    async with http.get(f"{second.url}/jobs/{job['id']}?redirect=false") as resp:
        assert (await resp.json())["status"] == "canceled"


@pytest.mark.parametrize("task, params, delay", [("echo", {"n": 1}, 30), ("block", {"seconds": 30}, 0)],
                         ids=["queued", "running"])
async def test_job_that_expires_unfinished_is_delivered_as_canceled(start, receiver, task, params, delay):
    """A job whose expires_at passes before it finishes is canceled, a terminal state, so it is POSTed."""
    client, _ = await start(jobs={"max_age": 0.5})
    job = await submit(client, task, params, delay=delay, callback_url=receiver.url("expired"))
    [received] = await receiver.count_reaches("expired", 1, timeout_s=5)
    body = check_delivery(received, job["id"], "canceled")
    assert body["error"]["type"] == "canceled", body


# -- 6. configuration -------------------------------------------------------------------------

@pytest.mark.parametrize("callbacks", [
    {"allow_hosts": ["127.0.0.1"]},
    {"allow_hosts": ["127.0.0.1"], "secret": base64.b64encode(os.urandom(32)).decode()},
    {"allow_hosts": ["127.0.0.1"], "secret": "whsec_not*base64!"},
    {"allow_hosts": ["127.0.0.1"], "secret": "whsec_"},
    {"secret": "not-a-whsec-secret"},
], ids=["no secret", "no whsec_ prefix", "not base64", "empty key", "bad secret without hosts"])
def test_bad_callback_settings_stop_the_app(tmp_path, callbacks):
    """Callbacks without a secret, or a secret not "whsec_<base64>", are a ConfigError naming callbacks.secret."""
    with pytest.raises(ConfigError) as error:
        App(make_config(tmp_path, callbacks=callbacks))
    assert "callbacks.secret" in str(error.value), str(error.value)


def test_good_callback_settings_build_the_app(tmp_path):
    """A whsec_ secret with an allow-list, or neither, builds an App."""
    App(make_config(tmp_path, callbacks={"allow_hosts": ["127.0.0.1", "hooks.example:8443"], "secret": SECRET}))
    App(make_config(tmp_path))


def test_allow_list_entries_are_hosts_or_host_ports_and_a_url_takes_its_schemes_port():
    """``host:port`` admits a URL that leaves that port implied by its scheme; IPv6 entries are written in
    brackets (or bare without a port); host names compare without case."""
    from asyncjobs.callbacks import allow_list, host_allowed
    allowed = allow_list(["127.0.0.1:80", "Hooks.Example:443", "[::1]:8443", "fe80::1", "any.example",
                          "Bücher.example"])
    assert allowed == ("127.0.0.1:80", "hooks.example:443", "[::1]:8443", "[fe80::1]", "any.example",
                       "bücher.example")
    assert host_allowed("https://BÜCHER.example/x", allowed)
    for url in ("http://127.0.0.1/x", "http://127.0.0.1:80/x", "https://HOOKS.example/x", "https://[::1]:8443/x",
                "http://[fe80::1]:9000/x", "http://any.example:1234/x"):
        assert host_allowed(url, allowed), url
    for url in ("https://127.0.0.1/x", "http://hooks.example/x", "http://[::1]/x", "https://[::1]:8444/x",
                "ftp://any.example/x", "http://user@any.example/x"):
        assert not host_allowed(url, allowed), url


@pytest.mark.parametrize("entry", ["http://127.0.0.1:8080/", "127.0.0.1:notaport", "", "*", "*.example.com",
                                   "hooks.example/path", "user@hooks.example", "hooks.example:99999", "[::1"])
def test_an_allow_list_entry_that_is_no_host_stops_the_app(tmp_path, entry):
    """A URL, a path, a wildcard, a bad port or an empty entry in callbacks.allow_hosts would admit nothing
    (or not what was meant): the start stops, naming the key and the entry."""
    with pytest.raises(ConfigError) as error:
        App(make_config(tmp_path, callbacks={"allow_hosts": [entry], "secret": SECRET}))
    assert "callbacks.allow_hosts" in str(error.value) and repr(entry) in str(error.value), str(error.value)


async def test_a_callback_url_without_a_port_matches_an_entry_with_its_schemes_port(start):
    """allow_hosts ["127.0.0.1:80", "[::1]:PORT"]: http://127.0.0.1/... and http://[::1]:PORT/... are accepted
    (202), https://127.0.0.1/... (port 443) is not."""
    client, _ = await start({"allow_hosts": ["127.0.0.1:80", "[::1]:18999"]})
    for url in ("http://127.0.0.1/hook/implied", "http://[::1]:18999/hook/v6"):
        resp = await client.post("/jobs", json={"task": "noop", "delay": 3600, "callback_url": url})
        assert resp.status == 202, (url, await resp.text())
    await assert_callback_refused(client, "https://127.0.0.1/hook/other-port")
