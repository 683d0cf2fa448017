"""Before and after on the same machine at the same time: W1 and W2 on SQLite, two checkouts taking turns.

    python bench/compare.py --before /tmp/before [--rounds 5] [--duration 10] [--jobs 20000] [--filled N]

`git worktree add /tmp/before <commit>` makes the before checkout. Each round
runs, for the before checkout and then this one: W1 (`wrk -t1 -c64`, `POST
/jobs` of `noop`, --duration seconds, as w1_submit.py) and W2 (--jobs `noop`
jobs from 64 keep-alive connections of the lean client, timed until the last
one has finished, as cost.py), each on a fresh `asyncjobs serve` with the
defaults (SQLite, `synchronous = "full"`, 8 workers, asyncio) pinned to core
0, the load on core 1. The speed of a shared VM drifts by a fifth over
minutes, so the two checkouts alternate within each round and the report is
the median of each figure and the median of the per-round ratios
(after / before), which the drift affects least. Every job of W2 is confirmed
terminal before the figure counts.

With `--filled N`, every run starts on a copy of one store already holding N
succeeded `noop` jobs with random ids (server.fill_store: a store with a
day's history, as a service that keeps its jobs a day has), instead of an
empty one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from cost import confirm, drive, pin_all
from server import ROOT, Server, fill_store, machine, source_env
from w1_submit import SERVER_CORE, pin, run_wrk


def copy_of(template: Path | None) -> Path | None:
    """A fresh copy of the filled store (None: the server makes an empty one)."""
    if template is None:
        return None
    db = Path(tempfile.mkdtemp(prefix="asyncjobs-filled-")) / "bench.db"
    shutil.copyfile(template, db)
    return db


def w1(source: Path, duration: int, template: Path | None = None) -> float:
    db = copy_of(template)
    with Server(env=source_env(source), db=db) as server:
        try:
            pin(server.proc.pid, SERVER_CORE)
            return run_wrk(f"{server.url}/jobs", duration, 64)["rps"]
        finally:
            server.stop()
            shutil.rmtree(server.dir, ignore_errors=True)
            if db is not None:
                shutil.rmtree(db.parent, ignore_errors=True)


def w2(source: Path, jobs: int, deadline_s: float, template: Path | None = None) -> float:
    db = copy_of(template)
    with Server(env=source_env(source), db=db) as server:
        try:
            pin_all(server.proc.pid, int(SERVER_CORE))
            time.sleep(1.0)
            ids, wall = asyncio.run(drive(server, jobs, 64, deadline_s))
            failed = asyncio.run(confirm(server, ids, deadline_s))
            if failed:
                raise RuntimeError(f"{failed} jobs did not succeed")
            return len(ids) / wall
        finally:
            server.stop()
            shutil.rmtree(server.dir, ignore_errors=True)
            if db is not None:
                shutil.rmtree(db.parent, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="the checkout to compare this one with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=10, help="W1 wrk seconds")
    parser.add_argument("--jobs", type=int, default=20000, help="W2 jobs")
    parser.add_argument("--deadline", type=float, default=300)
    parser.add_argument("--filled", type=int, default=0, help="start every run on a store of this many jobs")
    args = parser.parse_args()
    print(machine())
    template = None
    if args.filled:
        template = Path(tempfile.mkdtemp(prefix="asyncjobs-template-")) / "bench.db"
        started = time.monotonic()
        fill_store(template, args.filled, status="succeeded")
        print(f"a store of {args.filled:,} succeeded jobs: {template.stat().st_size / 2**20:,.0f} MiB,"
              f" built in {time.monotonic() - started:.1f} s; every run starts on a copy")
    sides = {"before": args.before, "after": ROOT}
    figures: dict[tuple[str, str], list[float]] = {(w, s): [] for w in ("W1", "W2") for s in sides}
    os.sched_setaffinity(0, {1})  # this process runs W2's client: on the load's core
    for n in range(1, args.rounds + 1):
        for side, source in sides.items():
            figures[("W1", side)].append(w1(source, args.duration, template))
            figures[("W2", side)].append(w2(source, args.jobs, args.deadline, template))
            print(f"round {n} {side:6s} W1 {figures[('W1', side)][-1]:8,.0f} req/s"
                  f"   W2 {figures[('W2', side)][-1]:8,.0f} jobs/s", flush=True)
    print(f"\nmedians of {args.rounds} rounds; before = {args.before}, after = {ROOT}")
    for workload, unit in (("W1", "req/s"), ("W2", "jobs/s")):
        before, after = figures[(workload, "before")], figures[(workload, "after")]
        ratios = [a / b for a, b in zip(after, before)]
        print(f"{workload}: before {statistics.median(before):8,.0f} {unit}, after {statistics.median(after):8,.0f}"
              f" {unit}; after / before per round {', '.join(f'{r:.2f}' for r in ratios)}:"
              f" median {statistics.median(ratios):.2f}")
    if template is not None:
        shutil.rmtree(template.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
