"""W5 restart: a store holding 100,000 queued jobs; time from process start to the first `202`.

    python bench/w5_restart.py [--jobs 100000] [--runs 3]

The store is built once (the server's own migrations, then rows inserted
directly with sqlite3: what asyncjobs writes for a queued `noop` job) and
copied afresh for every run. The clock starts just before the process is
spawned (`Server.started_at`) and stops when the first `POST /jobs` answers
`202`; the server is found ready by polling its log every 10 ms, then the
POST is sent at once.

Two cases: "runnable", the queued jobs are `noop` (registered: the workers
start on the backlog as the server comes up, as after a real restart); and
"parked", the queued jobs are of the `stamp` task and the server runs
without `bench_tasks` (ASYNCJOBS_TASKS_MODULES), so they stay queued.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

from server import Server, fill_store, machine, percentile


def first_202(server: Server) -> float:
    req = urllib.request.Request(f"{server.url}/jobs", data=b'{"task":"noop","params":{}}', method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        if r.status != 202:
            raise RuntimeError(f"answered {r.status}")
        r.read()
    return time.monotonic() - server.started_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--synchronous", default="full", choices=["full", "normal"])
    args = parser.parse_args()
    print(machine())
    work = Path(tempfile.mkdtemp(prefix="asyncjobs-w5-"))
    try:
        cases = {}
        for case, task, env in (("runnable", "noop", {}),
                                ("parked", "stamp", {"ASYNCJOBS_TASKS_MODULES": json.dumps(["asyncjobs.builtin"])})):
            template = work / f"{case}.db"
            t = time.monotonic()
            fill_store(template, args.jobs, task=task, status="queued")
            print(f"{case}: built a store of {args.jobs} queued {task} jobs in {time.monotonic() - t:.1f} s "
                  f"({template.stat().st_size / 1e6:.0f} MB)")
            times, ready = [], []
            for _ in range(args.runs):
                db = work / "run.db"
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{db}{suffix}").unlink(missing_ok=True)
                shutil.copy(template, db)
                server = Server(synchronous=args.synchronous, db=db, env=env)
                try:
                    times.append(first_202(server))
                    ready.append(server.ready_s)
                finally:
                    server.stop()
                    shutil.rmtree(server.dir, ignore_errors=True)
            cases[case] = times
            print(f"  start -> listening: {', '.join(f'{x:.3f}' for x in ready)} s; "
                  f"start -> first 202: {', '.join(f'{x:.3f}' for x in times)} s "
                  f"(median {percentile(times, 50):.3f} s, max {max(times):.3f} s)")
        worst = max(max(t) for t in cases.values())
        print(f"goal < 2 s: {'met' if worst < 2 else 'NOT met'} (worst run {worst:.3f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
