"""Real `asyncjobs serve` nodes on one PostgreSQL database, killed, stopped and cut off from it:
nothing acknowledged is lost, a dead node's jobs are taken over after its lease, a late outcome is
discarded, and a database restart gives 503s, never 500s."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from typing import Any

import aiohttp
import asyncpg
import pytest

from asyncjobs.postgres import LOCK_SQL, lock_key
from asyncjobs.tasks import TaskRegistry

from tests.conftest import TEST_MODULES, config_text, eventually
from tests.postgres_cluster import create_database, start_private_cluster

TERMINAL = {"succeeded", "failed", "canceled"}


def node_config(tmp_path) -> str:
    return config_text(cluster={"lease": 1, "heartbeat": 0.3}, files={"dir": str(tmp_path / "files")},
                       queue={"shutdown_grace": 1}, tasks={"modules": TEST_MODULES})


async def job_state(http: aiohttp.ClientSession, url: str, job_id: str) -> dict[str, Any]:
    async with http.get(f"{url}/jobs/{job_id}", allow_redirects=False) as resp:
        assert resp.status in (200, 303), (resp.status, await resp.text())
        return await resp.json()


async def until_terminal(http: aiohttp.ClientSession, url: str, ids: list[str], timeout_s: float) -> dict[str, dict]:
    deadline = time.monotonic() + timeout_s
    states: dict[str, dict] = {}
    for job_id in ids:
        while True:
            states[job_id] = await job_state(http, url, job_id)
            if states[job_id]["status"] in TERMINAL:
                break
            assert time.monotonic() < deadline, f"job {job_id} stayed {states[job_id]['status']}"
            await asyncio.sleep(0.05)
    return states


async def test_kill_9_of_a_node_mid_load_loses_nothing_and_its_jobs_run_elsewhere(server_factory, tmp_path,
                                                                                  postgres_url):
    """Three nodes take a stream of submits; one is killed with SIGKILL mid-load. Every job acknowledged (by
    any node, the dead one too) ends; the dead node's running jobs are run again by the others after its
    lease (whoami allows a second attempt)."""
    config = node_config(tmp_path)
    servers = [server_factory("--db", postgres_url, "--workers", "4", config_text=config) for _ in range(3)]
    victim = servers[0]
    assert victim.proc is not None
    victim_pid = victim.proc.pid
    acked: list[str] = []
    refused = 0
    async with aiohttp.ClientSession() as http:

        async def submit(i: int) -> None:
            nonlocal refused
            server = servers[i % 3]
            try:
                async with http.post(f"{server.url}/jobs", json={"task": "whoami",
                                                                  "params": {"seconds": 1.0, "steps": 2}}) as resp:
                    assert resp.status == 202, await resp.text()
                    acked.append((await resp.json())["id"])
            except aiohttp.ClientError:
                refused += 1  # the dead node: not acknowledged, so not owed

        for i in range(90):
            if i == 45:
                victim.kill()
            await submit(i)
            await asyncio.sleep(0.01)
        assert refused >= 14  # a third of the second half went to the dead node
        states = await until_terminal(http, servers[1].url, acked, timeout_s=60)
    statuses = {s["status"] for s in states.values()}
    assert statuses <= {"succeeded", "failed"}, statuses
    interrupted = [s for s in states.values() if s["status"] == "failed"]
    assert all(s["error"]["type"] == "interrupted" for s in interrupted), interrupted
    rerun = [s for s in states.values() if s["status"] == "succeeded" and s["attempts"] == 2]
    assert rerun, "the dead node held running jobs: the others must have run them again"
    assert all(s["result"]["pid"] != victim_pid for s in rerun)


async def test_a_node_stopped_past_its_lease_loses_the_job_and_its_late_outcome_is_discarded(
        server_factory, tmp_path, postgres_url):
    """A runs a job and is frozen (SIGSTOP) past its lease; B takes the job over and runs it; A, thawed,
    finishes its attempt too, but its outcome is not stored: the job keeps B's."""
    config = node_config(tmp_path)
    a = server_factory("--db", postgres_url, config_text=config)
    assert a.proc is not None
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{a.url}/jobs", json={"task": "whoami", "params": {"seconds": 3, "steps": 1}}) as resp:
            job_id = (await resp.json())["id"]
        await eventually(lambda: _running(http, a.url, job_id), "the job to run on A")
        b = server_factory("--db", postgres_url, config_text=config)
        assert b.proc is not None
        a.proc.send_signal(signal.SIGSTOP)
        try:
            done = (await until_terminal(http, b.url, [job_id], timeout_s=30))[job_id]
        finally:
            a.proc.send_signal(signal.SIGCONT)
        assert done["status"] == "succeeded" and done["attempts"] == 2
        assert done["result"] == {"pid": b.proc.pid, "attempt": 2}
        await eventually(lambda: re.search(r"lease ended|changed under its worker", a.log()),
                         "A to drop its late outcome", timeout_s=15)
        after = await job_state(http, a.url, job_id)
    assert after["result"] == {"pid": b.proc.pid, "attempt": 2} and after["version"] == done["version"]


async def test_a_node_stopped_inside_a_transaction_holds_up_no_other_node(server_factory, tmp_path,
                                                                         postgres_url):
    """A node frozen (SIGSTOP) in the middle of a transaction keeps its locks while it is frozen: here a
    claim holding the lock of a task with a concurrency cap, which every other node's claim then waits for.
    The database ends a session that idles inside a transaction for as long as a lease, so the others go
    on; the frozen node, thawed, finds its transaction gone and loses nothing."""
    config = node_config(tmp_path)
    a = server_factory("--db", postgres_url, config_text=config)
    assert a.proc is not None
    capped = sorted(spec.name for spec in TaskRegistry.from_modules(TEST_MODULES) if spec.concurrency is not None)
    assert capped, "the test tasks need one with a concurrency cap"
    holder = await asyncpg.connect(postgres_url)  # stands in the way of A's next claim
    watcher = await asyncpg.connect(postgres_url)  # reads pg_stat_activity outside any transaction

    async def a_session(state: str) -> bool:
        return bool(await watcher.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name LIKE 'asyncjobs %' AND state = $1"
            " AND ($1 <> 'active' OR wait_event = 'advisory')", state))

    stopped = False
    try:
        async with aiohttp.ClientSession() as http:
            held = holder.transaction()
            await held.start()
            for task in capped:
                await holder.execute(LOCK_SQL, lock_key("concurrency", task))
            async with http.post(f"{a.url}/jobs", json={"task": "noop"}) as resp:
                assert resp.status == 202, await resp.text()
                on_a = (await resp.json())["id"]
            await eventually(lambda: a_session("active"), "A's claim to wait for the lock")
            a.proc.send_signal(signal.SIGSTOP)
            stopped = True
            await held.commit()  # A's claim takes the lock now, and A cannot go on to its commit
            await eventually(lambda: a_session("idle in transaction"), "A to hold the lock, frozen")
            b = server_factory("--db", postgres_url, config_text=config)
            async with http.post(f"{b.url}/jobs", json={"task": capped[0], "params": {"seconds": 0.1}}) as resp:
                assert resp.status == 202, await resp.text()
                on_b = (await resp.json())["id"]
            done = (await until_terminal(http, b.url, [on_b], timeout_s=20))[on_b]
            assert done["status"] == "succeeded", done
            a.proc.send_signal(signal.SIGCONT)
            stopped = False
            assert (await until_terminal(http, a.url, [on_a], timeout_s=20))[on_a]["status"] == "succeeded"
            assert "Traceback" not in a.log() and re.search(r"cannot claim jobs: store write failed", a.log())
    finally:
        if stopped:
            a.proc.send_signal(signal.SIGCONT)
        await holder.close()
        await watcher.close()


async def test_a_frozen_nodes_listener_is_ended_so_it_cannot_hold_the_notification_queue(server_factory, tmp_path,
                                                                                        postgres_url):
    """A node frozen (SIGSTOP) keeps its listening connection open and stops reading it: the database cannot
    drop a notification from its queue until every listener has read it, so under load the queue would
    fill and every node's writes fail. The other nodes end a listener silent for a whole lease, even one
    blocked sending to its frozen node; a live node's listener stays; the frozen node, thawed, listens
    again and goes on."""
    config = node_config(tmp_path)
    a = server_factory("--db", postgres_url, config_text=config)
    b = server_factory("--db", postgres_url, config_text=config)
    assert a.proc is not None
    watcher = await asyncpg.connect(postgres_url)

    async def listener(url: str) -> int | None:
        async with http.get(f"{url}/healthz") as resp:
            node = (await resp.json())["node"]
        return await watcher.fetchval("SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                                      " AND application_name = left('asyncjobs-listen ' || $1::text, 63)", node)

    stopped = False
    try:
        async with aiohttp.ClientSession() as http:
            await eventually(lambda: listener(a.url), "A to listen")
            a_pid, b_pid = await listener(a.url), await listener(b.url)
            assert a_pid and b_pid
            a.proc.send_signal(signal.SIGSTOP)
            stopped = True
            # More than the sockets hold (7 MB, distinct: equal ones in a transaction are sent once): A's
            # session blocks, sending to a node that does not read.
            await watcher.execute("SELECT pg_notify('asyncjobs_changes', repeat('x', 7000) || g)"
                                  " FROM generate_series(1, 1000) g")

            async def a_ended() -> bool:
                return not await watcher.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", a_pid)

            await eventually(a_ended, "A's silent listening session to be ended", timeout_s=20)
            assert await listener(b.url) == b_pid, "B pinged all along: its listener stays"
            await eventually(lambda: re.search(r"ended the listening session 'asyncjobs-listen .*"
                                               r" and blocked sending to its node", b.log()),
                             "B to say whose session it ended, and that it was blocked")
            a.proc.send_signal(signal.SIGCONT)
            stopped = False
            await eventually(lambda: re.search(r"change feed: listening again", a.log()), "A to listen again")
            assert await listener(a.url) not in (None, a_pid)
            async with http.post(f"{a.url}/jobs", json={"task": "noop"}) as resp:
                assert resp.status == 202, await resp.text()
                job_id = (await resp.json())["id"]
            assert (await until_terminal(http, b.url, [job_id], timeout_s=20))[job_id]["status"] == "succeeded"
            assert await listener(b.url) == b_pid
            assert "Traceback" not in a.log() + b.log()
    finally:
        if stopped:
            a.proc.send_signal(signal.SIGCONT)
        await watcher.close()


async def _running(http: aiohttp.ClientSession, url: str, job_id: str) -> bool:
    return (await job_state(http, url, job_id))["status"] == "running"


@pytest.fixture
def private_cluster():
    cluster, remove = start_private_cluster()
    try:
        yield cluster
    finally:
        remove()


async def test_a_database_restart_mid_load_gives_503s_never_500s_and_loses_nothing(server_factory, tmp_path,
                                                                                    private_cluster):
    """Two nodes take submits while PostgreSQL is stopped and started again: every answer is 202 or 503 (with
    Retry-After), /healthz says unavailable meanwhile, the nodes reconnect on their own, and every job
    acknowledged ends; meanwhile a malformed ?wait is still a 400, not a 503."""
    url = create_database(private_cluster.server)
    config = node_config(tmp_path)
    servers = [server_factory("--db", url, config_text=config) for _ in range(2)]
    answers: list[tuple[int, bool]] = []
    acked: list[str] = []
    async with aiohttp.ClientSession() as http:

        async def load(seconds: float) -> None:
            deadline = time.monotonic() + seconds
            i = 0
            while time.monotonic() < deadline:
                server = servers[i % 2]
                i += 1
                async with http.post(f"{server.url}/jobs", json={"task": "whoami",
                                                                  "params": {"seconds": 0.1, "steps": 1}}) as resp:
                    answers.append((resp.status, "Retry-After" in resp.headers))
                    if resp.status == 202:
                        acked.append((await resp.json())["id"])
                await asyncio.sleep(0.02)

        loader = asyncio.create_task(load(9.0))
        await asyncio.sleep(2.0)
        await asyncio.to_thread(private_cluster.stop)
        try:
            await asyncio.sleep(1.0)
            for server in servers:
                async with http.get(f"{server.url}/healthz") as resp:
                    body = await resp.json()
                    assert resp.status == 503 and body["status"] == "unavailable" and body["store"] == "down"
                    assert "Retry-After" in resp.headers
                # A client's mistake stays a 400 while the store is away: the job's status and ETag that
                # a malformed ?wait's 400 carries are extras, and looking them up must not make it a 503.
                async with http.get(f"{server.url}/jobs/{acked[0]}?wait=soon") as resp:
                    problem = await resp.json()
                    assert resp.status == 400, (resp.status, problem)
                    assert problem["errors"] == [{"field": "wait", "message": "expected a non-negative number"}]
            await asyncio.sleep(1.0)
        finally:
            await asyncio.to_thread(private_cluster.start)
        await loader
        statuses = {status for status, _ in answers}
        assert statuses <= {202, 503}, statuses
        assert 503 in statuses and all(retry for status, retry in answers if status == 503)
        assert answers[-1][0] == 202  # back on their own
        for server in servers:
            async def healthy(server: Any = server) -> bool:
                async with http.get(f"{server.url}/healthz") as resp:
                    body = await resp.json()
                    return resp.status == 200 and body["feed"] == "up"

            await eventually(healthy, "the node to listen again", timeout_s=20)
        states = await until_terminal(http, servers[0].url, acked, timeout_s=60)
    assert {s["status"] for s in states.values()} <= {"succeeded", "failed"}
    assert all(s["error"]["type"] == "interrupted" for s in states.values() if s["status"] == "failed")
    assert sum(s["status"] == "succeeded" for s in states.values()) >= len(acked) - 5
    for server in servers:
        assert " 500 " not in server.log() and "Traceback" not in server.log()


async def test_a_node_started_while_its_database_is_away_answers_503_and_starts_once_it_is_back(
        server_factory, tmp_path, private_cluster):
    """A node whose database is down when it starts (a host's boot, a compose file) listens all the same:
    /healthz says unavailable and every other request gets a 503 problem with Retry-After, never a 500; once
    the database is up the node connects on its own and runs jobs. A node stopped while it waits exits
    cleanly. A database that refuses (here, one that does not exist) stops the start as it would have at
    once: exit 1, saying why, whether the node had to wait for the server or not."""
    url = create_database(private_cluster.server)
    missing = url.rsplit("/", 1)[0] + "/no_such_database"
    config = node_config(tmp_path)
    await asyncio.to_thread(private_cluster.stop)
    try:
        node = server_factory("--db", url, config_text=config)
        quitter = server_factory("--db", url, config_text=config)
        refused = server_factory("--db", missing, config_text=config)
        async with aiohttp.ClientSession() as http:
            for server in (node, quitter):
                async with http.get(f"{server.url}/healthz") as resp:
                    body = await resp.json()
                    assert resp.status == 503 and body["status"] == "unavailable", body
                    assert body["store"] == "down" and body["feed"] == "down" and "Retry-After" in resp.headers
            for method, path, sent in (("POST", "/jobs", {"task": "whoami", "params": {"seconds": 0}}),
                                       ("GET", "/jobs", None), ("GET", "/jobs/nosuchjob", None),
                                       ("GET", "/metrics", None)):
                async with http.request(method, f"{node.url}{path}", json=sent) as resp:
                    assert resp.status == 503, (method, path, resp.status, await resp.text())
                    assert resp.content_type == "application/problem+json" and "Retry-After" in resp.headers
            assert await asyncio.to_thread(quitter.terminate, 10.0) == 0
            await asyncio.sleep(1.5)  # a few attempts to connect
            assert node.proc is not None and node.proc.poll() is None, node.log()
            assert refused.proc is not None and refused.proc.poll() is None, refused.log()
    finally:
        await asyncio.to_thread(private_cluster.start)
    await asyncio.to_thread(refused.proc.wait, 20)
    assert refused.proc.returncode == 1 and "no_such_database" in refused.log(), refused.log()
    assert "Traceback" not in refused.log()
    async with aiohttp.ClientSession() as http:
        async def healthy() -> bool:
            async with http.get(f"{node.url}/healthz") as resp:
                body = await resp.json()
                return resp.status == 200 and body["store"] == "up" and body["feed"] == "up"

        await eventually(healthy, "the node to reach its database", timeout_s=20)
        async with http.post(f"{node.url}/jobs", json={"task": "whoami", "params": {"seconds": 0}}) as resp:
            assert resp.status == 202, await resp.text()
            job_id = (await resp.json())["id"]
        assert (await until_terminal(http, node.url, [job_id], timeout_s=20))[job_id]["status"] == "succeeded"
    assert "Traceback" not in node.log() + quitter.log() and " 500 " not in node.log()
    with pytest.raises(AssertionError, match=r"server exited with 1:(.|\n)*no_such_database"):
        server_factory("--db", missing, config_text=config)


async def test_a_node_starting_just_after_a_database_restart_leaves_live_leases_alone(server_factory, tmp_path,
                                                                                   private_cluster):
    """At its start a node takes at once the jobs of nodes with no session on the database (killed ones). Just
    after a database restart no node has one yet: a node starting then leaves a live node's job alone until
    its lease ends, rather than failing it (no retries) while that node still runs it."""
    url = create_database(private_cluster.server)
    config = config_text(cluster={"lease": 30, "heartbeat": 10}, files={"dir": str(tmp_path / "files")},
                         queue={"shutdown_grace": 1}, tasks={"modules": TEST_MODULES})
    a = server_factory("--db", url, config_text=config)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{a.url}/jobs", json={"task": "block", "params": {"seconds": 120}}) as resp:
            job_id = (await resp.json())["id"]
        await eventually(lambda: _running(http, a.url, job_id), "the job to run on the first node")
        await asyncio.to_thread(private_cluster.stop)
        await asyncio.sleep(2)
        await asyncio.to_thread(private_cluster.start)
        b = server_factory("--db", url, config_text=config)  # as soon as the database is back
        await asyncio.sleep(1.5)
        assert (await job_state(http, b.url, job_id))["status"] == "running"
        assert "recovered" not in b.log(), b.log()
