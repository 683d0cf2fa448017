"""W2 end to end: 20,000 `noop` jobs submitted at 64 concurrency, until every one is confirmed terminal.

    python bench/w2_end_to_end.py [--jobs 20000] [--concurrency 64] [--synchronous full]

The clock starts before the first `POST /jobs` and stops when every submitted
id has been seen terminal through the protocol: first a long poll on the
last job submitted (the queue is FIFO for equal priority), then sweeps of
`GET /jobs?status=succeeded&limit=500` following `next` links, striking ids
off; any id still missing after a sweep is long-polled on its own. A Python
aiohttp client (one process) on the same two cores as the server, unpinned.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp
import orjson

from server import Server, machine

TERMINAL = {"succeeded", "failed", "canceled"}


async def run(server: Server, jobs: int, concurrency: int, deadline_s: float) -> dict:
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
        await asyncio.wait_for(asyncio.gather(*(submitter() for _ in range(concurrency))), deadline_s)
        t_submitted = time.perf_counter()

        async def long_poll(job_id: str) -> str:
            async with session.get(f"/jobs/{job_id}?wait=30&redirect=false") as r:
                return (await r.json(loads=orjson.loads))["status"]

        await asyncio.wait_for(long_poll(ids[-1]), deadline_s)
        pending = set(ids)
        failed = 0
        sweeps = 0
        while pending and time.perf_counter() - t0 < deadline_s:
            sweeps += 1
            url: str | None = "/jobs?status=succeeded&limit=500"
            while url and pending:
                async with session.get(url) as r:
                    page = await r.json(loads=orjson.loads)
                pending.difference_update(j["id"] for j in page["jobs"])
                url = page["next"]
            if pending and len(pending) < 1000:  # stragglers (or failures): ask each one
                statuses = await asyncio.gather(*(long_poll(j) for j in list(pending)))
                for job_id, status in zip(list(pending), statuses):
                    if status in TERMINAL:
                        pending.discard(job_id)
                        failed += status != "succeeded"
        t_done = time.perf_counter()
    if pending:
        raise RuntimeError(f"{len(pending)} jobs not terminal after {deadline_s} s")
    return {"jobs": len(ids), "submit_s": t_submitted - t0, "total_s": t_done - t0, "sweeps": sweeps,
            "not_succeeded": failed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--synchronous", default="full", choices=["full", "normal"])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--deadline", type=float, default=300, help="give up after this many seconds")
    args = parser.parse_args()
    print(machine())
    print(f"W2: {args.jobs} noop jobs, {args.concurrency} submitters, synchronous={args.synchronous}, "
          f"{args.workers} workers")
    server = Server(workers=args.workers, synchronous=args.synchronous)
    try:
        r = asyncio.run(run(server, args.jobs, args.concurrency, args.deadline))
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
