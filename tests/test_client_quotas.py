"""The client and quotas / reuse (protocol 1.3): 429 as ``TooManyRequests`` with Retry-After and the RateLimit
fields, the CLI's exit status 5, a reused job (303) as a successful submit, and ``fresh`` / ``--fresh``."""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any

import pytest

from asyncjobs.client import (
    JobState,
    ServerBusy,
    SyncClient,
    TooManyRequests,
    cli,
    rules,
)
from asyncjobs.client.rules import Answer, RateLimit
from tests.conftest import TEST_MODULES

BASE = "http://svc.test/"
NOW = 1_800_000_000.0


# -- helpers -----------------------------------------------------------------------------

def answer(status: int, body: Any = None, *, content_type: str = "application/json", method: str = "POST",
           url: str = BASE + "jobs", **headers: str) -> Answer:
    names = {name.replace("_", "-").lower(): value for name, value in headers.items()}
    return Answer(method, url, status, names, content_type, body)


def job_body(status: str = "queued", job_id: str = "j1", **extra: Any) -> dict[str, Any]:
    return {"id": job_id, "task": "echo", "status": status, "version": 1, **extra}


def problem(status: int, detail: str) -> dict[str, Any]:
    return {"type": "about:blank", "title": "Too Many Requests", "status": status, "detail": detail}


def toml(*, limits: dict[str, float] | None = None, echo_reuse: float | None = None) -> str:
    """A server config: the test tasks, a short shutdown grace, and the given limits / echo's reuse."""
    modules = ", ".join(f'"{m}"' for m in TEST_MODULES)
    text = f"[tasks]\nmodules = [{modules}]\n[queue]\nshutdown_grace = 0.5\n"
    if echo_reuse is not None:
        text += f"[tasks.echo]\nreuse = {echo_reuse}\n"
    if limits:
        text += "[limits]\n" + "".join(f"{key} = {value}\n" for key, value in limits.items())
    return text


def run_cli(*argv: str, url: str) -> tuple[int, str, str]:
    """The client command line in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), env={"ASYNCJOBS_URL": url}, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("asyncjobs: "), stderr
    return lines[0]


@pytest.fixture
def start(make_client):
    """A real App behind aiohttp's test server; returns (base URL, aiohttp test client)."""

    async def start_(**sections: dict[str, Any]) -> tuple[str, Any]:
        queue = {"shutdown_grace": 0.5, **sections.pop("queue", {})}
        http, _ = await make_client(queue=queue, **sections)
        return str(http.make_url("/")), http

    return start_




async def stored_jobs(http: Any) -> list[dict[str, Any]]:
    resp = await http.get("/jobs", params={"limit": "500"})
    return (await resp.json())["jobs"]


# -- pure rules: the RateLimit fields -------------------------------------------------------------

@pytest.mark.parametrize("ratelimit, policy, expected", [
    ('"submit";r=0;t=3', '"submit";q=5;w=10', RateLimit("submit", 0, 3, 5, 10)),
    ("submit;r=2;t=1", "submit;q=2;w=4", RateLimit("submit", 2, 1, 2, 4)),  # a token as the name
    ('  "submit" ; r=1 ;t=2  ', '"submit";w=4; q=3', RateLimit("submit", 1, 2, 3, 4)),  # spaces, any order
    ('"submit";r=2.7;t=1.2', '"submit";q=2;w=2.5', RateLimit("submit", 2, 2, 2, 3)),  # decimals: r down, t up
    ('"submit";r=0;t=3', None, RateLimit("submit", 0, 3, None, None)),  # no policy field
    (None, '"submit";q=5;w=10', RateLimit("submit", None, None, 5, 10)),  # only the policy
    ('"submit";r=x;t=?1', '"submit";q="5"', RateLimit("submit", None, None, None, None)),  # not numbers
    ('"submit";r=-4;t=3', '"submit";q=5;w=10', RateLimit("submit", 0, 3, 5, 10)),  # never negative
    ('"submit";r=5;r=1;t=3', None, RateLimit("submit", 1, 3, None, None)),  # a repeated key: the last one
    ('"a,b;c";r=1;t=1', '"a,b;c";q=1;w=1', RateLimit("a,b;c", 1, 1, 1, 1)),  # separators inside a string
    ('"other";r=9;t=9, "submit";r=1;t=2', '"submit";q=2;w=4, "other";q=9;w=9', RateLimit("other", 9, 9, 9, 9)),
    ('("a" "b");r=1, "submit";r=0;t=5', '"submit";q=1;w=5', RateLimit("submit", 0, 5, 1, 5)),  # inner list
    (None, None, None), ("", "", None), (";;, ,", ",", None), ("(a b)", None, None),
])
def test_rate_limit_fields_are_read(ratelimit, policy, expected):
    """The structured RateLimit / RateLimit-Policy fields are read leniently; what is absent is None."""
    assert rules.read_rate_limit(ratelimit, policy) == expected


def test_rate_limit_fields_of_a_named_policy():
    """With several policies, the one asked for by name is read; an unknown name reads nothing."""
    limit = '"other";r=9;t=9, "submit";r=1;t=2'
    policy = '"submit";q=2;w=4, "other";q=9;w=9'
    assert rules.read_rate_limit(limit, policy, name="submit") == RateLimit("submit", 1, 2, 2, 4)
    assert rules.read_rate_limit(limit, policy, name="nope") is None


def test_structured_list_is_lenient():
    """Members are (item, params); strings unescaped, booleans, integers, decimals, tokens kept as text."""
    assert rules.structured_list('"a\\"b";x;y=?0;z=1.5, tok;n=-2') == [("a\"b", {"x": True, "y": False, "z": 1.5}),
                                                                       ("tok", {"n": -2})]
    assert rules.structured_list('(a "b";p=1);q=2, :AAA=:;r=@12, 1x') == [(["a", "b"], {"q": 2}),
                                                                        (None, {"r": None}), (None, {})]
    assert rules.structured_list(None) == [] and rules.structured_list(" , ") == []


# -- pure rules: 429, retries, reuse, fresh --------------------------------------------------------

def test_a_429_becomes_too_many_requests_with_retry_after_and_rate_limit():
    """429 is TooManyRequests (a ServerBusy), with Retry-After in whole seconds and the RateLimit fields."""
    error = rules.answer_error(answer(429, problem(429, "over the submit rate"),
                                      content_type="application/problem+json", Retry_After="2.5",
                                      RateLimit='"submit";r=0;t=3', RateLimit_Policy='"submit";q=5;w=10'), now=NOW)
    assert type(error) is TooManyRequests and isinstance(error, ServerBusy)
    assert error.status == 429 and error.retry_after == 3 and isinstance(error.retry_after, int)
    assert error.rate_limit == RateLimit("submit", 0, 3, 5, 10)
    assert error.detail == "over the submit rate" and error.method == "POST" and error.url == BASE + "jobs"
    bare = rules.answer_error(answer(429, b"slow down", content_type="text/plain"), now=NOW)  # a proxy's 429
    assert type(bare) is TooManyRequests and bare.retry_after is None and bare.rate_limit is None
    busy = rules.answer_error(answer(503, problem(503, "full"), content_type="application/problem+json",
                                     Retry_After="4", RateLimit='"submit";r=0;t=3'), now=NOW)
    assert type(busy) is ServerBusy and busy.retry_after == 4 and not hasattr(busy, "rate_limit")


def test_submit_is_not_repeated_on_429_but_on_502_503_504_and_lost_connections():
    """The submit's retry statuses leave out 429; other safe requests keep theirs."""
    submit = rules.SUBMIT_RETRYABLE_STATUSES
    assert rules.retry_delay_s(1, 4, status=429, retry_after=1.0, statuses=submit) is None
    for status in (502, 503, 504):
        assert rules.retry_delay_s(1, 4, status=status, retry_after=None, statuses=submit) == 0.2
    assert rules.retry_delay_s(1, 4, status=None, retry_after=None, statuses=submit) == 0.2
    assert rules.retry_delay_s(1, 4, status=429, retry_after=1.0) == 1.0


def test_fresh_asks_for_a_new_job():
    assert rules.submit_headers("k", None, fresh=True) == {"Idempotency-Key": "k", "Cache-Control": "no-cache"}
    assert "Cache-Control" not in rules.submit_headers("k", 3)


def test_a_303_to_a_submit_is_the_reused_job():
    """303 + Location + the job: that job, marked reused; a 303 without the job says where to read it."""
    reused = rules.read_submit(answer(303, job_body("succeeded", "old", result={"x": 1}), Location="/jobs/old"),
                               base=BASE)
    assert reused.reused and reused.id == "old" and reused.status == "succeeded"
    assert reused.url == BASE + "jobs/old" and reused.result == {"x": 1}
    assert rules.reused_location(answer(303, job_body(job_id="old"), Location="/jobs/old")) is None
    new = rules.read_submit(answer(202, job_body(job_id="new"), Location="/jobs/new"), base=BASE)
    assert not new.reused
    assert new == JobState(**{**new.__dict__, "reused": True})  # an answer's detail, not the job's state
    assert rules.reused_location(answer(303, b"", content_type="", Location="/jobs/old")) == BASE + "jobs/old"
    assert rules.reused_location(answer(202, b"", content_type="", Location="/jobs/new")) is None


def test_cli_exit_status_and_line_for_429():
    """429 exits 5 with one line saying when to try again; --fresh is an option of submit; help lists 5."""
    error = TooManyRequests("429: over", status=429, problem=problem(429, "over the submit rate"), retry_after=3)
    assert cli.exit_status(error) == cli.EXIT_TOO_MANY == 5
    assert cli.error_line(error, BASE) == "asyncjobs: too many requests: over the submit rate; retry in 3 s"
    later = TooManyRequests("the server answered 429", status=429)
    assert cli.error_line(later, BASE) == "asyncjobs: too many requests: the server answered 429; retry later"
    assert cli.exit_status(ServerBusy("x", status=503)) == cli.EXIT_UNREACHABLE
    assert cli.build_parser().parse_args(["submit", "echo", "--fresh"]).fresh
    assert not cli.build_parser().parse_args(["submit", "echo"]).fresh
    assert "5 too many requests" in cli.build_parser().format_help()
    assert "5 too many requests" in (cli.__doc__ or "")


# -- against a real server: quotas -----------------------------------------------------------------

async def test_a_burst_over_the_submit_rate_raises_too_many_requests_at_once(start, connect):
    """Beyond the bucket the submit raises TooManyRequests with Retry-After and the RateLimit fields, without
    repeating itself (a repeat would wait Retry-After), and nothing more is stored."""
    url, http = await start(limits={"submit_rate": 0.5, "submit_burst": 2})
    client = connect(url, attempts=4)
    first = await client.submit("echo", {"n": 1})
    second = await client.submit("echo", {"n": 2})
    began = time.monotonic()
    with pytest.raises(TooManyRequests) as caught:
        await client.submit("echo", {"n": 3})
    assert time.monotonic() - began < 1.0
    error = caught.value
    assert error.status == 429 and error.method == "POST" and isinstance(error, ServerBusy)
    assert isinstance(error.retry_after, int) and error.retry_after >= 1
    assert error.rate_limit is not None and error.rate_limit.policy == "submit"
    assert error.rate_limit.remaining == 0 and error.rate_limit.quota == 2
    assert error.rate_limit.reset is not None and error.rate_limit.reset >= 1
    assert error.rate_limit.window == 4  # seconds to refill 2 tokens at 0.5 a second
    assert {job["id"] for job in await stored_jobs(http)} == {first.id, second.id}


async def test_over_the_queued_quota_raises_too_many_requests(start, connect):
    """A submit that would give the caller more queued jobs than allowed: TooManyRequests, nothing stored."""
    url, http = await start(queue={"workers": 1}, limits={"max_queued_per_principal": 1})
    client = connect(url)
    running = await client.submit("block", {"seconds": 30})
    for _ in range(200):
        if (await client.get(running)).status == "running":
            break
        await asyncio.sleep(0.02)
    queued = await client.submit("block", {"seconds": 30})
    with pytest.raises(TooManyRequests) as caught:
        await client.submit("block", {"seconds": 30})
    assert 1 <= caught.value.retry_after <= 60
    assert caught.value.rate_limit is None  # no rate is set, so no RateLimit fields
    assert {job["id"] for job in await stored_jobs(http)} == {running.id, queued.id}
    for job in (queued, running):
        await client.cancel(job)


# -- against a real server: reuse -------------------------------------------------------------------

async def test_an_equal_submit_returns_the_reused_job_and_fresh_makes_a_new_one(start, connect):
    """A task with ``reuse``: an equal submit is answered with the succeeded job (303), a successful submit;
    ``fresh=True`` makes a new job; other params make a new job."""
    url, http = await start(tasks={"echo": {"reuse": 60}})
    client = connect(url)
    first = await client.submit("echo", {"x": 1, "y": [1, 2]})
    assert not first.reused
    done = await client.wait(first, timeout=10)
    assert done.status == "succeeded"
    again = await client.submit("echo", {"y": [1, 2], "x": 1.0})  # equal in canonical JSON
    assert again.reused and again.id == first.id and again.status == "succeeded"
    assert again.result == {"x": 1, "y": [1, 2]} and again.url == first.url
    assert await client.result(again) == {"x": 1, "y": [1, 2]}
    fresh = await client.submit("echo", {"x": 1, "y": [1, 2]}, fresh=True)
    assert not fresh.reused and fresh.id != first.id
    other = await client.submit("echo", {"x": 2, "y": [1, 2]})
    assert not other.reused and other.id not in (first.id, fresh.id)
    assert len(await stored_jobs(http)) == 3


async def test_a_unique_tasks_twin_is_reused_and_fresh_is_not(start, connect):
    """A unique task's equal live job is reused (303); ``fresh=True`` makes a second one all the same."""
    url, _ = await start()
    client = connect(url)
    first = await client.submit("dedupe", {"key": "q", "seconds": 5})
    twin = await client.submit("dedupe", {"key": "q", "seconds": 5})
    assert twin.reused and twin.id == first.id and not twin.terminal
    fresh = await client.submit("dedupe", {"key": "q", "seconds": 5}, fresh=True)
    assert not fresh.reused and fresh.id != first.id
    for job in (first, fresh):
        await client.cancel(job)


# -- against a real server process: the blocking client and the command line -----------------------------

def test_sync_client_reuse_fresh_and_429(server_factory):
    """The blocking client: a reused job, ``fresh=True``, and TooManyRequests beyond the rate."""
    server = server_factory(config_text=toml(echo_reuse=60, limits={"submit_rate": 0.2, "submit_burst": 3}))
    with SyncClient(server.url, request_timeout_s=10.0) as client:
        first = client.wait(client.submit("echo", {"k": "v"}), timeout=10)
        again = client.submit("echo", {"k": "v"})  # a reused job takes no token
        assert again.reused and again.id == first.id
        fresh = client.submit("echo", {"k": "v"}, fresh=True)
        assert not fresh.reused and fresh.id != first.id
        client.submit("echo", {"k": "w"})
        with pytest.raises(TooManyRequests) as caught:
            client.submit("echo", {"k": "z"})
        assert caught.value.retry_after >= 1 and caught.value.rate_limit is not None
        assert caught.value.rate_limit.quota == 3


def test_cli_submit_over_the_rate_exits_5_with_one_line(server_factory):
    """`asyncjobs submit` answered 429: exit 5, nothing on stdout, one line saying when to try again."""
    server = server_factory(config_text=toml(limits={"submit_rate": 0.1, "submit_burst": 1}))
    code, out, err = run_cli("submit", "echo", "n=1", url=server.url)
    assert code == 0 and out.strip() and not err
    code, out, err = run_cli("submit", "echo", "n=2", url=server.url)
    assert code == 5 and out == ""
    line = one_line(err)
    assert line.startswith("asyncjobs: too many requests: ") and "; retry in " in line and line.endswith(" s")
    assert int(line.rsplit("retry in ", 1)[1].split()[0]) >= 1


def test_cli_submit_reuses_and_fresh_makes_a_new_job(server_factory):
    """`asyncjobs submit` prints the reused job's id (and says so on stderr); `--fresh` prints a new one."""
    server = server_factory(config_text=toml(echo_reuse=60))
    code, out, err = run_cli("submit", "echo", "a=1", url=server.url)
    assert code == 0 and not err
    first = out.strip()
    with SyncClient(server.url) as client:
        assert client.wait(first, timeout=10).status == "succeeded"
    code, out, err = run_cli("submit", "echo", "a=1", url=server.url)
    assert code == 0 and out.strip() == first
    assert first in one_line(err) and "reused" in err and "--fresh" in err
    code, out, err = run_cli("submit", "echo", "a=1", "--quiet", url=server.url)
    assert code == 0 and out.strip() == first and not err
    code, out, err = run_cli("submit", "echo", "a=1", "--fresh", url=server.url)
    assert code == 0 and not err and out.strip() not in ("", first)
    code, out, err = run_cli("submit", "echo", "a=1", "--wait", url=server.url)  # reused, already done
    assert code == 0 and '"a": 1' in out
