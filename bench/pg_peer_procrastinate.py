"""The peer on PostgreSQL: procrastinate's defer (W1) and end to end (W2), on a throwaway cluster.

    python bench/pg_peer_procrastinate.py [--jobs 5000] [--concurrency 64] [--workers 8] [--fsync off]

procrastinate (a PostgreSQL job queue for Python; pip install procrastinate) in its own database: the
schema applied, one worker process (`App.run_worker_async(concurrency=--workers)`, LISTEN/NOTIFY on, jobs
kept after they finish, as asyncjobs keeps them) running an async `noop` task, then this process defers
--jobs jobs from --concurrency asyncio tasks (`Task.defer_async`, one INSERT committed per job) over a
psycopg pool of --pool connections (asyncjobs' pool size per node: 10). The defer figures are W1's
(jobs/s over the defer phase, each defer's latency p50/p90/p99); the clock stops when every job is
`succeeded` (a count polled every 20 ms), W2's jobs/s. The worker's RSS is sampled every 100 ms.

`bench/pg.py` runs this in the same run as asyncjobs (same cluster, same settings); this file alone runs
only the peer. `python bench/pg_peer_procrastinate.py worker URL N` is the worker process it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from pg_cluster import Cluster, CpuMeter, RssSampler, machine, wait_quiet  # noqa: E402
from server import percentile  # noqa: E402


def make_app(url: str, pool: int):
    import procrastinate

    logging.getLogger("procrastinate").setLevel(logging.ERROR)  # "App is instantiated in the main module"

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url, min_size=pool, max_size=pool))

    @app.task(name="noop")
    async def noop() -> None:
        return None

    return app


def worker_main(url: str, concurrency: int) -> None:
    logging.basicConfig(level=logging.WARNING)
    app = make_app(url, pool=concurrency + 2)  # a connection per running job, the listener, the fetcher

    async def run() -> None:
        async with app.open_async():
            await app.run_worker_async(concurrency=concurrency, wait=True, install_signal_handlers=True,
                                       delete_jobs="never")

    asyncio.run(run())


async def _finished(conn) -> int:
    return await conn.fetchval("SELECT count(*) FROM procrastinate_jobs WHERE status IN ('succeeded', 'failed')")


async def _run(url: str, jobs: int, concurrency: int, workers: int, pool: int, deadline_s: float,
               pg_pid: int | None) -> dict:
    import asyncpg

    app = make_app(url, pool)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
    env = dict(os.environ)
    worker = subprocess.Popen([sys.executable, __file__, "worker", url, str(workers)], env=env,
                              start_new_session=True)
    conn = await asyncpg.connect(url)
    try:
        until = time.monotonic() + 30
        while not await conn.fetchval("SELECT count(*) FROM procrastinate_workers"):
            if worker.poll() is not None or time.monotonic() > until:
                raise RuntimeError("the procrastinate worker did not start")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        trees = {"worker": lambda: [worker.pid], **({"postgres": lambda: [pg_pid]} if pg_pid else {})}
        with RssSampler(lambda: [worker.pid]) as sampler, CpuMeter(trees) as cpu:
            async with app.open_async():
                noop = app.tasks["noop"]
                latencies: list[float] = []
                counter = iter(range(jobs))

                async def deferrer() -> None:
                    for _ in counter:
                        t = time.perf_counter()
                        await noop.defer_async()
                        latencies.append((time.perf_counter() - t) * 1000)

                t0 = time.perf_counter()
                await asyncio.wait_for(asyncio.gather(*(deferrer() for _ in range(concurrency))), deadline_s)
                t_submitted = time.perf_counter()
            done = 0
            while time.perf_counter() - t0 < deadline_s:
                done = await _finished(conn)
                if done >= jobs:
                    break
                await asyncio.sleep(0.02)
            t_done = time.perf_counter()
        failed = await conn.fetchval("SELECT count(*) FROM procrastinate_jobs WHERE status <> 'succeeded'")
    finally:
        await conn.close()
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
    if done < jobs:
        raise RuntimeError(f"procrastinate: only {done} of {jobs} jobs finished within {deadline_s} s")
    submit_s = t_submitted - t0
    total_s = t_done - t0
    return {"name": "procrastinate", "jobs": jobs, "submit_s": submit_s, "submit_rate": jobs / submit_s,
            "p50": percentile(latencies, 50), "p90": percentile(latencies, 90), "p99": percentile(latencies, 99),
            "total_s": total_s, "jobs_per_s": jobs / total_s, "not_succeeded": failed, **sampler.figures(),
            "cpu": cpu.describe()}


def run_peer(url: str, *, jobs: int, concurrency: int, workers: int, pool: int = 10, deadline_s: float = 120,
             pg_pid: int | None = None) -> dict:
    """W1 (defer) and W2 (end to end) of procrastinate on the (fresh) database at ``url``; ``pg_pid``: the
    postmaster, whose tree's CPU time is reported."""
    return asyncio.run(_run(url, jobs, concurrency, workers, pool, deadline_s, pg_pid))


def procrastinate_version() -> str:
    from importlib.metadata import version

    return f"procrastinate {version('procrastinate')}, psycopg {version('psycopg')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64, help="asyncio tasks deferring at once")
    parser.add_argument("--workers", type=int, default=8, help="the worker's concurrency (asyncjobs' workers)")
    parser.add_argument("--pool", type=int, default=10, help="the deferring side's connection pool")
    parser.add_argument("--fsync", default="on", choices=["on", "off"])
    parser.add_argument("--deadline", type=float, default=120)
    args = parser.parse_args()
    print(machine())
    with Cluster(fsync=args.fsync == "on") as pg:
        print(pg.describe())
        print(procrastinate_version())
        db = pg.create_database("procrastinate")
        note = wait_quiet(30)
        if note:
            print(note)
        r = run_peer(db, jobs=args.jobs, concurrency=args.concurrency,
                     workers=args.workers, pool=args.pool, deadline_s=args.deadline, pg_pid=pg.pid)
    print(f"{args.jobs} noop jobs, {args.concurrency} deferring tasks, pool {args.pool}, worker concurrency "
          f"{args.workers}")
    print(f"W1 defer: {r['submit_rate']:.0f} jobs/s, p50 {r['p50']:.2f} ms, p90 {r['p90']:.2f} ms,"
          f" p99 {r['p99']:.2f} ms")
    print(f"W2 end to end: {r['jobs_per_s']:.0f} jobs/s ({r['total_s']:.2f} s, {r['not_succeeded']} not succeeded)")
    print(f"worker RSS: idle {r['rss_idle_mib']:.1f} MiB, peak {r['rss_peak_mib']:.1f} MiB")
    print(f"CPU: {r['cpu']}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        worker_main(sys.argv[2], int(sys.argv[3]))
    else:
        main()
