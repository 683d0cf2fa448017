"""W1 and W2 on PostgreSQL: asyncjobs with 1 node, 2 nodes, --processes 2, and the peer procrastinate.

    python bench/pg.py [--duration 10] [--jobs 5000] [--concurrency 64] [--workers 8] [--fsync on|off]
                       [--setups 1node,2nodes,processes2] [--no-peer] [--no-wrk]

One throwaway PostgreSQL cluster (bench/pg_cluster.py: initdb + pg_ctl, 127.0.0.1, a free port, fsync on
unless --fsync off) for the whole run; every measurement gets a fresh database and a CHECKPOINT first.
Setups of asyncjobs (each `asyncjobs serve --db postgresql://...`, --workers workers per process):

- 1node: one `asyncjobs serve`;
- 2nodes: two `asyncjobs serve` on two ports, the same database, the load spread over both;
- processes2: one `asyncjobs serve --processes 2` (one port, two processes).

A setup that cannot start is reported with the server's own words, and the run goes on.

Per setup:

- W1 (wrk): `wrk -t<ports> -c<connections> -d<duration>s --latency -s bench/pg_submit.lua` (`POST /jobs`,
  `noop`, 202 once the job is committed), wrk's threads spread over the nodes' ports; nothing pinned (the
  two cores are shared by wrk, the server processes and PostgreSQL). req/s, p50/p90/p99, non-2xx.
- W1 (Python client) and W2 in one go: --jobs `noop` submits from --concurrency keep-alive connections (a
  lean HTTP/1.1 client on asyncio streams, connection i to node i mod nodes), each submit timed; then
  the clock runs until every id is seen terminal through the protocol (long poll on the last id, sweeps
  of `GET /jobs?status=succeeded&limit=500`, long polls for stragglers). submits/s and p50/p90/p99 are
  W1's figures on the same footing as procrastinate's defer; jobs/s end to end is W2's.

Then the peer (bench/pg_peer_procrastinate.py) on the same cluster, its own database: defer --jobs jobs
from --concurrency asyncio tasks (W1: defers/s, p50/p90/p99), run by one worker of concurrency --workers
(W2: jobs/s end to end).

RSS: the summed VmRSS of each setup's server processes (every Python process of each node's process
tree), sampled every 100 ms: idle (before the load), peak, and at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from pg_cluster import (  # noqa: E402
    Cluster,
    CpuMeter,
    Node,
    RssSampler,
    machine,
    wait_quiet,
)
from server import percentile  # noqa: E402
from w2_end_to_end import confirm_all  # noqa: E402



@dataclass(frozen=True)
class Setup:
    name: str
    nodes: int
    processes: int

    def describe(self, workers: int) -> str:
        procs = self.nodes * self.processes
        return (f"{self.nodes} node(s) x {self.processes} process(es), {workers} workers each "
                f"({procs * workers} in all)")


SETUPS = {"1node": Setup("1node", 1, 1), "2nodes": Setup("2nodes", 2, 1), "processes2": Setup("processes2", 1, 2)}


class Unavailable(Exception):
    pass


class Nodes:
    """The setup's `asyncjobs serve` processes on one database, with a shared files folder."""

    def __init__(self, setup: Setup, db_url: str, workers: int, loop: str) -> None:
        self.files = Path(tempfile.mkdtemp(prefix="asyncjobs-bench-files-"))
        self.nodes: list[Node] = []
        try:
            for i in range(setup.nodes):
                self.nodes.append(Node(db_url, files_dir=self.files, workers=workers, processes=setup.processes,
                                       loop=loop, name=f"{setup.name}-{i}"))
        except RuntimeError as exc:
            self.stop()
            lines = [line for line in str(exc).splitlines() if line.strip()]
            said = next((line for line in reversed(lines) if "asyncjobs" in line and "error" in line.lower()),
                        lines[-1] if lines else str(exc))
            raise Unavailable(said.strip()) from None

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def root_pids(self) -> list[int]:
        return [n.proc.pid for n in self.nodes]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.files, ignore_errors=True)

    def __enter__(self) -> Nodes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def to_ms(value: str) -> float:
    num, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()
    return float(num) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(ports: list[int], duration: int, connections: int) -> dict:
    threads = len(ports)
    cmd = ["wrk", f"-t{threads}", f"-c{max(connections, threads)}", f"-d{duration}s", "--latency",
           "-s", str(BENCH / "pg_submit.lua"), f"http://127.0.0.1:{ports[0]}/jobs"]
    env = {**os.environ, "WRK_PORTS": " ".join(map(str, ports))}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=True, env=env).stdout
    pct = dict(re.findall(r"^\s+(\d+)%\s+(\S+)$", out, re.M))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)$", out, re.M)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "p50": to_ms(pct["50"]), "p90": to_ms(pct["90"]), "p99": to_ms(pct["99"]),
            "non2xx": int(non2xx.group(1)) if non2xx else 0, "errors": errors.group(1) if errors else ""}


async def submitter(port: int, body: bytes, counter, ids: list[str], latencies: list[float]) -> None:
    """POST /jobs over one keep-alive connection; parses only the status, Content-Length and the id."""
    import orjson

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (f"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    try:
        for _ in counter:
            t = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            data = await reader.readexactly(int(length.group(1)))
            latencies.append((time.perf_counter() - t) * 1000)
            if head[9:12] != b"202":
                raise RuntimeError(f"submit answered {head[:12]!r}: {data[:300]!r}")
            ids.append(orjson.loads(data)["id"])
    finally:
        writer.close()


async def submit_and_confirm(ports: list[int], jobs: int, concurrency: int, deadline_s: float) -> dict:
    import aiohttp
    import orjson

    body = orjson.dumps({"task": "noop", "params": {}})
    ids: list[str] = []
    latencies: list[float] = []
    counter = iter(range(jobs))
    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(submitter(ports[i % len(ports)], body, counter, ids, latencies)
                                            for i in range(concurrency))), deadline_s)
    t_submitted = time.perf_counter()
    async with aiohttp.ClientSession(f"http://127.0.0.1:{ports[0]}",
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        sweeps, failed = await confirm_all(session, ids, started=t0, deadline_s=deadline_s)
        t_done = time.perf_counter()
    submit_s, total_s = t_submitted - t0, t_done - t0
    return {"jobs": len(ids), "submit_s": submit_s, "submit_rate": len(ids) / submit_s,
            "p50": percentile(latencies, 50), "p90": percentile(latencies, 90), "p99": percentile(latencies, 99),
            "total_s": total_s, "jobs_per_s": len(ids) / total_s, "sweeps": sweeps, "not_succeeded": failed}


def measured(pg: Cluster, setup: Setup, args: argparse.Namespace, part: str,
             work: Callable[[Nodes], dict]) -> dict:
    """``work`` on the setup's nodes, started on a fresh database once the machine is quiet, with the
    nodes' RSS and the CPU of the nodes and PostgreSQL added to what it returns."""
    db = pg.create_database(f"aj_{setup.name}_{part}")
    with Nodes(setup, db, args.workers, args.loop) as nodes:
        pg.checkpoint()
        note = wait_quiet(args.quiet_wait)
        if note:
            print(f"  {note}", flush=True)
        with RssSampler(nodes.root_pids) as rss:
            time.sleep(0.3)
            with CpuMeter({"servers": nodes.root_pids, "postgres": lambda: [pg.pid]}) as cpu:
                result = work(nodes)
        result.update(rss.figures(), cpu=cpu.describe())
    return result


def run_setup(pg: Cluster, setup: Setup, args: argparse.Namespace) -> dict:
    out: dict = {"setup": setup.name}
    if not args.no_wrk:
        out["wrk"] = measured(pg, setup, args, "w1",
                              lambda nodes: run_wrk(nodes.ports, args.duration, args.connections))
        r = out["wrk"]
        print(f"  W1 wrk: {r['rps']:.0f} req/s, p50 {r['p50']:.2f} ms, p90 {r['p90']:.2f} ms, p99 {r['p99']:.2f} ms,"
              f" non-2xx {r['non2xx']}{', socket errors ' + r['errors'] if r['errors'] else ''};"
              f" RSS idle {r['rss_idle_mib']:.0f} MiB, peak {r['rss_peak_mib']:.0f} MiB"
              f" (at the end per process: {r['rss_split']})", flush=True)
        print(f"    CPU: {r['cpu']}", flush=True)
    out["py"] = measured(pg, setup, args, "w2", lambda nodes: asyncio.run(
        submit_and_confirm(nodes.ports, args.jobs, args.concurrency, args.deadline)))
    r = out["py"]
    print(f"  W1 Python client: {r['submit_rate']:.0f} submits/s, p50 {r['p50']:.2f} ms, p90 {r['p90']:.2f} ms,"
          f" p99 {r['p99']:.2f} ms; W2 {r['jobs_per_s']:.0f} jobs/s ({r['total_s']:.2f} s,"
          f" {r['not_succeeded']} not succeeded); RSS idle {r['rss_idle_mib']:.0f} MiB,"
          f" peak {r['rss_peak_mib']:.0f} MiB (at the end per process: {r['rss_split']})", flush=True)
    print(f"    CPU: {r['cpu']}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", default="1node,2nodes,processes2",
                        help=f"comma-separated, of {', '.join(SETUPS)}")
    parser.add_argument("--duration", type=int, default=10, help="W1 wrk seconds per setup")
    parser.add_argument("--connections", type=int, default=64, help="W1 wrk connections")
    parser.add_argument("--jobs", type=int, default=5000, help="W1 (Python client) / W2 jobs per system")
    parser.add_argument("--concurrency", type=int, default=64, help="submitters / deferring tasks")
    parser.add_argument("--workers", type=int, default=8,
                        help="asyncjobs workers per process; the procrastinate worker's concurrency")
    parser.add_argument("--pool", type=int, default=10, help="procrastinate's deferring pool (asyncjobs': 10)")
    parser.add_argument("--fsync", default="on", choices=["on", "off"])
    parser.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"], help="asyncjobs' server.loop")
    parser.add_argument("--no-wrk", action="store_true", help="skip W1 under wrk")
    parser.add_argument("--no-peer", action="store_true", help="skip procrastinate")
    parser.add_argument("--deadline", type=float, default=120, help="give up a run after this many seconds")
    parser.add_argument("--quiet-wait", type=float, default=30,
                        help="before each measurement, wait up to this many seconds for a quiet machine")
    args = parser.parse_args()
    setups = [SETUPS[s] for s in args.setups.split(",") if s]
    if not args.no_wrk and shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk (or --no-wrk)")
    print(machine())
    results: list[dict] = []
    skipped: dict[str, str] = {}
    peer: dict | None = None
    with Cluster(fsync=args.fsync == "on") as pg:
        print(pg.describe())
        print(f"asyncjobs: {args.loop} loop, {args.workers} workers per process, pool 10 per process;"
              f" W1 wrk -c{args.connections} -d{args.duration}s; W1 Python/W2: {args.jobs} noop jobs,"
              f" {args.concurrency} submitters", flush=True)
        for setup in setups:
            print(f"{setup.name}: {setup.describe(args.workers)}", flush=True)
            try:
                results.append(run_setup(pg, setup, args))
            except Unavailable as exc:
                skipped[setup.name] = f"{exc}"
                print(f"  not available: {skipped[setup.name]}", flush=True)
        if not args.no_peer:
            from pg_peer_procrastinate import procrastinate_version, run_peer

            print(f"procrastinate: {procrastinate_version()}, worker concurrency {args.workers},"
                  f" deferring pool {args.pool}", flush=True)
            db = pg.create_database("procrastinate")
            pg.checkpoint()
            note = wait_quiet(args.quiet_wait)
            if note:
                print(f"  {note}", flush=True)
            peer = run_peer(db, jobs=args.jobs, concurrency=args.concurrency, workers=args.workers, pool=args.pool,
                            deadline_s=args.deadline, pg_pid=pg.pid)
            print(f"  W1 defer: {peer['submit_rate']:.0f} defers/s, p50 {peer['p50']:.2f} ms, p99 {peer['p99']:.2f} ms;"
                  f" W2 {peer['jobs_per_s']:.0f} jobs/s", flush=True)
            print(f"    CPU: {peer['cpu']}", flush=True)

    print()
    if not args.no_wrk and results:
        print(f"W1 submit under wrk ({args.connections} connections, {args.duration} s), RSS of the servers in MiB")
        print(f"{'setup':<22}{'req/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'non2xx':>8}"
              f"{'RSS idle':>10}{'peak':>7}{'end':>7}")
        for r in results:
            w = r["wrk"]
            print(f"{'asyncjobs ' + r['setup']:<22}{w['rps']:>9.0f}{w['p50']:>9.2f}{w['p90']:>9.2f}{w['p99']:>9.2f}"
                  f"{w['non2xx']:>8}"
                  f"{w['rss_idle_mib']:>10.0f}{w['rss_peak_mib']:>7.0f}{w['rss_end_mib']:>7.0f}")
        print()
    print(f"W1 from Python ({args.jobs} submits/defers, {args.concurrency} at once) and W2 end to end;"
          " RSS of the servers (procrastinate: its worker) in MiB")
    print(f"{'system':<22}{'submit/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'W2 jobs/s':>11}{'W2 s':>7}"
          f"{'RSS idle':>10}{'peak':>7}{'end':>7}")
    rows = [(f"asyncjobs {r['setup']}", r["py"]) for r in results]
    if peer:
        rows.append(("procrastinate", peer))
    for name, p in rows:
        print(f"{name:<22}{p['submit_rate']:>9.0f}{p['p50']:>9.2f}{p['p90']:>9.2f}{p['p99']:>9.2f}"
              f"{p['jobs_per_s']:>11.0f}{p['total_s']:>7.2f}{p['rss_idle_mib']:>10.0f}{p['rss_peak_mib']:>7.0f}"
              f"{p['rss_end_mib']:>7.0f}")
    for name, why in skipped.items():
        print(f"{name}: not run: {why}")


if __name__ == "__main__":
    main()
