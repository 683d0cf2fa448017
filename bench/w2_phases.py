"""W2's phases: how busy the service's core is while jobs are submitted, while the backlog drains, and while
the jobs are confirmed; and how the drain changes with the worker count and with fsync off.

    python bench/w2_phases.py [--jobs 20000] [--runs 3] [--setups defaults,normal,workers16,workers32]

The W2 of round2.py, cut in three: `asyncjobs serve` on core 0 (every thread, taskset -a), this process on
core 1, --jobs `noop` submits from 64 keep-alive connections of the lean client (w2_end_to_end's), then a
long poll on the last job (the queue is FIFO for equal priority, so every job has run when it answers),
then w2_end_to_end's confirmation (sweeps of the succeeded list). At each boundary the server's CPU time
(all threads, /proc) and its /metrics (jobs succeeded, commits) are read, so each phase gets its length,
the share of the core the server used in it (100%: the core never waited), the jobs that finished in it
and its commits a job. The setups run in turn within each run; the medians are printed.

- defaults: what a new user gets (8 workers, `synchronous = "full"`).
- normal: `synchronous = "normal"`: no fsync at a commit (not durable: for comparison only).
- uvloop: `server.loop = "uvloop"` (what `auto` picks where the `speed` extra is installed).
- workersN: N workers instead of 8.

With `--profile-drain OUT`, one more run of the first setup (not counted in the medians) is sampled by py-spy
(`--threads --idle`, pinned to core 1) from the end of its submits until the last job has run: a flat
profile of the drain, each thread apart, goes to OUT (idle time shows as `select` on the event loop and as
the executor's wait on the writer thread).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import time
from itertools import pairwise
from pathlib import Path

import aiohttp
import orjson
from cost import py_spy
from server import Server, machine, scrape
from w1_submit import LOAD_CORE, SERVER_CORE, pin, summarise_profile
from w2_end_to_end import confirm_all, raw_submitter

TICK = os.sysconf("SC_CLK_TCK")
SETUPS = {"defaults": {}, "normal": {"synchronous": "normal"}, "uvloop": {"loop": "uvloop"}}


def setup_options(name: str) -> dict:
    if name in SETUPS:
        return SETUPS[name]
    if name.startswith("workers") and name[7:].isdigit():
        return {"workers": int(name[7:])}
    raise SystemExit(f"unknown setup {name!r}: defaults, normal, uvloop or workersN")


def server_cpu(pid: int) -> float:
    """CPU seconds of every thread of ``pid`` so far (user and system)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def metrics(server: Server) -> tuple[float, float]:
    """(jobs succeeded in the store, commits so far) from /metrics."""
    succeeded, commits = scrape(server, 'asyncjobs_jobs{status="succeeded"}', "asyncjobs_store_commit_batch_size_count")
    return succeeded, commits


async def drive(server: Server, jobs: int, concurrency: int, deadline_s: float,
                profile_raw: Path | None = None) -> list[tuple[float, float, float, float]]:
    """The W2 load; (wall clock, server CPU, jobs succeeded, commits) at its start and after each phase.
    With ``profile_raw``, py-spy samples the drain into it."""
    pid = server.proc.pid
    marks = []

    def mark() -> None:
        succeeded, commits = metrics(server)
        marks.append((time.perf_counter(), server_cpu(pid), succeeded, commits))

    ids: list[str] = []
    body = orjson.dumps({"task": "noop", "params": {}})
    counter = iter(range(jobs))
    mark()
    started = marks[0][0]
    await asyncio.wait_for(asyncio.gather(*(raw_submitter(server, body, counter, ids)
                                            for _ in range(concurrency))), deadline_s)
    mark()
    spy = None if profile_raw is None else subprocess.Popen(
        ["taskset", "-c", LOAD_CORE, py_spy(), "record", "--format", "raw", "--threads", "--idle", "-r", "250",
         "-o", str(profile_raw), "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    async with aiohttp.ClientSession(server.url) as session:
        try:
            async with session.get(f"/jobs/{ids[-1]}?wait=60&redirect=false") as r:
                if (await r.json(loads=orjson.loads))["status"] != "succeeded":
                    raise RuntimeError("the last job did not succeed")
        finally:  # the drain is over (or failed): py-spy writes its samples as it stops
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
        mark()
        await confirm_all(session, ids, started=started, deadline_s=deadline_s)
        mark()
    return marks


def measure(name: str, jobs: int, deadline_s: float, profile: Path | None = None) -> dict:
    server = Server(**setup_options(name))
    try:
        pin(server.proc.pid, SERVER_CORE)
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {int(LOAD_CORE)})
        try:
            raw = None if profile is None else server.dir / "drain.raw"
            marks = asyncio.run(drive(server, jobs, 64, deadline_s, raw))
        finally:
            os.sched_setaffinity(0, before)
        if profile is not None:
            summarise_profile(server.dir / "drain.raw", profile,
                              title=f"asyncjobs serve ({name}), the drain of W2 after {jobs} noop submits")
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)
    out = {"jobs/s": jobs / (marks[-1][0] - marks[0][0])}
    for phase, (a, b) in zip(("submit", "drain", "confirm"), pairwise(marks), strict=True):
        wall = b[0] - a[0]
        done = b[2] - a[2]
        out[f"{phase} s"] = wall
        out[f"{phase} cpu %"] = 100 * (b[1] - a[1]) / wall
        out[f"{phase} done"] = done
        out[f"{phase} commits/job"] = (b[3] - a[3]) / done if done else float("nan")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--setups", default="defaults,normal,workers16,workers32")
    parser.add_argument("--deadline", type=float, default=300)
    parser.add_argument("--profile-drain", type=Path, help="py-spy the drain of one more run into this file")
    args = parser.parse_args()
    names = args.setups.split(",")
    for name in names:
        setup_options(name)
    print(machine())
    print(f"W2 in phases: {args.jobs} noop jobs, 64 lean submitters; setups {', '.join(names)}; {args.runs} runs,"
          f" the setups in turn; medians")
    results: dict[str, list[dict]] = {name: [] for name in names}
    for run in range(args.runs):
        for name in names:
            r = measure(name, args.jobs, args.deadline)
            results[name].append(r)
            print(f"  run {run + 1} {name}: {r['jobs/s']:,.0f} jobs/s; submit {r['submit s']:.2f} s"
                  f" ({r['submit cpu %']:.0f}%), drain {r['drain s']:.2f} s ({r['drain cpu %']:.0f}%),"
                  f" confirm {r['confirm s']:.2f} s ({r['confirm cpu %']:.0f}%)", flush=True)
    print()
    print("| setup | jobs/s | submit phase: s, core busy, jobs done | drain: s, core busy, jobs, jobs/s,"
          " commits a job | confirm: s, core busy |")
    print("| --- | --- | --- | --- | --- |")
    for name in names:
        m = {k: statistics.median(r[k] for r in results[name]) for k in results[name][0]}
        print(f"| {name} | {m['jobs/s']:,.0f} | {m['submit s']:.2f}, {m['submit cpu %']:.0f}%,"
              f" {m['submit done']:,.0f} | {m['drain s']:.2f}, {m['drain cpu %']:.0f}%, {m['drain done']:,.0f},"
              f" {m['drain done'] / m['drain s']:,.0f}, {m['drain commits/job']:.3f} | {m['confirm s']:.2f},"
              f" {m['confirm cpu %']:.0f}% |")
    if args.profile_drain:
        r = measure(names[0], args.jobs, args.deadline, args.profile_drain)
        print(f"\nprofiled run of {names[0]} (not in the medians): {r['jobs/s']:,.0f} jobs/s,"
              f" drain {r['drain s']:.2f} s ({r['drain cpu %']:.0f}%), {r['drain done']:,.0f} jobs;"
              f" the drain's profile in {args.profile_drain}")


if __name__ == "__main__":
    main()
