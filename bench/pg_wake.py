"""Cross-node wake latency on PostgreSQL: a job finishes on node A, a long poll on node B learns of it.

    python bench/pg_wake.py [--jobs 300] [--batch 50] [--warmup 1] [--modes same,cross,progress] [--fsync on|off]

One throwaway PostgreSQL cluster (bench/pg_cluster.py), a fresh database per mode:

- same: one `asyncjobs serve`; submit and long poll on it (the single-node baseline, W3's long poll);
- cross: two `asyncjobs serve` on one database (A and B); each job is submitted to A and runs on A (B does
  not load bench_tasks.py, so it never claims a `stamp` job), and is long-polled on B, which learns of
  its completion only through the database (the cross-node change feed).

After --warmup batches that are not counted, per batch of --batch jobs of the `stamp` task
(bench_tasks.py), with delays 0.3 s + i x 10 ms so they finish about 10 ms apart: submitted one after
another, each awaited as soon as its `202` arrives by `GET /jobs/{id}?wait=10&redirect=false` on the
waiting node. Per job: client receipt time minus the job's `finished_at` (the protocol's
millisecond time, truncated, so up to 1 ms more than the truth) and minus the handler's own return time
(the `stamp` result, full precision, before the terminal state is committed). p50, p90, p99, max in ms.
Answers that were not terminal (the wait ran out: the node never learned) are counted apart, as are
long polls sent after the job had already finished (answered at once, not a wake).

- progress: as cross, for progress instead of completions: --jobs `ticker` jobs at once on A, each
  reporting 50 times 0.1 s apart (the report's wall-clock time in its message); B follows each with
  long polls carrying the last ETag it saw (`If-None-Match`), which answer at the next change. Per report
  B saw: receipt time minus the moment the report was made; and how many reports B never saw (a later one
  came first).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from pg_cluster import Cluster, Node, machine, wait_quiet  # noqa: E402
from server import percentile  # noqa: E402


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def measure(submit_url: str, wait_url: str, jobs: int, batch: int, wait_s: int, warmup: int) -> dict:
    import aiohttp

    from_finished: list[float] = []
    from_handler: list[float] = []
    not_terminal = late = 0
    timeout = aiohttp.ClientTimeout(total=wait_s + 30)
    async with aiohttp.ClientSession(submit_url, connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as a, \
            aiohttp.ClientSession(wait_url, connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as b:
        async def submit(delay: float) -> str:
            async with a.post("/jobs", json={"task": "stamp", "params": {"delay": delay}}) as r:
                if r.status != 202:
                    raise RuntimeError(f"submit answered {r.status}: {await r.text()}")
                return (await r.json())["id"]

        async def long_poll(job_id: str) -> tuple[float, float, dict]:
            sent = time.time()
            async with b.get(f"/jobs/{job_id}?wait={wait_s}&redirect=false") as r:
                body = await r.json()
                return sent, time.time(), body

        for start in range(-warmup * batch, jobs, batch):
            n = min(batch, jobs - start)
            polls = []
            for i in range(n):  # each job awaited as soon as its submit is answered
                polls.append(asyncio.create_task(long_poll(await submit(0.3 + i * 0.01))))
            answers = await asyncio.gather(*polls)
            if start < 0:  # a warm-up batch: connections opened, caches filled, not counted
                continue
            for sent, received, job in answers:
                if job["status"] != "succeeded":
                    not_terminal += 1
                    continue
                if sent > job["result"]:
                    late += 1
                    continue
                from_finished.append((received - parse_time(job["finished_at"])) * 1000)
                from_handler.append((received - job["result"]) * 1000)
    return {"from_finished": from_finished, "from_handler": from_handler, "not_terminal": not_terminal,
            "late": late}


async def measure_progress(submit_url: str, wait_url: str, jobs: int, wait_s: int) -> dict:
    """The progress mode: see the module's docstring."""
    import aiohttp

    reports, every = 50, 0.1
    delays: list[float] = []
    seen = 0
    timeout = aiohttp.ClientTimeout(total=wait_s + 60)
    async with aiohttp.ClientSession(submit_url, timeout=timeout) as a, \
            aiohttp.ClientSession(wait_url, connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as b:
        async def follow(job_id: str, etag: str) -> None:
            nonlocal seen
            while True:
                async with b.get(f"/jobs/{job_id}?wait={wait_s}&redirect=false",
                                 headers={"If-None-Match": etag}) as r:
                    received = time.time()
                    if r.status == 304:
                        continue
                    etag = r.headers["ETag"]
                    body = await r.json()
                if body["progress"] and body["status"] == "running":
                    seen += 1
                    delays.append((received - float(body["progress"]["message"])) * 1000)
                if body["status"] != "running" and body["status"] != "queued":
                    return

        followers = []
        for _ in range(jobs):
            async with a.post("/jobs", json={"task": "ticker", "params": {"reports": reports, "every": every}}) as r:
                if r.status != 202:
                    raise RuntimeError(f"submit answered {r.status}: {await r.text()}")
                followers.append(asyncio.create_task(follow((await r.json())["id"], r.headers["ETag"])))
        await asyncio.gather(*followers)
    return {"delays": delays, "missed": jobs * reports - seen, "reports": jobs * reports}


def summary(values: list[float]) -> str:
    if not values:
        return "no samples"
    return (f"p50 {percentile(values, 50):7.2f}  p90 {percentile(values, 90):7.2f}  p99 {percentile(values, 99):7.2f}"
            f"  max {max(values):7.2f}")


def run_mode(pg: Cluster, mode: str, args: argparse.Namespace) -> dict | None:
    db = pg.create_database(f"wake_{mode}")
    files = Path(tempfile.mkdtemp(prefix="asyncjobs-bench-files-"))
    nodes: list[Node] = []
    try:
        try:
            nodes.append(Node(db, files_dir=files, workers=args.workers, loop=args.loop, name=f"wake-{mode}-a"))
            if mode in ("cross", "progress"):
                # B does not load bench_tasks: it cannot claim `stamp` jobs, so every job runs on A
                nodes.append(Node(db, files_dir=files, workers=args.workers, loop=args.loop, name=f"wake-{mode}-b",
                                  modules=("asyncjobs.builtin",)))
        except RuntimeError as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            print(f"{mode}: not available: {lines[-1] if lines else exc}")
            return None
        pg.checkpoint()
        note = wait_quiet(args.quiet_wait)
        if note:
            print(note)
        a, b = nodes[0], nodes[-1]
        if mode == "progress":
            return asyncio.run(measure_progress(a.url, b.url, args.progress_jobs, args.wait))
        return asyncio.run(measure(a.url, b.url, args.jobs, args.batch, args.wait, args.warmup))
    finally:
        for node in nodes:
            node.stop()
        shutil.rmtree(files, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=1, help="batches run first and not counted")
    parser.add_argument("--modes", default="same,cross,progress", help="comma-separated: same, cross, progress")
    parser.add_argument("--progress-jobs", type=int, default=20, help="ticker jobs of the progress mode, at once")
    parser.add_argument("--wait", type=int, default=10, help="the long poll's ?wait=, seconds")
    parser.add_argument("--workers", type=int, default=64, help="workers per node (a batch runs at once)")
    parser.add_argument("--fsync", default="on", choices=["on", "off"])
    parser.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"])
    parser.add_argument("--quiet-wait", type=float, default=30,
                        help="before each mode, wait up to this many seconds for a quiet machine")
    args = parser.parse_args()
    print(machine())
    with Cluster(fsync=args.fsync == "on") as pg:
        print(pg.describe())
        print(f"{args.jobs} stamp jobs in batches of {args.batch} (finishing ~10 ms apart),"
              f" long poll ?wait={args.wait}, {args.workers} workers per node, {args.loop} loop")
        for mode in args.modes.split(","):
            r = run_mode(pg, mode, args)
            if r is None:
                continue
            if mode == "progress":
                print(f"progress (ticker jobs on node A, long polls with If-None-Match on node B): {r['reports']}"
                      f" reports, {len(r['delays'])} seen on B, {r['missed']} never seen (a later one came first)")
                print(f"  report made -> client receipt on B, ms: {summary(r['delays'])}")
                continue
            where = "submit and long poll on one node" if mode == "same" else "submit on node A, long poll on node B"
            print(f"{mode} ({where}): {len(r['from_finished'])} jobs measured, {r['not_terminal']} long polls"
                  f" not answered terminal (wait ran out), {r['late']} sent after the job finished (left out)")
            print(f"  finished_at -> client receipt, ms:       {summary(r['from_finished'])}")
            print(f"  handler return -> client receipt, ms:    {summary(r['from_handler'])}")


if __name__ == "__main__":
    main()
