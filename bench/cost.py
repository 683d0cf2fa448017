"""Per-job cost: CPU microseconds per `noop` job on the event loop, the store's writer, and the database.

    python bench/cost.py [--jobs 20000] [--store sqlite|postgres] [--floor] [--profile OUT] [--source CHECKOUT]
    python bench/cost.py --instructions [--jobs 2000] [--source CHECKOUT] [--keep FOLDER]
    python bench/cost.py --instructions --bare [--jobs 2000]
    python bench/cost.py [--instructions] --submits-only [--jobs 2000]

One server with the defaults (SQLite, `synchronous = "full"`, 8 workers; or
`--store postgres`: one node on a throwaway PostgreSQL cluster the script
starts) pinned to core 0, with PostgreSQL's processes on the same core; the
load on core 1: `--jobs` submits of `noop` from 64 keep-alive connections of
a lean HTTP/1.1 client (bench/w2_end_to_end.py's), then a long poll on the
last job. CPU time (user + system, from /proc) is read per thread of the
server before the first submit and after that long poll answers, and for
PostgreSQL the CPU of every server process of the cluster; each is divided
by the number of jobs. Each job is submitted, claimed, run and finished in
that window, so the figure is the whole life of a job. Afterwards every job
is confirmed terminal (not counted).

The threads: the event loop (HTTP, the queue, the workers, the feed), the
SQLite writer thread (Python around the statements, and SQLite itself:
B-trees, the WAL, the fsync of each commit), other threads (the readers'
thread of aiosqlite, the default executor). With `--floor`, the same SQL
statements the writer runs for a job's life (the owner's last vt, the
INSERT, the claim's SELECT and UPDATE, the outcome's UPDATE), as many jobs
to a fsynced commit as the server put in one, are run for as many jobs from
plain sqlite3 in this process: SQLite's own cost a job (the "database"
column for SQLite), the rest of the writer thread's CPU being the Python
around it. With `--profile OUT`, py-spy samples the server during the window
and a flat profile per thread goes to OUT. `--source CHECKOUT` runs the
package of another checkout (a git worktree of an older commit) for the
before column; before the writer thread had its name (store-writer), its CPU
shows under "other threads".

CPU time on a shared virtual machine varies by a fifth from one run to the
next. `--instructions` counts instead: the server runs under valgrind's
callgrind with counting off, counting is switched on for the window only,
and the instructions executed by every thread of the server (the
interpreter, aiohttp, SQLite; not the kernel, not PostgreSQL) are divided by
the jobs. The same code and load give the same count within a fraction of a
percent, so a change of a few percent shows. It runs about 50 times slower:
use a few thousand jobs (`--jobs 2000`). Needs Debian's `valgrind`. With
`--bare`, the same count for the bare aiohttp app (bench/bare.py, the W1
ceiling) under the same submits: what HTTP alone costs a request.

With `--submits-only`, the jobs are submitted with a delay of an hour, so
no worker runs one in the window (and there is no long poll): what a
durable submit costs alone, the HTTP exchange, the submit handler and the
writer's insert and commit; the jobs are left queued.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import orjson
from server import BENCH, Server, machine, scrape, source_env, stop_process
from w1_submit import free_port, summarise_profile, wait_port
from w2_end_to_end import confirm_all, raw_submitter

SERVER_CORE, LOAD_CORE = 0, 1
TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (threads of one name summed), and under "NAME:kernel" the part spent in
    the kernel (system calls: socket I/O, fsync)."""
    out: Counter = Counter()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        kind = kind_of(name, int(tid) == pid)
        out[kind] += (int(fields[11]) + int(fields[12])) / TICK
        out[f"{kind}:kernel"] += int(fields[12]) / TICK
    return dict(out)


def kind_of(name: str, main: bool) -> str:
    if main:
        return "event loop"
    if name == "store-writer":
        return "writer"
    return "other threads"


def processes_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def sqlite_floor(jobs: int, per_commit: int) -> float:
    """CPU us a job costs SQLite alone: the statements the writer runs for one job's life (the owner's last vt,
    the INSERT, the claim's SELECT and UPDATE, the outcome's UPDATE), ``per_commit`` jobs to a fsynced commit,
    on a store made by asyncjobs' own migrations, from plain sqlite3 in this thread: no Python of ours."""
    import secrets
    import sqlite3
    import tempfile

    sys.path.insert(0, str(BENCH.parent))
    from asyncjobs import store as S

    folder = tempfile.mkdtemp(prefix="asyncjobs-cost-")
    path = f"{folder}/floor.db"
    made = S.SQLiteStore(path)

    async def migrate() -> None:
        await made.open()
        await made.close()

    asyncio.run(migrate())
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    insert = f"INSERT INTO jobs ({S._COLUMNS}) VALUES (NULL{', ?' * 26})"
    outcome = f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in S.MUTABLE)} WHERE id = ? AND version = ?"
    claim = ("UPDATE jobs SET status = 'running', started_at = ?, attempts = ?, version = ?, error = NULL,"
             " lease_owner = ?, lease_until = ? WHERE id = ?")
    now = time.time()
    started = time.thread_time()
    for _ in range(0, jobs, per_commit):
        db.execute("BEGIN IMMEDIATE")
        for _ in range(per_commit):
            (last,) = db.execute(S.OWNER_LAST_VT_SQL, ("",)).fetchone()
            db.execute(insert, (secrets.token_urlsafe(16), "noop", b"{}", "queued", 0, now, None, None, now + 86400,
                                now, 0, 1, 1, None, None, None, None, "", None, None, None, None, None,
                                (last or 0) + 1, None, None))
        rows = db.execute(S.CLAIM_SQL.format(marks="?"), (now + 1, now, "noop", per_commit)).fetchall()
        db.executemany(claim, [(now, 1, 2, "", None, r[1]) for r in rows])
        for r in rows:
            db.execute(outcome, ("succeeded", now, now, now + 86400, now, 1, 3, None, b"null", None, None, None,
                                 None, None, r[1], 2))
        db.execute("COMMIT")
    spent = time.thread_time() - started
    db.close()
    shutil.rmtree(folder, ignore_errors=True)
    return spent / jobs * 1e6


def commits(server: Server) -> tuple[float, float]:
    """(commits, writes) so far, from /metrics."""
    count, writes = scrape(server, "asyncjobs_store_commit_batch_size_count", "asyncjobs_store_commit_batch_size_sum")
    return count, writes  # the batch-size histogram: its count is the commits, its sum the writes


def callgrind(folder: Path) -> list[str]:
    """valgrind's callgrind, counting nothing until switched on (callgrind_control), a dump per thread in
    ``folder``."""
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
            f"--callgrind-out-file={folder / 'callgrind.out'}"]


def callgrind_totals(folder: Path) -> tuple[int, int]:
    """Instructions (Ir) of the main thread (the event loop: callgrind's thread 1) and of the others, from
    the dumps of the run (one file per thread)."""
    main = rest = 0
    for path in folder.iterdir():
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                if path.name.endswith("-01"):
                    main += int(line.split()[1])
                else:
                    rest += int(line.split()[1])
                break
    return main, rest


def bare_instructions(submits: int, concurrency: int, deadline_s: float) -> float:
    """The bare app (bench/bare.py) under callgrind: instructions a submit, every thread."""
    folder = Path(tempfile.mkdtemp(prefix="asyncjobs-callgrind-"))
    port = free_port()
    proc = subprocess.Popen([*callgrind(folder), sys.executable, str(BENCH / "bare.py"), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc, timeout=600)
        target = type("Target", (), {"host": "127.0.0.1", "port": port})()
        subprocess.run(["callgrind_control", "--instr=on", str(proc.pid)], check=True, capture_output=True)
        ids: list[str] = []
        body = orjson.dumps({"task": "noop", "params": {}})
        counter = iter(range(submits))

        async def load() -> None:
            await asyncio.wait_for(asyncio.gather(*(raw_submitter(target, body, counter, ids)
                                                    for _ in range(concurrency))), deadline_s)

        asyncio.run(load())
        subprocess.run(["callgrind_control", "--instr=off", str(proc.pid)], check=True, capture_output=True)
    finally:
        stop_process(proc, timeout=120)
    main, rest = callgrind_totals(folder)
    shutil.rmtree(folder, ignore_errors=True)
    return (main + rest) / len(ids)


def py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else "py-spy"


def pin_all(pid: int, core: int) -> None:
    subprocess.run(["taskset", "-a", "-p", "-c", str(core), str(pid)], check=True, capture_output=True)


async def drive(server: Server, jobs: int, concurrency: int, deadline_s: float,
                submits_only: bool = False) -> tuple[list[str], float]:
    ids: list[str] = []
    body = orjson.dumps({"task": "noop", "params": {}, **({"delay": 3600} if submits_only else {})})
    counter = iter(range(jobs))
    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(raw_submitter(server, body, counter, ids)
                                            for _ in range(concurrency))), deadline_s)
    if submits_only:
        return ids, time.perf_counter() - t0
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(f"GET /jobs/{ids[-1]}?wait=60&redirect=false HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), deadline_s)
    writer.close()
    if b"200" not in head[:13]:
        raise RuntimeError(f"long poll answered {head[:40]!r}")
    return ids, time.perf_counter() - t0


async def confirm(server: Server, ids: list[str], deadline_s: float) -> int:
    """Every job terminal (raises if not): how many did not succeed."""
    import aiohttp

    async with aiohttp.ClientSession(server.url) as session:
        _, failed = await confirm_all(session, ids, started=time.perf_counter(), deadline_s=deadline_s)
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--store", default="sqlite", choices=["sqlite", "postgres"])
    parser.add_argument("--profile", type=Path, help="py-spy the window: a flat profile per thread into this file")
    parser.add_argument("--synchronous", default="full", choices=["full", "normal"])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"], help="the server's server.loop")
    parser.add_argument("--source", type=Path,
                        help="run the asyncjobs package of this checkout (e.g. a git worktree of an older commit);"
                             " before the writer thread had its name, its CPU shows under 'other threads'")
    parser.add_argument("--floor", action="store_true",
                        help="also run the writer's statements for as many jobs in plain sqlite3 (SQLite alone),"
                             " as many jobs to a commit as the server put in one")
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions per job under callgrind (deterministic; slow: use --jobs 2000)")
    parser.add_argument("--keep", type=Path,
                        help="with --instructions: keep callgrind's dumps (one per thread) in this folder, for"
                             " callgrind_annotate")
    parser.add_argument("--bare", action="store_true",
                        help="with --instructions: count the bare aiohttp app's instructions a submit instead")
    parser.add_argument("--submits-only", action="store_true",
                        help="submit the jobs with an hour's delay, so none runs: what a durable submit costs alone")
    parser.add_argument("--deadline", type=float, default=300)
    args = parser.parse_args()
    os.sched_setaffinity(0, {LOAD_CORE})
    print(machine())
    if args.bare:
        if not args.instructions:
            parser.error("--bare counts instructions: add --instructions")
        per_request = bare_instructions(args.jobs, args.concurrency, args.deadline)
        print(f"instructions a submit of the bare aiohttp app: {per_request:,.0f} ({args.jobs} submits)")
        return
    pg = None
    db: str | None = None
    if args.store == "postgres":
        from pg_cluster import Cluster, proc_tree

        pg = Cluster().__enter__()
        db = pg.create_database("cost")
    try:
        env = source_env(args.source) if args.source else None
        counted = Path(tempfile.mkdtemp(prefix="asyncjobs-callgrind-"))
        wrap = callgrind(counted) if args.instructions else None
        with Server(db=db, synchronous=args.synchronous, workers=args.workers, loop=args.loop, env=env,
                    wrap=wrap) as server:
            pin_all(server.proc.pid, SERVER_CORE)
            time.sleep(0.5)
            if pg is not None:
                for pid in proc_tree(pg.pid):
                    pin_all(pid, SERVER_CORE)
            time.sleep(1.0)
            spy = None
            if args.profile:
                raw = server.dir / "profile.raw"
                spy = subprocess.Popen(["taskset", "-c", str(LOAD_CORE), py_spy(), "record", "--format", "raw",
                                        "--threads", "-r", "200", "-o", str(raw),
                                        "-p", str(server.proc.pid)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)
            if args.instructions:
                subprocess.run(["callgrind_control", "--instr=on", str(server.proc.pid)], check=True,
                               capture_output=True)
            commits_before = commits(server)
            before = thread_cpu(server.proc.pid)
            db_before = processes_cpu(proc_tree(pg.pid)) if pg else 0.0
            ids, wall = asyncio.run(drive(server, args.jobs, args.concurrency, args.deadline, args.submits_only))
            if args.instructions:
                subprocess.run(["callgrind_control", "--instr=off", str(server.proc.pid)], check=True,
                               capture_output=True)
            after = thread_cpu(server.proc.pid)
            commits_after = commits(server)
            db_after = processes_cpu(proc_tree(pg.pid)) if pg else 0.0
            if spy is not None:
                spy.send_signal(2)
                spy.wait(60)
                summarise_profile(raw, args.profile, title=f"asyncjobs serve, {args.jobs} noop jobs ({args.store})")
                shutil.copy(raw, args.profile.with_suffix(".raw"))
            failed = 0 if args.submits_only else asyncio.run(confirm(server, ids, args.deadline))
            server.stop()
            server.proc.wait(120)
            shutil.rmtree(server.dir, ignore_errors=True)
    finally:
        if pg is not None:
            pg.__exit__(None, None, None)
    n = len(ids)
    if args.instructions:
        main, rest = callgrind_totals(counted)
        print(f"instructions a job: {(main + rest) / n:,.0f}; event loop {main / n:,.0f}, other threads (the"
              f" writer) {rest / n:,.0f} ({n} jobs, under callgrind: the CPU figures below are valgrind's)")
        if args.keep:
            shutil.copytree(counted, args.keep, dirs_exist_ok=True)
        shutil.rmtree(counted, ignore_errors=True)
    cost = {k: (after.get(k, 0.0) - before.get(k, 0.0)) / n * 1e6 for k in after}
    if args.submits_only:
        print(f"store {args.store}: {n} submits (of delayed jobs, none run) in {wall:.2f} s = {n / wall:,.0f}"
              f" submits/s")
    else:
        print(f"store {args.store}: {n} jobs in {wall:.2f} s = {n / wall:,.0f} jobs/s; not succeeded: {failed}")
    n_commits = commits_after[0] - commits_before[0]
    n_writes = commits_after[1] - commits_before[1]
    if n_commits:
        print(f"  commits {n_commits:,.0f} ({n_commits / n:.2f} a job), writes {n_writes:,.0f}"
              f" ({n_writes / n_commits:.1f} a commit)")
    for k in ("event loop", "writer", "other threads"):
        print(f"  {k:14s} {cost.get(k, 0.0):7.1f} us/job ({cost.get(k + ':kernel', 0.0):.1f} in the kernel)")
    if args.floor and pg is None and n_commits:
        per = max(1, round(n / n_commits))
        floor = sqlite_floor(n, per)
        print(f"  SQLite alone   {floor:7.1f} us/job (the same statements from plain sqlite3, {per} jobs a commit);"
              f" the writer's Python about {cost.get('writer', 0.0) - floor:.1f}")
    if pg is not None:
        print(f"  {'PostgreSQL':14s} {(db_after - db_before) / n * 1e6:7.1f} us/job")
    total = sum(v for k, v in cost.items() if ":" not in k) + ((db_after - db_before) / n * 1e6 if pg else 0)
    print(f"  {'total':14s} {total:7.1f} us/job")


if __name__ == "__main__":
    main()
