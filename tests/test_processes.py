"""`asyncjobs serve --processes N` on PostgreSQL: N nodes on one port, stopped together by SIGTERM."""

from __future__ import annotations

import asyncio
import os
import time

import aiohttp

from tests.conftest import eventually


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


async def test_processes_share_one_port_as_nodes_and_stop_together(server_factory, postgres_url):
    server = server_factory("--db", postgres_url, "--processes", "2", "--workers", "2")
    await eventually(lambda: "(2 processes)" in server.log(), "the parent to say where the service listens")
    assert server.proc is not None
    children = _children(server.proc.pid)
    assert len(children) == 2
    nodes = set()
    # Each new connection goes to one of them, as the kernel chooses; the parent says where the service
    # listens once the first child accepts, so the second may still be starting: ask for up to 30 s.
    deadline = time.monotonic() + 30
    while len(nodes) < 2 and time.monotonic() < deadline:
        async with aiohttp.ClientSession() as http, http.get(f"{server.url}/healthz") as resp:
            body = await resp.json()
            assert resp.status == 200 and body["feed"] == "up"
            nodes.add(body["node"])
        await asyncio.sleep(0.02)
    assert len(nodes) == 2, nodes
    async with aiohttp.ClientSession() as http:
        ids = []
        for i in range(10):
            async with http.post(f"{server.url}/jobs", json={"task": "echo", "params": {"i": i}}) as resp:
                assert resp.status == 202
                ids.append((await resp.json())["id"])
        for job_id in ids:
            async with http.get(f"{server.url}/jobs/{job_id}?wait=10", allow_redirects=False) as resp:
                assert (await resp.json())["status"] == "succeeded"
    assert server.terminate() == 0
    await eventually(lambda: not any(_alive(pid) for pid in children), "every child to stop")


async def test_the_children_do_not_outlive_a_killed_parent(server_factory, postgres_url):
    """kill -9 of the parent: its children are told by the kernel and stop (no orphaned nodes)."""
    server = server_factory("--db", postgres_url, "--processes", "2", "--workers", "1")
    assert server.proc is not None
    await eventually(lambda: len(_children(server.proc.pid)) == 2, "two children")
    children = _children(server.proc.pid)
    server.kill()
    await eventually(lambda: not any(_alive(pid) for pid in children), "the orphaned children to stop",
                     timeout_s=30)


async def test_a_sigterm_while_a_crashed_child_waits_to_restart_starts_no_new_child(server_factory, postgres_url):
    """A child killed (-9) is started again after a second; a SIGTERM to the parent within that second stops
    it at once, with no new child that nobody would tell to stop."""
    server = server_factory("--db", postgres_url, "--processes", "2", "--workers", "1")
    assert server.proc is not None
    await eventually(lambda: "(2 processes)" in server.log(), "the parent to say where the service listens")
    children = _children(server.proc.pid)
    os.kill(children[0], 9)
    await eventually(lambda: "starting it again" in server.log(), "the parent to see its child die")
    began = time.monotonic()
    server.terminate(timeout_s=10)  # before the fix: a new child, never told, kept the parent waiting
    assert time.monotonic() - began < 10
    assert server.log().count("listening on http") == 3  # two children and the parent: none started since
