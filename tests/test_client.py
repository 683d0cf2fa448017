"""The client (`asyncjobs.Client`, `asyncjobs.SyncClient`): its pure rules, and its behaviour against a real server."""

from __future__ import annotations

import ast
import asyncio
import hashlib
import time
from datetime import datetime, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

import asyncjobs
from asyncjobs import client as client_module
from asyncjobs.client import (
    BadRequest,
    Client,
    ClientError,
    Conflict,
    ConnectError,
    IdempotencyConflict,
    JobCanceled,
    JobFailed,
    JobGone,
    JobState,
    NotFound,
    ProtocolError,
    RequestTimeout,
    ResultNotReady,
    ServerBusy,
    ServerError,
    SyncClient,
    Unauthorized,
    WaitTimeout,
    rules,
)
from asyncjobs.client.rules import Answer
from tests.conftest import Server, eventually

CLIENT_DIR = Path(client_module.__file__).parent
SERVER_MODULES = {"app", "store", "queue", "worker", "web", "protocol", "tasks", "hub", "models", "config",
                  "errors", "builtin", "callbacks", "cli"}
TOKEN = "a-token-of-16-chars-or-more"
BASE = "http://svc.test/"


# -- helpers -----------------------------------------------------------------------------




async def waiting(server: Server) -> dict[str, int]:
    resp = await server.http.get("/healthz")
    return (await resp.json())["waiting"]


async def jobs_on_server(server: Server) -> list[dict]:
    resp = await server.http.get("/jobs", params={"limit": "500"})
    return (await resp.json())["jobs"]


HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "date", "server", "keep-alive"}


class Proxy:
    """An HTTP front for a real server that offers no WebSocket (``/ws`` is 404); optionally ignores
    long polls (drops ``wait`` and ``Prefer``), drops the connection after forwarding the first submit, or
    (``store_away``) answers reads of jobs as a node does while its database is away: 503, Retry-After 5."""

    def __init__(self, upstream: str, session: aiohttp.ClientSession, *, long_poll: bool = True,
                 drop_first_submit: bool = False, store_away: bool = False) -> None:
        self.upstream = upstream.rstrip("/")
        self.session = session
        self.long_poll = long_poll
        self.drop_first_submit = drop_first_submit
        self.store_away = store_away
        self.seen: list[tuple[float, str, str, CIMultiDict]] = []  # (time, method, path?query, headers)
        self.ws_attempts = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.forward)
        return app

    def submits(self) -> list[CIMultiDict]:
        return [headers for _, method, path, headers in self.seen if method == "POST" and path == "/jobs"]

    def monitor_gets(self, job_id: str) -> list[tuple[float, str]]:
        return [(at, path) for at, method, path, _ in self.seen
                if method == "GET" and path.split("?")[0] == f"/jobs/{job_id}"]

    async def forward(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((time.monotonic(), request.method, request.path_qs, CIMultiDict(request.headers)))
        if request.path == "/ws":
            self.ws_attempts += 1
            return web.Response(status=404, text="<html><body>no WebSocket here</body></html>",
                                content_type="text/html")
        if self.store_away and request.method == "GET" and request.path.startswith("/jobs/"):
            return web.json_response({"type": "about:blank", "title": "Service Unavailable", "status": 503,
                                      "detail": "the store is unavailable"}, status=503,
                                     content_type="application/problem+json", headers={"Retry-After": "5"})
        query = {k: v for k, v in request.query.items() if self.long_poll or k != "wait"}
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in HOP_HEADERS | {"host"} and (self.long_poll or k.lower() != "prefer")}
        async with self.session.request(request.method, self.upstream + request.path, params=query,
                                        headers=headers, data=await request.read() or None,
                                        allow_redirects=False) as upstream:
            body = await upstream.read()
            answer = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
        if self.drop_first_submit and request.method == "POST" and request.path == "/jobs":
            self.drop_first_submit = False
            assert request.transport is not None
            request.transport.abort()  # the job exists upstream; its answer is lost on the way back
            raise ConnectionResetError("answer dropped on purpose")
        return web.Response(status=upstream.status, body=body, headers=answer)


@pytest.fixture
async def proxy(aiohttp_server):
    """Start a ``Proxy`` in front of a server; returns (proxy, its base URL)."""
    async with aiohttp.ClientSession() as session:

        async def make(upstream: str, **options: Any) -> tuple[Proxy, str]:
            front = Proxy(upstream, session, **options)
            server = await aiohttp_server(front.app())
            return front, str(server.make_url("/"))

        yield make


def answer(status: int, body: Any = None, *, url: str = BASE + "jobs/j1", content_type: str = "application/json",
           **headers: str) -> Answer:
    names = {k.replace("_", "-").lower(): v for k, v in headers.items()}
    return Answer("GET", url, status, names, content_type, body)


def job_body(status: str = "running", job_id: str = "j1", version: int = 3, **extra: Any) -> dict[str, Any]:
    return {"id": job_id, "task": "sleep", "status": status, "version": version, **extra}


# -- pure rules ------------------------------------------------------------------------------

NOW = 1_800_000_000.0


@pytest.mark.parametrize("value, expected", [
    (None, None), ("", None), ("3", 3.0), (" 1 ", 1.0), ("0", 0.0), ("-4", 0.0), ("1e9", 60.0),
    ("soon", None), ("nan", None),
    (format_datetime(datetime.fromtimestamp(NOW + 7, timezone.utc), usegmt=True), 7.0),
    (format_datetime(datetime.fromtimestamp(NOW - 7, timezone.utc), usegmt=True), 0.0),
])
def test_retry_after_is_read_as_seconds_or_an_http_date(value, expected):
    """`Retry-After` is delta-seconds or an HTTP date, never negative, at most a minute; junk is ignored."""
    assert rules.retry_after_s(value, now=NOW) == expected


def test_monitor_answers_of_both_styles_are_read():
    """rest (200 pending, 303 succeeded, 200 failed), flow (202 + Location, 200 done) and 304 are each understood."""
    pending = rules.read_monitor(answer(200, job_body(), Retry_After="2", ETag='W/"3"'), now=NOW)
    assert pending.job.status == "running" and pending.retry_after == 2 and pending.etag == 'W/"3"'
    assert pending.next_url == BASE + "jobs/j1" and not pending.long_poll_honoured

    done = rules.read_monitor(answer(303, job_body("succeeded", result=1), Location="/jobs/j1/result"), now=NOW)
    assert done.job.terminal and done.job.result_url == BASE + "jobs/j1/result"

    bare_303 = rules.read_monitor(answer(303, b"", content_type="", Location="/jobs/j1/result"), now=NOW)
    assert bare_303.job is None and bare_303.redirect_without_job

    failed = rules.read_monitor(answer(200, job_body("failed", error={"type": "exception", "message": "x"})), now=NOW)
    assert failed.job.status == "failed" and rules.job_error(failed.job).error["message"] == "x"

    flow = rules.read_monitor(answer(202, job_body(), url=BASE + "jobs/j1?wait=5", Location="/ops/j1?x=1",
                                     Retry_After="1", Preference_Applied="wait=5"), now=NOW)
    assert flow.next_url == BASE + "ops/j1?x=1" and flow.job.url == BASE + "ops/j1?x=1" and flow.long_poll_honoured

    flow_done = rules.read_monitor(answer(200, job_body("succeeded")), now=NOW)
    assert flow_done.job.terminal

    unchanged = rules.read_monitor(answer(304, b"", content_type="", ETag='W/"3"'), now=NOW)
    assert unchanged.job is None and unchanged.etag == 'W/"3"'

    with pytest.raises(ProtocolError):
        rules.read_monitor(answer(200, b"<html></html>", content_type="text/html"), now=NOW)
    with pytest.raises(JobGone):
        rules.read_monitor(answer(410, {"status": 410, "detail": "expired"},
                                  content_type="application/problem+json"), now=NOW)


@pytest.mark.parametrize("status, problem, content_type, expected", [
    (400, {"detail": "bad", "errors": [{"field": "params.x", "message": "m"}]}, "problem", BadRequest),
    (401, {"detail": "no token"}, "problem", Unauthorized),
    (401, b"<html>login</html>", "text/html", Unauthorized),
    (404, {"detail": "no job"}, "problem", NotFound),
    (404, {"detail": "not yet", "job_status": "running"}, "problem", ResultNotReady),
    (404, b"<html>nope</html>", "text/html", ProtocolError),
    (409, {"detail": "already failed", "job_status": "failed"}, "problem", Conflict),
    (409, {"detail": "no result", "job_status": "failed", "error": {"type": "exception", "message": "m"}},
     "problem", JobFailed),
    (409, {"detail": "no result", "job_status": "canceled", "error": {"type": "canceled", "message": "m"}},
     "problem", JobCanceled),
    (410, {"detail": "expired"}, "problem", JobGone),
    (413, {"detail": "too big"}, "problem", BadRequest),
    (422, {"detail": "key reused"}, "problem", IdempotencyConflict),
    (503, {"detail": "full"}, "problem", ServerBusy),
    (500, {"detail": "bug"}, "problem", ServerError),
    (502, b"<html>bad gateway</html>", "text/html", ServerError),
])
def test_each_error_answer_becomes_its_exception(status, problem, content_type, expected):
    """One function maps a 4xx/5xx answer to its exception, which carries the problem, status and request."""
    ctype = "application/problem+json" if content_type == "problem" else content_type
    error = rules.answer_error(answer(status, problem, content_type=ctype, Retry_After="5"), now=NOW)
    assert type(error) is expected
    assert error.url == BASE + "jobs/j1" and error.method == "GET"
    if isinstance(problem, dict) and hasattr(error, "problem"):
        assert error.problem == problem
    if hasattr(error, "status"):
        assert error.status == status and error.retry_after == 5
    assert rules.answer_error(answer(200, job_body()), now=NOW) is None


@pytest.mark.parametrize("attempt, attempts, status, retry_after, expected", [
    (1, 4, None, None, 0.2), (2, 4, None, None, 0.4), (3, 4, None, None, 0.8), (4, 4, None, None, None),
    (1, 4, 503, 5.0, 5.0), (1, 4, 502, None, 0.2), (1, 4, 429, 1.0, 1.0), (1, 4, 500, None, None),
    (1, 4, 400, None, None), (1, 1, None, None, None), (9, 20, None, None, 5.0),
])
def test_retry_policy(attempt, attempts, status, retry_after, expected):
    """A safe request is repeated after a lost connection or 429/502/503/504, at Retry-After or with backoff."""
    assert rules.retry_delay_s(attempt, attempts, status=status, retry_after=retry_after) == expected


@pytest.mark.parametrize("body", [None, [], "x", {}, {"id": ""}, {"id": "j"}, {"id": "j", "status": "done"},
                                  {"id": 3, "status": "queued"}])
def test_what_is_not_a_job_is_a_protocol_error(body):
    """A body without a string id and a protocol status is not a job: ProtocolError, not a crash."""
    with pytest.raises(ProtocolError):
        rules.parse_job(body, base=BASE)


def test_a_job_is_read_with_its_urls_and_progress():
    """The job representation becomes a JobState: times parsed, progress split, links resolved against the base."""
    state = rules.parse_job(job_body(progress={"fraction": 0.5, "message": "half"}, eta="2026-11-23T12:00:03Z",
                                     links={"self": "/jobs/j1", "result": "/jobs/j1/result"}), base=BASE)
    assert (state.fraction, state.message) == (0.5, "half")
    assert state.eta == datetime(2026, 11, 23, 12, 0, 3, tzinfo=timezone.utc)
    assert state.url == BASE + "jobs/j1" and state.result_url == BASE + "jobs/j1/result"
    newer = rules.parse_job(job_body(version=4), base=BASE)
    assert rules.is_newer(newer, state) and not rules.is_newer(state, newer) and rules.is_newer(state, None)


def test_url_and_waiting_rules():
    """Base URLs, ids quoted in paths, the WebSocket URL, the channel fallback order and poll delays."""
    assert rules.base_url("http://h:1") == "http://h:1/"
    assert rules.base_url("https://h/api?x=1") == "https://h/api/"
    for bad in ("ftp://h", "h:80", "http://", ""):
        with pytest.raises(ValueError):
            rules.base_url(bad)
    assert rules.resolve("http://h/api/", "jobs/a%2Fb") == "http://h/api/jobs/a%2Fb"
    assert rules.resolve("http://h/api/jobs/1", "/jobs/1/result") == "http://h/jobs/1/result"
    assert rules.job_path("a/b?c") == "jobs/a%2Fb%3Fc"
    assert rules.action_url("a/b", "cancel", base="http://h/api/") == "http://h/api/jobs/a%2Fb/cancel"
    linked = rules.parse_job(job_body(links={"cancel": {"href": "/x/j1/stop", "method": "POST"}}), base=BASE)
    assert rules.action_url(linked, "cancel", base=BASE) == BASE + "x/j1/stop"
    assert rules.action_url(linked, "delete", base=BASE) == BASE + "jobs/j1"
    assert rules.websocket_url("https://h/api/") == "wss://h/api/ws"
    assert rules.websocket_url("http://h/") == "ws://h/ws"
    assert rules.next_channel(rules.CHANNELS, "websocket") == "long_poll"
    assert rules.next_channel(rules.CHANNELS, "long_poll") == "poll"
    assert rules.next_channel(rules.CHANNELS, "poll") is None
    assert rules.next_channel(("websocket", "poll"), "websocket") == "poll"
    assert rules.poll_delay_s(3.0, None) == 3.0 and rules.poll_delay_s(3.0, 0.5) == 0.5
    assert rules.poll_delay_s(None, None) == 1.0 and rules.poll_delay_s(0.0, None) == 0.05
    assert rules.long_poll_s(None, 30) == 30 and rules.long_poll_s(2.5, 30) == 2.5
    assert rules.remaining_s(None, 5) is None and rules.remaining_s(4, 5) == 0
    assert rules.submit_headers("k", 2.5) == {"Idempotency-Key": "k", "Prefer": "wait=3"}
    assert rules.preferences('wait=5, respond-async; x="1"') == {"wait": "5", "respond-async": ""}


def test_public_api_is_pinned():
    """The client's public names are exactly these, and `asyncjobs` exports them beside the server's."""
    assert sorted(client_module.__all__) == [
        "BadRequest", "Client", "ClientError", "Conflict", "ConnectError", "Download", "IdempotencyConflict",
        "JobCanceled", "JobError", "JobFailed", "JobGone", "JobRef", "JobState", "NotFound", "ProblemError",
        "ProtocolError", "RequestTimeout", "ResultNotReady", "ServerBusy", "ServerError", "SyncClient", "Timeout",
        "TooManyRequests", "TransportError", "Unauthorized", "WaitTimeout"]
    for name in client_module.__all__:
        assert getattr(client_module, name) is not None
    server_names = {"App", "Blob", "Canceled", "Config", "Job", "Retry", "Status", "TaskFailure", "TaskRegistry",
                    "task"}
    assert server_names <= set(asyncjobs.__all__)
    for name in set(client_module.__all__) - {"JobRef"}:
        assert name in asyncjobs.__all__ and getattr(asyncjobs, name) is getattr(client_module, name)
    public = {name for name, value in vars(Client).items() if not name.startswith("_") and callable(value)}
    assert public == {"submit", "get", "wait", "events", "result", "download", "cancel", "delete", "list", "tasks",
                      "close"}
    assert public <= {name for name in vars(SyncClient) if not name.startswith("_")}


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved from the client package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            package = ["asyncjobs", "client"][:max(0, 2 - (node.level - 1))] if node.level else []
            module = ".".join([*package, node.module] if node.module else package)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_the_client_imports_no_server_module():
    """No client module imports a server module: only `asyncjobs.codec` is shared."""
    files = sorted(CLIENT_DIR.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "aio.py", "sync.py", "rules.py", "errors.py", "cli.py"}
    for path in files:
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] != "asyncjobs" or name in ("asyncjobs", "asyncjobs.codec"):
                continue
            assert parts[1] in ("client", "codec"), f"{path.name} imports {name}"
            assert parts[1] not in SERVER_MODULES


# -- against a real server -----------------------------------------------------------------------

async def test_submit_wait_result_for_builtin_tasks(start, connect):
    """echo, sleep and hash are submitted, waited for (WebSocket) and their results read."""
    server = await start()
    client = connect(server.url)
    echo = await client.submit("echo", {"a": 1, "b": [True, None]})
    sleep = await client.submit("sleep", {"seconds": 0.3, "steps": 3})
    hashed = await client.submit("hash", {"data": "abc", "rounds": 5})
    assert echo.status == "queued" and echo.url == f"{server.url}jobs/{echo.id}"
    for job in (echo, sleep, hashed):
        assert (await client.wait(job, timeout=20)).status == "succeeded"
    assert await client.result(echo) == {"a": 1, "b": [True, None]}
    assert await client.result(sleep.id) == {"slept": 0.3}
    digest = b"abc"
    for _ in range(5):
        digest = hashlib.sha256(digest).digest()
    assert await client.result(hashed) == digest.hex()


async def test_a_failed_job_is_reported_not_raised_by_wait(start, connect):
    """`wait` returns a failed job's state with its error; `result` raises JobFailed carrying the problem."""
    server = await start()
    client = connect(server.url)
    job = await client.submit("fail", {"message": "boom"})
    final = await client.wait(job, timeout=20)
    assert final.status == "failed" and final.error == {"type": "exception", "message": "boom"}
    with pytest.raises(JobFailed) as caught:
        await client.result(job)
    assert caught.value.error == {"type": "exception", "message": "boom"}
    assert caught.value.problem["status"] == 409 and "boom" in str(caught.value)


async def test_a_bytes_result_is_returned_as_bytes(start, connect):
    """A handler's Blob comes back as bytes; the job itself describes it."""
    server = await start()
    client = connect(server.url)
    final = await client.wait(await client.submit("binary"), timeout=20)
    assert final.result["content_type"] == "image/png"
    assert await client.result(final) == b"\x89PNG fake image"


async def test_wait_uses_the_websocket_channel(start, connect):
    """Against our server `wait` holds a WebSocket (no polling), and returns when the job is canceled."""
    server = await start()
    client = connect(server.url)
    job = await client.submit("sleep", {"seconds": 30, "steps": 300})
    waiter = asyncio.create_task(client.wait(job, timeout=20))
    await eventually(lambda: _equals(waiting(server), {"long_polls": 0, "event_streams": 0, "websockets": 1}),
                     "the client's WebSocket")
    # Cancel once the handler reports: the server loses a cancel that lands between its claim and the launch.
    await eventually(lambda: _reports_progress(client, job), "the handler to run")
    await server.http.post(f"/jobs/{job.id}/cancel")
    final = await asyncio.wait_for(waiter, 20)
    assert final.status == "canceled"
    with pytest.raises(JobCanceled):
        await client.result(job)


async def _equals(value, expected) -> bool:
    return (await value) == expected


async def _reports_progress(client: Client, job: JobState) -> bool:
    return (await client.get(job)).fraction is not None


async def test_wait_falls_back_to_long_polling_without_a_websocket(start, proxy, connect):
    """With `/ws` answering 404, `wait` long-polls (the server holds its request) and still gets the result."""
    server = await start()
    front, url = await proxy(server.url)
    client = connect(url)
    job = await client.submit("block", {"seconds": 1.0})
    waiter = asyncio.create_task(client.wait(job, timeout=20))
    await eventually(lambda: _equals(waiting(server), {"long_polls": 1, "event_streams": 0, "websockets": 0}),
                     "a long poll")
    final = await asyncio.wait_for(waiter, 20)
    assert final.status == "succeeded" and await client.result(final) == "done"
    assert front.ws_attempts == 1
    assert any("wait=" in path for _, path in front.monitor_gets(job.id))


async def test_wait_falls_back_to_plain_polling_at_retry_after(start, proxy, connect):
    """With no WebSocket and `wait` ignored, `wait` polls the monitor, spaced by its Retry-After (1 s)."""
    server = await start()
    front, url = await proxy(server.url, long_poll=False)
    client = connect(url)
    job = await client.submit("sleep", {"seconds": 0.6, "steps": 2})
    final = await client.wait(job, timeout=20)
    assert final.status == "succeeded" and await client.result(final) == {"slept": 0.6}
    gets = [at for at, _ in front.monitor_gets(job.id)]
    assert front.ws_attempts == 1 and len(gets) >= 3
    gaps = [b - a for a, b in zip(gets[2:], gets[3:])]  # after the probes: one poll per Retry-After
    assert all(gap >= 0.9 for gap in gaps), gaps
    assert (await waiting(server))["long_polls"] == 0


@pytest.mark.parametrize("channels", [("websocket",), ("long_poll",)])
async def test_events_give_every_progress_state_in_order(start, connect, channels):
    """`events` yields the job's states in version order with its progress, ending at the final one."""
    server = await start()
    client = connect(server.url, channels=channels)
    job = await client.submit("sleep", {"seconds": 0.6, "steps": 3})
    states = [state async for state in client.events(job, timeout=20)]
    versions = [s.version for s in states]
    assert versions == sorted(set(versions))
    assert states[-1].status == "succeeded" and all(not s.terminal for s in states[:-1])
    fractions = [s.fraction for s in states if s.status == "running" and s.fraction is not None]
    assert len(fractions) >= 2 and fractions == sorted(fractions)
    assert any(s.message and s.message.startswith("step") for s in states)


@pytest.mark.parametrize("channels", [("websocket",), ("long_poll",), ("poll",)])
async def test_a_flow_style_server_is_understood(start, connect, channels):
    """Against `protocol.monitor = "flow"` (202 + Location while pending, 200 when done) each channel works."""
    server = await start(protocol={"monitor": "flow"})
    client = connect(server.url, channels=channels)
    job = await client.submit("sleep", {"seconds": 0.5, "steps": 2})
    pending = await client.get(job)
    assert pending.status in ("queued", "running")
    final = await client.wait(job, timeout=20)
    assert final.status == "succeeded" and await client.result(final) == {"slept": 0.5}
    assert (await client.get(job.id)).status == "succeeded"


async def test_a_submit_whose_answer_was_lost_is_retried_without_a_second_job(start, proxy, connect):
    """The first submit reaches the server but its answer is dropped; the retry, with the same
    Idempotency-Key, gets the same job replayed, and the server holds exactly one job."""
    server = await start()
    front, url = await proxy(server.url, drop_first_submit=True)
    client = connect(url)
    job = await client.submit("echo", {"n": 1})
    submits = front.submits()
    assert len(submits) == 2
    assert submits[0]["Idempotency-Key"] == submits[1]["Idempotency-Key"] and len(submits[0]["Idempotency-Key"]) > 16
    on_server = await jobs_on_server(server)
    assert [j["id"] for j in on_server] == [job.id]
    assert (await client.wait(job, timeout=20)).result == {"n": 1}


async def test_a_given_idempotency_key_is_sent_and_replayed(start, connect):
    """Two submits with the same key give one job; the same key with another body is IdempotencyConflict."""
    server = await start()
    client = connect(server.url)
    first = await client.submit("echo", {"n": 1}, idempotency_key="order-42")
    again = await client.submit("echo", {"n": 1}, idempotency_key="order-42")
    assert again.id == first.id and len(await jobs_on_server(server)) == 1
    with pytest.raises(IdempotencyConflict) as caught:
        await client.submit("echo", {"n": 2}, idempotency_key="order-42")
    assert caught.value.status == 422


async def test_wait_times_out_and_leaves_the_job_running(start, connect):
    """`wait(timeout=)` raises WaitTimeout near the deadline with the last state; the job goes on."""
    server = await start()
    client = connect(server.url)
    job = await client.submit("block")
    for channels in (("websocket",), ("long_poll",), ("poll",)):
        limited = connect(server.url, channels=channels)
        started = time.monotonic()
        with pytest.raises(WaitTimeout) as caught:
            await limited.wait(job, timeout=0.4)
        assert 0.39 <= time.monotonic() - started < 5.0, channels
        assert isinstance(caught.value, TimeoutError) and caught.value.job.id == job.id
    assert (await client.get(job)).status == "running"
    await client.cancel(job)


@pytest.mark.parametrize("channels", [("websocket", "long_poll", "poll"), ("long_poll",), ("poll",)])
async def test_wait_with_no_time_left_still_reads_a_job_that_has_ended(start, connect, channels):
    """`wait(timeout=0)` on a job that has already succeeded returns it: one reading is always made."""
    server = await start()
    client = connect(server.url, channels=channels)
    job = await client.submit("echo", {"a": 1}, wait=10)
    assert job.status == "succeeded"
    final = await asyncio.wait_for(client.wait(job, timeout=0), 10)
    assert final.status == "succeeded" and final.result == {"a": 1}


@pytest.mark.parametrize("channels", [("long_poll",), ("poll",)])
async def test_wait_keeps_its_timeout_while_the_server_answers_503(start, proxy, connect, channels):
    """Reads answered 503 with Retry-After 5 (a node whose database is away): `wait(timeout=1)` does not
    sleep through Retry-After past its deadline; it raises WaitTimeout near it."""
    server = await start()
    front, url = await proxy(server.url, store_away=True)
    job = await connect(server.url).submit("block")
    started = time.monotonic()
    with pytest.raises(WaitTimeout):
        await asyncio.wait_for(connect(url, channels=channels).wait(job.id, timeout=1), 30)
    assert time.monotonic() - started < 3.5
    assert front.monitor_gets(job.id)  # the server was asked (and answered 503)


async def test_a_bearer_token_is_sent_and_a_wrong_one_is_unauthorized(start, connect):
    """With auth on, the token opens every endpoint and the WebSocket; without it or wrong: Unauthorized (401)."""
    server = await start(auth={"tokens": {"alice": TOKEN}})
    client = connect(server.url, token=TOKEN)
    job = await client.submit("echo", {"x": 1})
    assert (await client.wait(job, timeout=20)).status == "succeeded"
    for token in (None, "wrong-token-of-enough-length"):
        stranger = connect(server.url, token=token)
        with pytest.raises(Unauthorized) as caught:
            await stranger.get(job.id)
        assert caught.value.status == 401 and caught.value.problem["status"] == 401
        with pytest.raises(Unauthorized):
            await connect(server.url, token=token, channels=("websocket",)).wait(job.id, timeout=10)


async def test_unknown_expired_and_not_ready_jobs_raise_typed_errors(start, connect):
    """404 is NotFound, 410 (expired) is JobGone, a result not there yet is ResultNotReady with Retry-After."""
    server = await start(jobs={"retention": 0.3, "tombstone_retention": 600})
    client = connect(server.url)
    with pytest.raises(NotFound) as caught:
        await client.get("no-such-job")
    assert caught.value.status == 404 and "no-such-job" in caught.value.detail
    running = await client.submit("block")
    with pytest.raises(ResultNotReady) as not_ready:
        await client.result(running)
    assert not_ready.value.job_status in ("queued", "running") and not_ready.value.retry_after >= 1
    await client.cancel(running)
    done = await client.submit("noop")
    await client.wait(done, timeout=20)

    async def gone() -> bool:
        try:
            await client.get(done)
        except JobGone:
            return True
        return False

    await eventually(gone, "the job to expire to a 410 tombstone")
    with pytest.raises(JobGone):
        await client.wait(done, timeout=5)


async def test_a_full_queue_is_server_busy(start, connect):
    """503 with Retry-After becomes ServerBusy carrying retry_after once the submit's attempts are spent."""
    server = await start(queue={"workers": 1, "max_queued": 1})
    client = connect(server.url)
    running = await client.submit("block")
    await eventually(lambda: _running(client, running), "the first job to run")
    await client.submit("block")
    with pytest.raises(ServerBusy) as caught:
        await connect(server.url, attempts=1).submit("noop")
    assert caught.value.status == 503 and caught.value.retry_after == 5


async def _running(client: Client, job: JobState) -> bool:
    return (await client.get(job)).status == "running"


async def test_list_iterates_over_every_page(start, connect):
    """`list` is an async iterator over all pages, newest first, with status and task filters."""
    server = await start()
    client = connect(server.url)
    ids = [(await client.submit("echo", {"i": i})).id for i in range(5)]
    failed = await client.submit("fail")
    for job_id in [*ids, failed.id]:
        await client.wait(job_id, timeout=20)
    listed = [job.id async for job in client.list(task="echo", page_size=2)]
    assert listed == ids[::-1]
    assert [job.id async for job in client.list(status="failed")] == [failed.id]
    assert len([job async for job in client.list(page_size=4)]) == 6


async def test_cancel_and_delete(start, connect):
    """cancel is idempotent and returns the canceled job; cancel after success is Conflict; delete forgets."""
    server = await start()
    client = connect(server.url)
    job = await client.submit("block")
    assert (await client.cancel(job)).status == "canceled"
    assert (await client.cancel(job.id)).status == "canceled"
    done = await client.submit("noop")
    await client.wait(done, timeout=20)
    with pytest.raises(Conflict) as caught:
        await client.cancel(done)
    assert caught.value.job_status == "succeeded"
    await client.delete(job)
    with pytest.raises(NotFound):
        await client.get(job)


async def test_submit_can_wait_for_the_outcome_and_unique_tasks_redirect(start, connect):
    """`submit(wait=N)` returns the finished job (201, Location to the result); a unique task's twin is the same job."""
    server = await start()
    client = connect(server.url)
    done = await client.submit("echo", {"x": 1}, wait=10)
    assert done.status == "succeeded" and done.result == {"x": 1}
    assert done.result_url == f"{server.url}jobs/{done.id}/result" and done.url == f"{server.url}jobs/{done.id}"
    first = await client.submit("dedupe", {"key": "k", "seconds": 5})
    twin = await client.submit("dedupe", {"key": "k", "seconds": 5})
    assert twin.id == first.id
    await client.cancel(first)


async def test_servers_that_do_not_speak_the_protocol(aiohttp_server, connect):
    """An HTML site, a JSON API that is not asyncjobs, and a refused port give ProtocolError / ConnectError."""

    async def html(request: web.Request) -> web.Response:
        return web.Response(text="<html><body>Welcome</body></html>", content_type="text/html")

    async def other_json(request: web.Request) -> web.Response:
        return web.json_response({"hello": "world"}, status=200 if request.method == "GET" else 202,
                                 headers={"Location": "/elsewhere"})

    for handler in (html, other_json):
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        url = str((await aiohttp_server(app)).make_url("/"))
        client = connect(url)
        for call in (client.submit("echo"), client.get("x"), client.wait("x", timeout=5), client.tasks()):
            with pytest.raises(ProtocolError) as caught:
                await call
            assert "asyncjobs" in str(caught.value) and caught.value.url.startswith(url)
    refused = connect("http://127.0.0.1:1", attempts=1)
    with pytest.raises(ConnectError) as caught:
        await refused.get("x")
    assert "connection refused" in str(caught.value)
    assert isinstance(caught.value, ClientError)


def test_sync_client_in_a_script(server_factory):
    """SyncClient offers the same methods without await: submit, get, wait, events, result, list, cancel, delete."""
    server = server_factory()
    with SyncClient(server.url, request_timeout_s=10.0) as client:
        job = client.submit("sleep", {"seconds": 0.3, "steps": 3})
        assert client.get(job).id == job.id
        states = list(client.events(job, timeout=20))
        assert states[-1].status == "succeeded" and client.wait(job, timeout=20).status == "succeeded"
        assert client.result(job) == {"slept": 0.3}
        failed = client.wait(client.submit("fail", {"message": "no"}), timeout=20)
        with pytest.raises(JobFailed):
            client.result(failed)
        assert {j.id for j in client.list()} == {job.id, failed.id}
        assert "sleep" in {t["name"] for t in client.tasks()}
        blocked = client.submit("block")
        with pytest.raises(WaitTimeout):
            client.wait(blocked, timeout=0.3)
        assert client.cancel(blocked).status == "canceled"
        client.delete(blocked)
        with pytest.raises(NotFound):
            client.get(blocked)
    with pytest.raises(RuntimeError):
        client.get(job)


async def test_sync_client_inside_a_running_event_loop(server_factory):
    """SyncClient works where an event loop already runs in the caller's thread, as in a notebook."""
    server = server_factory()
    with SyncClient(server.url) as client:
        job = client.submit("echo", {"in": "notebook"})
        assert client.wait(job, timeout=20).result == {"in": "notebook"}


async def test_a_server_that_never_answers_times_out(connect):
    """Against a server that accepts but never answers, each request ends at its timeout (RequestTimeout);
    a submit, safe to repeat, is tried again first; a wait with a shorter deadline ends as WaitTimeout."""
    accepted: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    silent = await asyncio.start_server(swallow, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{silent.sockets[0].getsockname()[1]}"
    try:
        client = connect(url, attempts=2)
        client.request_timeout_s = 0.3
        started = time.monotonic()
        with pytest.raises(RequestTimeout):
            await client.get("x")
        assert 0.25 < time.monotonic() - started < 3 and len(accepted) == 1
        with pytest.raises(RequestTimeout):
            await client.submit("noop")
        assert len(accepted) == 3
        client.request_timeout_s = 10.0
        started = time.monotonic()
        with pytest.raises(WaitTimeout):
            await client.wait("x", timeout=0.4)
        assert time.monotonic() - started < 3
    finally:
        for writer in accepted:
            writer.close()
        silent.close()
        await silent.wait_closed()
