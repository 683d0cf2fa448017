"""W2 end to end: 20,000 `noop` jobs submitted at 64 concurrency, until every one is confirmed terminal.

    python bench/w2_end_to_end.py [--jobs 20000] [--concurrency 64] [--synchronous full]

The clock starts before the first `POST /jobs` and stops when every submitted
id has been seen terminal through the protocol: first a long poll on the
last job submitted (the queue is FIFO for equal priority), then sweeps of
`GET /jobs?status=succeeded&limit=500` following `next` links, striking ids
off; any id still missing after a sweep is long-polled on its own. A Python
aiohttp client (one process) on the same two cores as the server, unpinned.
With `--client raw` the submits are written by a lean HTTP/1.1 client on
asyncio streams (one keep-alive connection per submitter, the same request
bytes each time) that costs the shared cores far less than aiohttp's client;
the confirmation is the same.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time

import aiohttp
import orjson

from server import Server, machine

TERMINAL = {"succeeded", "failed", "canceled"}


async def raw_submitter(server: Server, body: bytes, counter, ids: list[str]) -> None:
    """POST /jobs over one keep-alive connection, parsing only the status, Content-Length and the id."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    request = (f"POST /jobs HTTP/1.1\r\nHost: {server.host}:{server.port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    try:
        for _ in counter:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            data = await reader.readexactly(int(length.group(1)))
            if head[9:12] != b"202":
                raise RuntimeError(f"submit answered {head[:12]!r}: {data[:200]!r}")
            ids.append(orjson.loads(data)["id"])
    finally:
        writer.close()


async def strike_succeeded(session: aiohttp.ClientSession, pending: set[str]) -> None:
    """One sweep of `GET /jobs?status=succeeded`, following `next` links, striking the ids seen off ``pending``."""
    url: str | None = "/jobs?status=succeeded&limit=500"
    while url and pending:
        async with session.get(url) as r:
            page = await r.json(loads=orjson.loads)
        pending.difference_update(j["id"] for j in page["jobs"])
        url = page["next"]


async def confirm_all(session: aiohttp.ClientSession, ids: list[str], *, started: float,
                      deadline_s: float) -> tuple[int, int]:
    """Wait until every id is seen terminal through the protocol: a long poll on the last one submitted, then
    sweeps of the succeeded list, long polls for stragglers (or failures). (sweeps, jobs not succeeded);
    raises if some are not terminal ``deadline_s`` after ``started``."""

    async def long_poll(job_id: str) -> str:
        async with session.get(f"/jobs/{job_id}?wait=30&redirect=false") as r:
            return (await r.json(loads=orjson.loads))["status"]

    await asyncio.wait_for(long_poll(ids[-1]), deadline_s)
    pending = set(ids)
    failed = sweeps = 0
    while pending and time.perf_counter() - started < deadline_s:
        sweeps += 1
        await strike_succeeded(session, pending)
        if pending and len(pending) < 1000:
            waiting = list(pending)
            statuses = await asyncio.gather(*(long_poll(j) for j in waiting))
            for job_id, status in zip(waiting, statuses):
                if status in TERMINAL:
                    pending.discard(job_id)
                    failed += status != "succeeded"
    if pending:
        raise RuntimeError(f"{len(pending)} jobs not terminal after {deadline_s} s")
    return sweeps, failed


async def run(server: Server, jobs: int, concurrency: int, deadline_s: float, client: str = "aiohttp") -> dict:
    ids: list[str] = []
    body = orjson.dumps({"task": "noop", "params": {}})
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(server.url, connector=connector) as session:
        counter = iter(range(jobs))

        async def submitter() -> None:
            for _ in counter:
                async with session.post("/jobs", data=body, headers=headers) as r:
                    if r.status != 202:
                        raise RuntimeError(f"submit answered {r.status}: {await r.text()}")
                    ids.append((await r.json(loads=orjson.loads))["id"])

        t0 = time.perf_counter()
        submitters = [submitter() if client == "aiohttp" else raw_submitter(server, body, counter, ids)
                      for _ in range(concurrency)]
        await asyncio.wait_for(asyncio.gather(*submitters), deadline_s)
        t_submitted = time.perf_counter()
        sweeps, failed = await confirm_all(session, ids, started=t0, deadline_s=deadline_s)
        t_done = time.perf_counter()
    return {"jobs": len(ids), "submit_s": t_submitted - t0, "total_s": t_done - t0, "sweeps": sweeps,
            "not_succeeded": failed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--synchronous", default="full", choices=["full", "normal"])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--client", default="aiohttp", choices=["aiohttp", "raw"],
                        help="the submitting client: aiohttp's, or a lean one on asyncio streams")
    parser.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"], help="the server's server.loop")
    parser.add_argument("--deadline", type=float, default=300, help="give up after this many seconds")
    args = parser.parse_args()
    print(machine())
    print(f"W2: {args.jobs} noop jobs, {args.concurrency} submitters ({args.client} client), "
          f"synchronous={args.synchronous}, {args.workers} workers, {args.loop} loop")
    server = Server(workers=args.workers, synchronous=args.synchronous, loop=args.loop)
    try:
        r = asyncio.run(run(server, args.jobs, args.concurrency, args.deadline, args.client))
    finally:
        server.stop()
        import shutil
        shutil.rmtree(server.dir, ignore_errors=True)
    print(f"submitted {r['jobs']} in {r['submit_s']:.2f} s ({r['jobs'] / r['submit_s']:.0f} submits/s)")
    print(f"all terminal after {r['total_s']:.2f} s ({r['sweeps']} list sweeps, {r['not_succeeded']} not succeeded)")
    jps = r["jobs"] / r["total_s"]
    print(f"end to end: {jps:.0f} jobs/s; goal >= 5,000 jobs/s: {'met' if jps >= 5000 else 'NOT met'}")


if __name__ == "__main__":
    main()
