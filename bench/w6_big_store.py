"""W6 big store: monitor `GET` and the first page of `GET /jobs` with 1,000,000 retained jobs vs an empty store.

    python bench/w6_big_store.py [--jobs 1000000] [--gets 2000] [--lists 500] [--concurrency 16]

The big store is built with the server's own migrations and 1,000,000
succeeded `noop` jobs inserted directly with sqlite3 (the rows asyncjobs
writes; expiring a day from now, so the sweeper leaves them). The "empty"
store holds 100 jobs submitted through the protocol and run. Against each:
`GET /jobs/{id}` (answered 303, not followed) for random stored ids, and
`GET /jobs` (first page, default limit 50), by 16 concurrent Python
(aiohttp) clients pinned to core 1, the server pinned to core 0. The
latencies are client-side, so they include the Python client's own cost.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

from server import Server, fill_store, machine, percentile


async def measure(url: str, paths: list[str], concurrency: int, expect: int) -> list[float]:
    lat: list[float] = []
    it = iter(paths)
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=0)) as session:
        async def client() -> None:
            for path in it:
                t = time.perf_counter()
                async with session.get(path, allow_redirects=False) as r:
                    await r.read()
                    if r.status != expect:
                        raise RuntimeError(f"{path} answered {r.status}")
                lat.append((time.perf_counter() - t) * 1000)

        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(concurrency))), 600)
    return lat


async def submit_some(url: str, n: int) -> list[str]:
    async with aiohttp.ClientSession(url) as session:
        ids = []
        for _ in range(n):
            async with session.post("/jobs", json={"task": "noop"}) as r:
                ids.append((await r.json())["id"])
        for job_id in ids:
            async with session.get(f"/jobs/{job_id}?wait=10&redirect=false") as r:
                await r.read()
    return ids


def run_case(name: str, db: Path | None, ids: list[str] | None, args: argparse.Namespace) -> dict:
    server = Server(synchronous="full", db=db)
    try:
        subprocess.run(["taskset", "-a", "-p", "-c", "0", str(server.proc.pid)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if ids is None:
            ids = asyncio.run(submit_some(server.url, 100))
        rng = random.Random(6)
        gets = [f"/jobs/{rng.choice(ids)}" for _ in range(args.gets)]
        # warm-up (connections, first page of the file cache): not counted
        asyncio.run(measure(server.url, gets[:200], args.concurrency, 303))
        get_lat = asyncio.run(measure(server.url, gets, args.concurrency, 303))
        list_lat = asyncio.run(measure(server.url, ["/jobs"] * args.lists, args.concurrency, 200))
        return {"get": get_lat, "list": list_lat, "rss": server.rss_kib()}
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


def main() -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--gets", type=int, default=2000)
    parser.add_argument("--lists", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    print(machine())
    os.sched_setaffinity(0, {1})
    work = Path(tempfile.mkdtemp(prefix="asyncjobs-w6-"))
    try:
        results = {"empty": run_case("empty", None, None, args)}
        t = time.monotonic()
        ids = fill_store(work / "big.db", args.jobs, status="succeeded")
        print(f"built a store of {args.jobs} succeeded jobs in {time.monotonic() - t:.1f} s "
              f"({(work / 'big.db').stat().st_size / 1e6:.0f} MB)")
        results["big"] = run_case("big", work / "big.db", ids, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'store':<8}{'GET p50':>9}{'GET p99':>9}{'list p50':>10}{'list p99':>10}{'RSS MiB':>9}  (ms)")
    for name, r in results.items():
        print(f"{name:<8}{percentile(r['get'], 50):>9.2f}{percentile(r['get'], 99):>9.2f}"
              f"{percentile(r['list'], 50):>10.2f}{percentile(r['list'], 99):>10.2f}{r['rss'] / 1024:>9.0f}")
    e, b = results["empty"], results["big"]
    get_ratio = percentile(b["get"], 99) / percentile(e["get"], 99)
    list_ratio = percentile(b["list"], 99) / percentile(e["list"], 99)
    print(f"p99 ratio big/empty: GET {get_ratio:.2f}, list {list_ratio:.2f}; goal within 2x: "
          f"{'met' if max(get_ratio, list_ratio) <= 2 else 'NOT met'}")


if __name__ == "__main__":
    main()
