"""Job lifecycle through the real HTTP server: cancel, delete, list, ordering, limits, retention, expiry, store."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from datetime import datetime
from typing import Any, Awaitable, Callable

import pytest

from asyncjobs.store import MIGRATIONS
from tests.conftest import postgres_row, submit, wait_status, eventually

PROBLEM = "application/problem+json"
TEST_MODULES = ["asyncjobs.builtin", "tests.sample_tasks"]


# -- helpers -------------------------------------------------------------------

async def start(make_client, **sections: dict[str, Any]):
    """``make_client`` with a short shutdown grace, so a job left running cannot slow the teardown."""
    queue = {"shutdown_grace": 1, **sections.pop("queue", {})}
    return await make_client(queue=queue, **sections)


async def body_of(resp) -> Any:
    """The JSON body whatever its JSON media type (``resp.json()`` refuses problem+json)."""
    return await resp.json(content_type=None)


async def get_job(client, job_id: str) -> tuple[int, Any]:
    async with client.get(f"/jobs/{job_id}", params={"redirect": "false"}) as resp:
        return resp.status, await body_of(resp) if resp.status != 304 else None



async def wait_code(client, job_id: str, code: int, timeout_s: float = 10.0) -> Any:
    """Poll the monitor until it answers ``code``; return that answer's body."""
    async def check():
        status, body = await get_job(client, job_id)
        return (body,) if status == code else None

    (body,) = await eventually(check, f"job {job_id} to answer {code}", timeout_s)
    return body


async def wait_running(client, job_id: str) -> dict:
    return await wait_status(client, job_id, "running")


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


async def assert_problem(resp, status: int) -> dict:
    assert resp.status == status, await resp.text()
    assert resp.content_type == PROBLEM
    problem = await body_of(resp)
    assert problem["status"] == status
    assert {"type", "title", "detail"} <= problem.keys()
    return problem


def stored_row(app, job_id: str) -> tuple | None:
    """The job's row straight from the SQLite file (a reader beside the server's WAL writer), or from the
    PostgreSQL database under --store postgres."""
    if app.config.store.url:
        return postgres_row(app.config.store.url, "SELECT status, started_at, attempts FROM jobs WHERE id = $1",
                            job_id)
    with contextlib.closing(sqlite3.connect(app.config.store.path)) as db:
        return db.execute("SELECT status, started_at, attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()


async def occupy_only_worker(make_client, **sections: dict[str, Any]):
    """An app with one worker, kept busy by a running ``block`` job; returns (client, app, blocker)."""
    queue = {"workers": 1, **sections.pop("queue", {})}
    client, app = await start(make_client, queue=queue, **sections)
    blocker = await submit(client, "block", {"seconds": 30})
    await wait_running(client, blocker["id"])
    return client, app, blocker


async def cancel(client, job_id: str) -> tuple[int, Any]:
    async with client.post(f"/jobs/{job_id}/cancel") as resp:
        return resp.status, await body_of(resp)


async def list_page(client, url: str = "/jobs", **params: Any) -> tuple[dict, Any]:
    async with client.get(url, params=params or None) as resp:
        assert resp.status == 200, await resp.text()
        return await body_of(resp), resp.headers.get("Link")


# -- 1. cancel -------------------------------------------------------------------

async def test_cancel_queued_job_is_canceled_at_once_and_never_runs(make_client):
    """Canceling a queued job answers 200 with it canceled, and the worker never runs it."""
    client, app, blocker = await occupy_only_worker(make_client)
    job = await submit(client, "echo", {"n": 1})
    async with client.post(f"/jobs/{job['id']}/cancel") as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Cache-Control"] == "no-store" and resp.headers["ETag"]
        body = await resp.json()
    assert body["id"] == job["id"]
    assert body["status"] == "canceled"
    assert body["error"]["type"] == "canceled"
    assert body["finished_at"] is not None

    assert (await cancel(client, blocker["id"]))[0] == 200
    marker = await submit(client, "echo", {"marker": True})
    await wait_status(client, marker["id"], "succeeded")  # the worker got past where the job stood
    status, after = await get_job(client, job["id"])
    assert status == 200 and after["status"] == "canceled"
    assert after["started_at"] is None and after["attempts"] == 0
    assert stored_row(app, job["id"]) == ("canceled", None, 0)


async def test_cancel_running_async_job_answers_200_once_stopped(make_client):
    """Canceling a running async handler answers 200 with the job canceled after the handler stopped."""
    client, app = await start(make_client)
    job = await submit(client, "block", {"seconds": 30})
    await wait_running(client, job["id"])
    status, body = await cancel(client, job["id"])
    assert status == 200
    assert body["status"] == "canceled" and body["error"]["type"] == "canceled"
    assert body["finished_at"] is not None
    assert job["id"] not in app.workers.running  # the handler is gone, not merely marked


async def test_cancel_running_sync_job_that_checks_answers_200(make_client):
    """A sync handler that reports progress is stopped at its next report: 200 and canceled."""
    client, _ = await start(make_client)
    job = await submit(client, "spin", {"seconds": 20})
    await wait_running(client, job["id"])
    status, body = await cancel(client, job["id"])
    assert status == 200
    assert body["status"] == "canceled" and body["error"]["type"] == "canceled"


async def test_cancel_stubborn_sync_job_answers_202_then_ends_canceled(make_client):
    """A sync handler that never checks is still stopping after the grace: 202 with the job, later canceled."""
    client, _ = await start(make_client, jobs={"cancel_grace": 0.3})
    job = await submit(client, "stubborn", {"seconds": 3})
    await wait_running(client, job["id"])
    started = time.monotonic()
    status, body = await cancel(client, job["id"])
    assert time.monotonic() - started < 2.5  # answered after the grace, not after the handler
    assert status == 202
    assert body["id"] == job["id"] and body["status"] == "running"
    done = await wait_status(client, job["id"], {"canceled", "succeeded", "failed"}, timeout_s=15)
    assert done["status"] == "canceled" and done["error"]["type"] == "canceled"


async def test_cancel_is_idempotent(make_client):
    """Canceling an already canceled job answers 200 with the job, unchanged."""
    client, _ = await start(make_client)
    job = await submit(client, "block", {"seconds": 30})
    await wait_running(client, job["id"])
    first_status, first = await cancel(client, job["id"])
    second_status, second = await cancel(client, job["id"])
    assert first_status == second_status == 200
    assert second["status"] == "canceled" and second["version"] == first["version"]


async def test_cancel_finished_job_is_409_with_job_status(client):
    """Canceling a succeeded or failed job answers 409 problem details naming its status, with the job's ETag
    (every answer about a job carries one)."""
    ok = await submit(client, "noop")
    bad = await submit(client, "fail", {"message": "no"})
    await wait_status(client, ok["id"], "succeeded")
    await wait_status(client, bad["id"], "failed")
    for job, status in ((ok, "succeeded"), (bad, "failed")):
        async with client.post(f"/jobs/{job['id']}/cancel") as resp:
            problem = await assert_problem(resp, 409)
            etag = resp.headers.get("ETag")
        assert problem["job_status"] == status
        now = (await get_job(client, job["id"]))[1]
        assert now["status"] == status  # and it stays so
        assert etag == f'W/"{now["version"]}"'


async def test_cancel_unknown_job_is_404(client):
    """Canceling an id that was never issued answers 404 problem details."""
    async with client.post("/jobs/no-such-job-id/cancel") as resp:
        await assert_problem(resp, 404)


# -- 2. delete -------------------------------------------------------------------

async def test_delete_finished_job_then_monitor_and_result_are_404(client):
    """Deleting a finished job answers 204 No Content; afterwards monitor and result answer 404."""
    job = await submit(client, "echo", {"a": 1})
    await wait_status(client, job["id"], "succeeded")
    async with client.delete(f"/jobs/{job['id']}") as resp:
        assert resp.status == 204
        assert await resp.read() == b""
    async with client.get(f"/jobs/{job['id']}", allow_redirects=False) as resp:
        await assert_problem(resp, 404)
    async with client.get(f"/jobs/{job['id']}/result") as resp:
        await assert_problem(resp, 404)


async def test_delete_queued_job_is_204_and_it_never_runs(make_client):
    """Deleting a queued job answers 204, it is gone at once, and the worker never runs it."""
    client, app, blocker = await occupy_only_worker(make_client)
    job = await submit(client, "echo", {"n": 1})
    async with client.delete(f"/jobs/{job['id']}") as resp:
        assert resp.status == 204
    assert (await get_job(client, job["id"]))[0] == 404
    assert (await cancel(client, blocker["id"]))[0] == 200
    marker = await submit(client, "echo", {"marker": True})
    await wait_status(client, marker["id"], "succeeded")
    assert (await get_job(client, job["id"]))[0] == 404
    assert stored_row(app, job["id"]) is None


async def test_delete_running_job_cancels_it_then_forgets_it(make_client):
    """Deleting a running async job stops its handler, answers 204, and the job then answers 404."""
    client, app = await start(make_client)
    job = await submit(client, "block", {"seconds": 30})
    await wait_running(client, job["id"])
    async with client.delete(f"/jobs/{job['id']}") as resp:
        assert resp.status == 204
    assert job["id"] not in app.workers.running
    assert (await get_job(client, job["id"]))[0] == 404
    async with client.get(f"/jobs/{job['id']}/result") as resp:
        await assert_problem(resp, 404)


async def test_delete_stubborn_job_is_202_and_record_goes_when_it_stops(make_client):
    """Deleting a handler still stopping after the grace answers 202; the record goes (404) once it stops."""
    client, app = await start(make_client, jobs={"cancel_grace": 0.3})
    job = await submit(client, "stubborn", {"seconds": 3})
    await wait_running(client, job["id"])
    async with client.delete(f"/jobs/{job['id']}") as resp:
        assert resp.status == 202, await resp.text()
        body = await body_of(resp)
    assert body["id"] == job["id"] and body["status"] == "running"
    status, still = await get_job(client, job["id"])  # the handler sleeps on for seconds yet
    assert status == 200 and still["status"] == "running"
    await wait_code(client, job["id"], 404, timeout_s=15)
    await eventually(lambda: job["id"] not in app.workers.running, "the handler to end")
    assert stored_row(app, job["id"]) is None


async def test_delete_unknown_job_is_404(client):
    """Deleting an id that was never issued answers 404 problem details."""
    async with client.delete("/jobs/no-such-job-id") as resp:
        await assert_problem(resp, 404)


# -- 3. list ---------------------------------------------------------------------

async def test_list_is_newest_first_and_filters_by_status_and_task(client):
    """``GET /jobs`` lists newest first as {"jobs", "next"} and filters by status, task and both."""
    submitted = [await submit(client, "noop"), await submit(client, "echo", {"i": 1}),
                 await submit(client, "fail", {"message": "x"}), await submit(client, "echo", {"i": 2}),
                 await submit(client, "noop")]
    for job in submitted:
        await wait_status(client, job["id"], {"succeeded", "failed"})
    ids = [j["id"] for j in submitted]

    page, link = await list_page(client)
    assert set(page) == {"jobs", "next"}
    assert [j["id"] for j in page["jobs"]] == ids[::-1]
    assert page["next"] is None and link is None
    assert page["jobs"][0]["links"]["self"] == f"/jobs/{ids[-1]}"

    page, _ = await list_page(client, status="failed")
    assert [j["id"] for j in page["jobs"]] == [ids[2]]
    page, _ = await list_page(client, task="echo")
    assert [j["id"] for j in page["jobs"]] == [ids[3], ids[1]]
    page, _ = await list_page(client, task="noop", status="succeeded")
    assert [j["id"] for j in page["jobs"]] == [ids[4], ids[0]]
    page, _ = await list_page(client, task="noop", status="failed")
    assert page["jobs"] == [] and page["next"] is None

    page, link = await list_page(client, task="echo", limit=1)  # the next page keeps the filters
    assert [j["id"] for j in page["jobs"]] == [ids[3]]
    rest, _ = await list_page(client, page["next"])
    assert [j["id"] for j in rest["jobs"]] == [ids[1]]


async def test_list_limit_defaults_to_50_and_allows_500(client):
    """Without ``limit`` a page holds 50 jobs and has a next link; ``limit=500`` is accepted."""
    responses = await asyncio.gather(*(client.post("/jobs", json={"task": "noop"}) for _ in range(55)))
    for resp in responses:
        assert resp.status == 202
        resp.release()
    page, link = await list_page(client)
    assert len(page["jobs"]) == 50 and page["next"] is not None and link is not None
    page, link = await list_page(client, limit=500)
    assert len(page["jobs"]) == 55 and page["next"] is None and link is None


async def test_list_rejects_bad_queries_with_problem_errors(client):
    """Out-of-range or non-numeric ``limit``, an unknown status and a bad cursor answer 400 with ``errors``."""
    cases = [({"limit": "501"}, "limit"), ({"limit": "0"}, "limit"), ({"limit": "abc"}, "limit"),
             ({"status": "done"}, "status"), ({"cursor": "abc"}, "cursor"), ({"cursor": "-3"}, "cursor")]
    for params, field in cases:
        async with client.get("/jobs", params=params) as resp:
            problem = await assert_problem(resp, 400)
        assert field in [e["field"] for e in problem["errors"]], (params, problem)


def link_target(link: str) -> str:
    target, _, rel = link.partition(";")
    assert rel.strip() == 'rel="next"', link
    assert target.startswith("<") and target.endswith(">"), link
    return target[1:-1]


async def collect_pages(client, first_url: str, between: Callable[[], Awaitable[None]] | None = None) -> list[list[str]]:
    """Follow ``next`` to the end, checking the Link header matches it; ``between`` runs after page 1."""
    pages, url = [], first_url
    while url is not None:
        page, link = await list_page(client, url)
        pages.append([j["id"] for j in page["jobs"]])
        if page["next"] is None:
            assert link is None
        else:
            assert link_target(link) == page["next"]
        url = page["next"]
        if between is not None and len(pages) == 1:
            await between()
        assert len(pages) < 20, "pagination does not end"
    return pages


async def test_list_cursor_pagination_visits_every_job_once(client):
    """With 7 jobs and ``limit=3`` the ``next`` links (equal to the Link header) visit all 7 once, newest first."""
    ids = [(await submit(client, "noop"))["id"] for _ in range(7)]
    pages = await collect_pages(client, "/jobs?limit=3")
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [i for p in pages for i in p] == ids[::-1]


async def test_list_pagination_is_stable_while_jobs_are_added(client):
    """Jobs submitted between page 1 and page 2 neither repeat nor hide any of the original jobs."""
    ids = [(await submit(client, "noop"))["id"] for _ in range(7)]

    async def add_more() -> None:
        for _ in range(5):
            await submit(client, "noop")

    pages = await collect_pages(client, "/jobs?limit=3", between=add_more)
    seen = [i for p in pages for i in p]
    assert len(seen) == len(set(seen)), "a job appeared twice"
    assert seen == ids[::-1]


# -- 4, 5. ordering and concurrency ------------------------------------------------

async def test_higher_priority_runs_first_then_submission_order(make_client):
    """With one worker, queued jobs start by priority (higher first), then in submission order."""
    client, _, blocker = await occupy_only_worker(make_client)
    priorities = [0, 5, 0, 10, 5]
    jobs = [await submit(client, "sleep", {"seconds": 0.02, "steps": 1}, priority=p) for p in priorities]
    assert (await cancel(client, blocker["id"]))[0] == 200
    done = [await wait_status(client, j["id"], "succeeded") for j in jobs]
    order = sorted(range(len(done)), key=lambda i: ts(done[i]["started_at"]))
    assert order == [3, 1, 4, 0, 2], [(priorities[i], done[i]["started_at"]) for i in order]


async def test_task_concurrency_limit_keeps_runs_apart(make_client):
    """A task with concurrency=1 never runs two jobs at once, even with free workers."""
    client, _ = await start(make_client, queue={"workers": 4})
    jobs = [await submit(client, "one_at_a_time", {"seconds": 0.2}) for _ in range(3)]
    done = [await wait_status(client, j["id"], "succeeded") for j in jobs]
    spans = sorted((ts(j["started_at"]), ts(j["finished_at"])) for j in done)
    for (_, end), (next_start, _) in zip(spans, spans[1:]):
        assert next_start >= end, spans


async def test_a_backlog_of_a_task_at_its_cap_does_not_keep_a_free_worker_idle(make_client):
    """Twelve jobs of a task with concurrency 1, and behind them one of another task, fall due together
    (as after a restart): one capped job starts, and the other job at once on the other worker, not once a
    capped job has run (a claim read only the capped jobs, four for each free worker, and passed them over)."""
    client, _ = await start(make_client, queue={"workers": 2})
    began = time.time()
    capped = [await submit(client, "one_at_a_time", {"seconds": 3.0}, priority=1, delay=1.0) for _ in range(12)]
    job = await submit(client, "echo", {"n": 1}, delay=1.0)
    assert time.time() - began < 0.9
    time.sleep(max(0.0, began + 1.2 - time.time()))  # the server's loop is held: all are due at its next claim
    done = await wait_status(client, job["id"], "succeeded", timeout_s=15)
    assert ts(done["started_at"]) - (began + 1.2) < 0.5, done
    started = [await (await client.get(f"/jobs/{j['id']}", params={"redirect": "false"})).json() for j in capped]
    assert sum(1 for j in started if j["started_at"] and ts(j["started_at"]) <= ts(done["started_at"])) == 1
    for j in capped:
        await client.post(f"/jobs/{j['id']}/cancel")


# -- 6. retention and expiry -------------------------------------------------------

async def test_finished_job_is_readable_then_gone_then_not_found(make_client):
    """A finished job is readable for ``retention``, then its tombstone answers 410, then it is 404."""
    client, _ = await start(make_client, jobs={"retention": 0.5, "tombstone_retention": 0.6})
    job = await submit(client, "echo", {"keep": "me"})
    phases: dict[str, list[str]] = {"monitor": [], "result": []}

    def record(name: str, phase: str) -> None:
        if not phases[name] or phases[name][-1] != phase:
            phases[name].append(phase)

    async def check() -> bool:
        status, body = await get_job(client, job["id"])
        if status == 200 and body["status"] == "succeeded":
            record("monitor", "readable")
        elif status in (410, 404):
            assert body["status"] == status  # problem details
            record("monitor", {410: "gone", 404: "missing"}[status])
        async with client.get(f"/jobs/{job['id']}/result") as resp:
            if resp.status == 200:
                assert await resp.json() == {"keep": "me"}
                record("result", "readable")
            elif resp.status in (410, 404):
                problem = await assert_problem(resp, resp.status)
                if problem.get("job_status") not in ("queued", "running"):  # not merely "not yet"
                    record("result", {410: "gone", 404: "missing"}[resp.status])
        return phases["monitor"][-1:] == phases["result"][-1:] == ["missing"]

    await eventually(check, "the job to be forgotten", timeout_s=15)
    assert phases == {"monitor": ["readable", "gone", "missing"], "result": ["readable", "gone", "missing"]}


async def test_queued_job_past_max_age_is_gone_and_never_runs(make_client):
    """A job still queued when its ``expires_at`` passes answers 410 and is never run."""
    # The blocker ignores cancellation, so it holds the only worker well past the queued job's expiry.
    client, app = await start(make_client, jobs={"max_age": 0.5}, queue={"workers": 1})
    blocker = await submit(client, "stubborn", {"seconds": 2})
    await eventually(lambda: blocker["id"] in app.workers.running, "the blocker to start")  # it is 410 soon
    job = await submit(client, "echo", {"n": 1})
    assert abs(ts(job["expires_at"]) - ts(job["created_at"]) - 0.5) <= 0.002
    problem = await wait_code(client, job["id"], 410, timeout_s=10)
    assert problem["status"] == 410
    await eventually(lambda: stored_row(app, job["id"]) is None, "the expired job to become a tombstone")
    assert blocker["id"] in app.workers.running  # so the job left the queue before any worker was free
    await eventually(lambda: not app.workers.running, "the blocker to end", timeout_s=10)
    assert (await get_job(client, job["id"]))[0] == 410


async def test_a_queued_job_past_max_age_answers_410_as_canceled_before_the_sweep_comes(make_client):
    """Past ``expires_at`` an unfinished job is canceled: its 410 says ``job_status: canceled`` even while the
    sweep (every 10 s with the defaults) has not yet stored that, on the monitor, its long poll, the result,
    the cancel and the delete. The clock is moved on a day, so no sweep runs in between."""
    client, app = await start(make_client)
    job = await submit(client, "echo", {"n": 1}, delay=3600)
    app.queue.clock = lambda: time.time() + 86400 + 5  # past expires_at (jobs.max_age, a day)
    for method, path in (("GET", ""), ("GET", "?wait=1"), ("GET", "/result"), ("POST", "/cancel"), ("DELETE", "")):
        async with client.request(method, f"/jobs/{job['id']}{path}", allow_redirects=False) as resp:
            problem = await body_of(resp)
            assert resp.status == 410, (method, path, resp.status, problem)
            assert problem.get("job_status") == "canceled", (method, path, problem)


async def test_running_job_past_max_age_is_canceled(make_client):
    """A job still running when its ``expires_at`` passes has its handler stopped and answers 410."""
    client, app = await start(make_client, jobs={"max_age": 0.5}, queue={"workers": 1})
    job = await submit(client, "block", {"seconds": 30})
    await eventually(lambda: job["id"] in app.workers.running, "the job to start")
    await wait_code(client, job["id"], 410, timeout_s=10)
    await eventually(lambda: job["id"] not in app.workers.running,
                     "the handler to stop", timeout_s=5)
    async with client.get(f"/jobs/{job['id']}/result") as resp:
        await assert_problem(resp, 410)


# -- 7, 8. delay and concurrent submits --------------------------------------------

async def test_delayed_job_waits_for_its_run_at(client):
    """A job submitted with ``delay`` is queued with ``run_at`` in the future, starts no earlier, then runs."""
    job = await submit(client, "echo", {"late": True}, delay=0.5)
    assert job["status"] == "queued"
    assert abs(ts(job["run_at"]) - ts(job["created_at"]) - 0.5) <= 0.002
    done = await wait_status(client, job["id"], "succeeded")
    assert ts(done["started_at"]) >= ts(job["run_at"])
    assert done["result"] == {"late": True}


async def test_concurrent_submits_are_all_stored_and_run(client):
    """100 simultaneous submits all get 202 with distinct ids; all are listed and all finish."""
    async def one(i: int) -> str:
        async with client.post("/jobs", json={"task": "echo", "params": {"i": i}}) as resp:
            assert resp.status == 202, await resp.text()
            return (await resp.json())["id"]

    ids = await asyncio.gather(*(one(i) for i in range(100)))
    assert len(set(ids)) == 100
    page, _ = await list_page(client, limit=500)
    assert {j["id"] for j in page["jobs"]} == set(ids)

    async def all_succeeded() -> bool:
        page, _ = await list_page(client, limit=500, status="succeeded")
        return {j["id"] for j in page["jobs"]} == set(ids)

    await eventually(all_succeeded, "all 100 jobs to succeed", timeout_s=30)


# -- 9. per-task overrides -----------------------------------------------------------

async def test_task_override_from_config_sets_timeout(make_client):
    """``[tasks.sleep] timeout`` from the config makes a longer sleep fail as a timeout and shows in /tasks."""
    client, _ = await start(make_client, tasks={"modules": TEST_MODULES, "sleep": {"timeout": 0.2}})
    async with client.get("/tasks") as resp:
        assert resp.status == 200
        tasks = {t["name"]: t for t in (await resp.json())["tasks"]}
    assert tasks["sleep"]["timeout"] == 0.2
    assert tasks["echo"]["timeout"] is None
    job = await submit(client, "sleep", {"seconds": 2})
    done = await wait_status(client, job["id"], {"failed", "succeeded"})
    assert done["status"] == "failed" and done["error"]["type"] == "timeout"
    assert ts(done["finished_at"]) - ts(done["started_at"]) < 1.5


# -- 10. the store -------------------------------------------------------------------

@pytest.mark.sqlite_only  # reads the SQLite file's pragmas
async def test_store_file_is_wal_with_the_latest_schema_version(make_client):
    """After jobs ran, the SQLite file is in WAL mode and its ``user_version`` is the latest schema version."""
    client, app = await start(make_client)
    job = await submit(client, "noop")
    await wait_status(client, job["id"], "succeeded")
    with contextlib.closing(sqlite3.connect(app.config.store.path)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


async def test_concurrent_submits_share_commits(make_client):
    """50 simultaneous submits are stored in fewer than 50 commits (group commit)."""
    client, app, blocker = await occupy_only_worker(make_client)  # no claims while the submits commit
    before = app.store.commits
    responses = await asyncio.gather(*(client.post("/jobs", json={"task": "noop"}) for _ in range(50)))
    for resp in responses:
        assert resp.status == 202
        resp.release()
    grown = app.store.commits - before
    assert 1 <= grown < 50, grown
    assert (await cancel(client, blocker["id"]))[0] == 200


async def test_next_claim_shares_the_commit_of_the_last_outcome(make_client):
    """A worker is free once its handler returns: its next claim joins the commit of the outcome it
    just stored, so a run of quick jobs costs about one commit each, not a claim and a finish each."""
    client, app, blocker = await occupy_only_worker(make_client)
    jobs = [await submit(client, "noop") for _ in range(20)]  # queued behind the blocker
    before = app.store.commits
    assert (await cancel(client, blocker["id"]))[0] == 200  # from here the 20 run back to back
    for job in jobs:
        await wait_status(client, job["id"], "succeeded")
    grown = app.store.commits - before
    assert grown <= 30, grown  # about 40 with a claim commit and an outcome commit per job
