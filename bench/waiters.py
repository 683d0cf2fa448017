"""W3 wake latency and W4 idle waiters: how fast and how cheaply clients learn of completions.

    python bench/waiters.py [--jobs 1000] [--idle 10000]

W3: jobs of the `stamp` task return the moment they finished; each is awaited
by a long poll, an SSE stream and a WebSocket subscriber, and each channel's
receipt time minus that moment is its wake latency.
W4: idle long polls, then idle WebSockets, held on a running job: the
server's resident memory per waiter, and W1's submit load (wrk, 64
connections, on core 1 with the server pinned to core 0; Python submitters if
wrk is missing) with and without them held.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import time

import aiohttp
import orjson

from server import BENCH, Server, machine, percentile


async def sse_until_terminal(session: aiohttp.ClientSession, url: str) -> tuple[float, dict]:
    async with session.get(url) as resp:
        data = None
        async for raw in resp.content:
            line = raw.rstrip(b"\r\n")
            if line.startswith(b"data: "):
                data = orjson.loads(line[6:])
            elif not line and data is not None:
                if data["status"] in ("succeeded", "failed", "canceled"):
                    return time.time(), data
                data = None
    raise RuntimeError("stream ended early")


async def w3(server: Server, jobs: int, batch: int) -> dict[str, list[float]]:
    lat: dict[str, list[float]] = {"long poll": [], "sse": [], "websocket": []}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(server.url, connector=connector) as session:
        ws = await session.ws_connect("/ws")
        done_ws: dict[str, asyncio.Future] = {}

        async def read_ws() -> None:
            async for msg in ws:
                body = orjson.loads(msg.data)
                if body.get("type") == "job" and body["job"]["status"] == "succeeded":
                    fut = done_ws.get(body["job"]["id"])
                    if fut and not fut.done():
                        fut.set_result((time.time(), body["job"]))

        reader = asyncio.create_task(read_ws())
        for start in range(0, jobs, batch):
            n = min(batch, jobs - start)
            ids = []
            for i in range(n):
                async with session.post("/jobs", json={"task": "stamp", "params": {"delay": 0.4 + i * 0.01}}) as r:
                    ids.append((await r.json())["id"])
            loop = asyncio.get_running_loop()
            for job_id in ids:
                done_ws[job_id] = loop.create_future()
            await ws.send_str(orjson.dumps({"op": "subscribe", "jobs": ids}).decode())

            async def long_poll(job_id: str) -> tuple[float, dict]:
                async with session.get(f"/jobs/{job_id}?wait=30&redirect=false") as r:
                    body = await r.json()
                    return time.time(), body

            polls = [asyncio.create_task(long_poll(j)) for j in ids]
            streams = [asyncio.create_task(sse_until_terminal(session, f"/jobs/{j}/events")) for j in ids]
            for channel, tasks in (("long poll", polls), ("sse", streams),
                                   ("websocket", [done_ws[j] for j in ids])):
                for received, job in await asyncio.gather(*tasks):
                    lat[channel].append((received - job["result"]) * 1000)
        reader.cancel()
        await ws.close()
    return lat


async def submit_rate(server: Server, seconds: float = 5.0, concurrency: int = 64) -> float:
    """W1's load (wrk on core 1, the server pinned to core 0) if wrk is here; else Python submitters."""
    if shutil.which("wrk") and shutil.which("taskset"):
        subprocess.run(["taskset", "-a", "-p", "-c", "0", str(server.proc.pid)], stdout=subprocess.DEVNULL, check=True)
        proc = await asyncio.create_subprocess_exec(
            "taskset", "-c", "1", "wrk", "-t1", f"-c{concurrency}", f"-d{int(seconds)}s",
            "-s", str(BENCH / "submit.lua"), f"{server.url}/jobs", stdout=asyncio.subprocess.PIPE)
        out = (await proc.communicate())[0].decode()
        if "Non-2xx" in out:
            raise RuntimeError(out)
        return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    count = 0
    deadline = time.monotonic() + seconds
    body = orjson.dumps({"task": "noop"})
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(server.url, connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one() -> None:
            nonlocal count
            while time.monotonic() < deadline:
                async with session.post("/jobs", data=body, headers=headers) as r:
                    assert r.status == 202
                    await r.read()
                count += 1

        await asyncio.gather(*(one() for _ in range(concurrency)))
    return count / seconds


async def waiting(session: aiohttp.ClientSession) -> dict:
    async with session.get("/healthz") as r:
        return (await r.json())["waiting"]


async def w4(server: Server, idle: int) -> dict[str, float]:
    out: dict[str, float] = {}
    out["submit/s without waiters"] = await submit_rate(server)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(server.url, connector=connector, timeout=timeout) as session:
        async with session.post("/jobs", json={"task": "sleep", "params": {"seconds": 3600, "steps": 1}}) as r:
            job_id = (await r.json())["id"]
        await asyncio.sleep(1.0)
        base = server.rss_kib()
        async def hold_poll() -> None:
            async with session.get(f"/jobs/{job_id}?wait=600") as resp:
                await resp.read()

        polls = []
        for _ in range(0, idle, 200):  # in steps, so the listen backlog keeps up
            polls += [asyncio.create_task(hold_poll()) for _ in range(min(200, idle - len(polls)))]
            await asyncio.sleep(0.05)
        deadline = time.monotonic() + 120
        while (await waiting(session))["long_polls"] < idle:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {(await waiting(session))['long_polls']} long polls held")
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        out["RSS KiB per long poll"] = (server.rss_kib() - base) / idle
        out["submit/s with long polls held"] = await submit_rate(server)
        for task in polls:
            task.cancel()
        await asyncio.gather(*polls, return_exceptions=True)
    async with aiohttp.ClientSession(server.url, connector=aiohttp.TCPConnector(limit=0),
                                     timeout=timeout) as session:
        while (await waiting(session))["long_polls"] > 0:
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        base = server.rss_kib()
        sockets = []
        gate = asyncio.Semaphore(200)

        async def hold_socket() -> None:
            async with gate:
                ws = await session.ws_connect("/ws", heartbeat=None)
                await ws.send_str(orjson.dumps({"op": "subscribe", "jobs": [job_id]}).decode())
                await ws.receive()
                sockets.append(ws)

        await asyncio.gather(*(hold_socket() for _ in range(idle)))
        await asyncio.sleep(1.0)
        out["RSS KiB per WebSocket"] = (server.rss_kib() - base) / idle
        out["submit/s with WebSockets held"] = await submit_rate(server)
        await asyncio.gather(*(ws.close() for ws in sockets))
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--idle", type=int, default=10000)
    parser.add_argument("--synchronous", default="full")
    args = parser.parse_args()
    print(f"# {time.strftime('%Y-%m-%d')} {machine()}, store.synchronous={args.synchronous}")
    with Server(synchronous=args.synchronous) as server:
        lat = await w3(server, args.jobs, args.batch)
        print(f"W3 wake latency over {args.jobs} jobs (ms, handler return to client receipt):")
        for channel, values in lat.items():
            print(f"  {channel:10s} p50 {percentile(values, 50):6.2f}  p99 {percentile(values, 99):6.2f}"
                  f"  max {max(values):6.2f}")
    with Server(synchronous=args.synchronous) as server:
        figures = await w4(server, args.idle)
        print(f"W4 idle waiters ({args.idle} of each):")
        for name, value in figures.items():
            print(f"  {name:32s} {value:10.1f}")
        ratio = figures["submit/s with long polls held"] / figures["submit/s without waiters"]
        ratio_ws = figures["submit/s with WebSockets held"] / figures["submit/s without waiters"]
        print(f"  submit rate held/without: long polls {ratio:.2f}, WebSockets {ratio_ws:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
