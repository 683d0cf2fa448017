"""Operations endpoints: /metrics (Prometheus), /openapi.json (OpenAPI 3.1) and the access log."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TEST_MODULES, eventually, submit, wait_status


async def scrape(client) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, parsed by prometheus_client's own parser: {(name, labels): value}."""
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(await resp.text()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_counters_and_histograms_rise_after_jobs_of_several_tasks_run(client):
    """Submitted, completed, failed and canceled counters and the wait/run histograms count each job once, by task."""
    before = await scrape(client)
    ok = [await submit(client, "noop") for _ in range(3)]
    bad = await submit(client, "fail", {"message": "no"})
    blocked = await submit(client, "block", {"seconds": 30})
    for job in ok:
        await wait_status(client, job["id"], "succeeded")
    await wait_status(client, bad["id"], "failed")
    await wait_status(client, blocked["id"], "running")
    assert (await client.post(f"/jobs/{blocked['id']}/cancel")).status == 200
    after = await scrape(client)

    def rise(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert rise("asyncjobs_jobs_submitted_total", task="noop") == 3
    assert rise("asyncjobs_jobs_submitted_total", task="fail") == 1
    assert rise("asyncjobs_jobs_completed_total", task="noop") == 3
    assert rise("asyncjobs_jobs_failed_total", task="fail") == 1
    assert rise("asyncjobs_jobs_canceled_total", task="block") == 1
    assert rise("asyncjobs_jobs_completed_total", task="fail") == 0
    assert rise("asyncjobs_queue_wait_seconds_count", task="noop") == 3
    assert rise("asyncjobs_queue_wait_seconds_count", task="block") == 1
    assert rise("asyncjobs_run_seconds_count", task="noop") == 3
    assert rise("asyncjobs_run_seconds_count", task="block") == 1
    assert value(after, "asyncjobs_run_seconds_bucket", task="noop", le="+Inf") == 3
    assert value(after, "asyncjobs_store_commit_seconds_count") > value(before, "asyncjobs_store_commit_seconds_count")


async def test_jobs_by_status_gauge_matches_the_store(client):
    """The jobs gauge is read at scrape time and agrees with GET /jobs for every status."""
    for _ in range(2):
        await submit(client, "noop")
    await submit(client, "echo", {"a": 1}, delay=3600)
    failed = await submit(client, "fail")
    await wait_status(client, failed["id"], "failed")
    for status in ("succeeded", "queued"):
        deadline = time.monotonic() + 10
        while len((await (await client.get(f"/jobs?status={status}")).json())["jobs"]) < (2 if status == "succeeded"
                                                                                         else 1):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    samples = await scrape(client)
    for status in ("queued", "running", "succeeded", "failed", "canceled"):
        listed = (await (await client.get(f"/jobs?status={status}&limit=500")).json())["jobs"]
        assert value(samples, "asyncjobs_jobs", status=status) == len(listed), status


async def test_waiting_gauges_follow_an_open_long_poll(client):
    """asyncjobs_waiting_clients{channel="long_poll"} is 1 while a long poll is held and 0 after it answers."""
    job = await submit(client, "block", {"seconds": 30})
    poll = asyncio.create_task(client.get(f"/jobs/{job['id']}?wait=20"))
    try:
        deadline = time.monotonic() + 10
        while value(await scrape(client), "asyncjobs_waiting_clients", channel="long_poll") != 1:
            assert time.monotonic() < deadline, "the long poll never showed"
            await asyncio.sleep(0.02)
        await client.post(f"/jobs/{job['id']}/cancel")
        resp = await asyncio.wait_for(poll, 10)
        assert resp.status == 200
    finally:
        poll.cancel()
    samples = await scrape(client)
    assert value(samples, "asyncjobs_waiting_clients", channel="long_poll") == 0
    assert ("asyncjobs_waiting_clients", (("channel", "websocket"),)) in samples


async def test_two_apps_in_one_process_keep_their_own_metrics(make_client, tmp_path):
    """Each App has its own registry: jobs of one never show in the other's /metrics."""
    first, _ = await make_client()
    second, _ = await make_client(store={"path": str(tmp_path / "second.db")})
    job = await submit(first, "noop")
    await wait_status(first, job["id"], "succeeded")
    assert value(await scrape(first), "asyncjobs_jobs_submitted_total", task="noop") == 1
    assert value(await scrape(second), "asyncjobs_jobs_submitted_total", task="noop") == 0


async def test_openapi_describes_the_monitors_pages_for_a_missing_or_expired_job(make_client):
    """A browser asking the monitor for a missing or an expired job gets a page with the status; the document
    says so beside the problem an API client gets."""
    client, _ = await make_client(jobs={"max_age": 0.3})
    responses = (await (await client.get("/openapi.json")).json())["paths"]["/jobs/{job_id}"]["get"]["responses"]
    job = await submit(client, "echo", {"n": 1}, delay=30)
    browser = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    missing = await client.get("/jobs/no-such-job", headers=browser)
    await eventually(lambda: _status_is(client, job["id"], 410), "the job to expire")
    expired = await client.get(f"/jobs/{job['id']}", headers=browser)
    for resp, status in ((missing, 404), (expired, 410)):
        assert (resp.status, resp.content_type) == (status, "text/html")
        assert set(responses[str(status)]["content"]) == {"application/problem+json", "text/html"}


async def _status_is(client, job_id: str, status: int) -> bool:
    return (await client.get(f"/jobs/{job_id}")).status == status


@pytest.mark.parametrize("auth", [False, True])
async def test_openapi_describes_every_route_of_the_app(make_client, auth):
    """/openapi.json is OpenAPI 3.1 and names every (method, path) the app serves, task routes included, and
    with auth on the sign-in routes; the job's owner and the admins' owner filter; protocol version 1.4."""
    token = "a-token-for-the-openapi-test"
    client, app = await make_client(**({"auth": {"tokens": {"alice": token}}} if auth else {}))
    resp = await client.get("/openapi.json", headers={"Authorization": f"Bearer {token}"} if auth else {})
    assert resp.status == 200 and resp.content_type == "application/json"
    doc = await resp.json()
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["description"].endswith("Protocol version 1.4.")
    assert "owner" in doc["components"]["schemas"]["Job"]["properties"]
    assert (("/login" in doc["paths"]) and ("/logout" in doc["paths"])) == auth
    for path in ("/jobs/{job_id}", "/jobs/{job_id}/cancel"):  # a cookie request without the CSRF token
        assert "403" in doc["paths"][path]["post" if path.endswith("cancel") else "delete"]["responses"]
    assert {"Job", "Problem"} <= set(doc["components"]["schemas"])
    served = set()
    for route in app.web.router.routes():
        if route.method in ("HEAD", "*"):
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter") or info.get("prefix")
        served.add((route.method.lower(), path))
    described = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert served <= described, served - described
    assert ("post", "/thumbnails") in described and ("delete", "/items/{item_id}") in described
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op["responses"], (method, path)
            for status, answer in op["responses"].items():
                if (path, status) == ("/healthz", "503"):
                    # PROTOCOL 1.4: /healthz answers its own object, "status": "unavailable", with its 503.
                    assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Health"}
                elif (method, path, status) == ("post", "/login", "401"):
                    assert "text/html" in answer["content"]  # a wrong token gets the sign-in page again
                elif status.startswith(("4", "5")):
                    assert "application/problem+json" in answer["content"], (method, path, status)
    submit_variants = doc["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
    assert {v["properties"]["task"]["const"] for v in submit_variants} == set(app.registry.names())
    monitor = doc["paths"]["/jobs/{job_id}"]["get"]
    assert {p["name"] for p in monitor["parameters"]} >= {"job_id", "wait", "redirect"}
    assert {p["name"] for p in doc["paths"]["/jobs"]["get"]["parameters"]} == {
        "status", "task", "limit", "cursor", "owner"}


def _config(access_log: str | None) -> str:
    server = f'[server]\naccess_log = "{access_log}"\n' if access_log else ""
    return server + f"[tasks]\nmodules = {TEST_MODULES!r}\n".replace("'", '"')


@pytest.mark.parametrize("mode", ["json", "text", "off"])
async def test_access_log_writes_one_line_per_request_only_when_enabled(server_factory, http, mode):
    """access_log = "json" writes JSON lines (method, path, status, duration, remote); "text" a line; "off" none."""
    server = server_factory(config_text=_config(None if mode == "off" else mode))
    async with http.get(f"{server.url}/healthz") as resp:
        assert resp.status == 200
    async with http.get(f"{server.url}/jobs/nope") as resp:
        assert resp.status == 404
    async with http.get(f"{server.url}/healthz?x=1&access_token=sekrit-0123456789") as resp:
        assert resp.status == 200  # the query's bearer token (as browsers' streams send it) is never logged
    deadline = time.monotonic() + 5
    # An access line is written once its answer is sent: the last request's may come a moment after it.
    while mode != "off" and "/jobs/nope" not in server.log() or mode == "json" and server.log().count('{"') < 3:
        assert time.monotonic() < deadline, server.log()
        await asyncio.sleep(0.05)
    lines = server.log().splitlines()
    if mode == "json":
        records = [json.loads(line) for line in lines if line.startswith("{")]
        assert [(r["method"], r["path"], r["status"]) for r in records] == [("GET", "/healthz", 200),
                                                                           ("GET", "/jobs/nope", 404),
                                                                           ("GET", "/healthz", 200)]
        assert all(r["remote"] == "127.0.0.1" and r["duration_s"] >= 0 for r in records)
    elif mode == "text":
        assert any("GET /jobs/nope" in line and " 404 " in line for line in lines), lines
        await eventually(lambda: "access_token=redacted" in server.log(), "the third request's line")
    else:
        await asyncio.sleep(0.3)
        assert not any("/healthz" in line or "/jobs/nope" in line for line in server.log().splitlines())
    assert "sekrit" not in server.log()


def test_an_unknown_access_log_mode_stops_the_start():
    """server.access_log accepts only off, text and json."""
    from asyncjobs import config
    from asyncjobs.errors import ConfigError

    with pytest.raises(ConfigError, match="server.access_log"):
        config.from_dict({"server": {"access_log": "yaml"}})


def test_run_time_buckets_count_each_observation_at_or_below_their_bound() -> None:
    """The per-task histograms are counted in plain numbers and exposed as prometheus_client would: a run
    of exactly a bucket's bound counts in that bucket, the buckets are cumulative, and the sum is exact."""
    from asyncjobs.models import Job, Status, start, succeed
    from asyncjobs.web.metrics import Metrics

    metrics = Metrics()
    for i, run_s in enumerate([0.005, 0.0051, 2.5, 4000.0]):
        job = Job(id=f"j{i}", task="noop", params=b"{}", status=Status.QUEUED, priority=0, created_at=100.0,
                  expires_at=1e9, run_at=100.0, max_attempts=1)
        for change in (job, job := start(job, 100.0), succeed(job, 100.0 + run_s, result=None, result_type=None,
                                                                retention_s=60)):
            metrics.observe_job(change)
    samples = {}
    for family in text_string_to_metric_families(metrics.exposition({}, {}).decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    bucket = {le: value(samples, "asyncjobs_run_seconds_bucket", task="noop", le=le)
              for le in ("0.005", "0.01", "2.5", "5.0", "3600.0", "+Inf")}
    assert bucket == {"0.005": 1, "0.01": 2, "2.5": 3, "5.0": 3, "3600.0": 3, "+Inf": 4}
    assert value(samples, "asyncjobs_run_seconds_count", task="noop") == 4
    assert value(samples, "asyncjobs_run_seconds_sum", task="noop") == pytest.approx(0.005 + 0.0051 + 2.5 + 4000)
    assert value(samples, "asyncjobs_jobs_submitted_total", task="noop") == 4
    assert value(samples, "asyncjobs_jobs_completed_total", task="noop") == 4
    assert value(samples, "asyncjobs_jobs_failed_total", task="noop") == 0
    assert value(samples, "asyncjobs_queue_wait_seconds_count", task="noop") == 4
