"""Round 2: every headline figure in one run, medians over --runs, then the goals met or not.

    python bench/round2.py [--runs 3] [--duration 10] [--sqlite-jobs 20000]
        [--pg-jobs 5000] [--parts bare,sqlite,pg,peers] [--deadline 300] [--quiet-wait 30] [--json PATH]

What runs (each --runs times; the medians are reported), reusing the other scripts' functions:

- bare (w1_submit.bare_run, bare.py): W1 under `wrk -t1 -c64 -d<duration>s` on the bare aiohttp app,
  the ceiling; and W2's bare ceiling: --sqlite-jobs submits from the raw client of w2_end_to_end
  (64 keep-alive connections) to the same app. The app stores nothing, so there is no job to confirm:
  that figure is submits / submit time ("bare ceiling (submits only)").
- sqlite: W1 under wrk on `asyncjobs serve` with the defaults (w1_submit.asyncjobs_run("full"):
  synchronous full, 8 workers); W2 (w2_end_to_end.run, client "raw"): --sqlite-jobs noop jobs at 64
  concurrency on a fresh Server() per run, jobs / time until every one is confirmed terminal.
- pg: one throwaway PostgreSQL cluster (pg_cluster.Cluster, fsync on) for the pg and peers parts; the
  setups 1node and 2nodes of pg.py through pg.run_setup: W1 under wrk, W1 from the Python client
  (--pg-jobs submits, 64 at once) and W2 end to end, a fresh database per measurement.
- peers: procrastinate (pg_peer_procrastinate.run_peer) on the same cluster, a fresh database per run,
  --pg-jobs jobs; huey and arq (Redis with AOF fsync always, and in memory) through
  `peers.py --runs N --jobs <sqlite-jobs> --systems huey,arq,arq-memory --json PATH` as a subprocess.

Pinning (2 cores; core 0 is the service's, core 1 the load's):
- W1 bare and SQLite: the server on core 0 (taskset -a), wrk on core 1 (as w1_submit.py does).
- W2 bare and SQLite: the server's threads on core 0 (`taskset -a -p -c 0 PID`); this process, which
  runs the client, on core 1 (os.sched_setaffinity) while the client runs, restored after.
- PostgreSQL: the cluster's processes are pinned to core 0 (backends forked later inherit it), the
  database sharing the service's core; but pg.run_setup starts the asyncjobs nodes and wrk unpinned,
  and the Python client and procrastinate run unpinned too: in the PostgreSQL part only PostgreSQL is
  pinned. peers.py pins its services to core 0 and its producers to core 1 itself.

Before each measurement the machine is given up to --quiet-wait seconds to be quiet (pg_cluster.wait_quiet).
A part or a run that fails is reported with its reason and the run goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from pg import SETUPS, run_setup  # noqa: E402
from pg_cluster import Cluster, proc_tree, wait_quiet  # noqa: E402
from server import Server, machine, stop_process  # noqa: E402
from w1_submit import LOAD_CORE, SERVER_CORE, asyncjobs_run, bare_run, free_port, pin, wait_port  # noqa: E402
from w2_end_to_end import raw_submitter, run  # noqa: E402

PARTS = ("bare", "sqlite", "pg", "peers")
PEER_SYSTEMS = ("huey", "arq", "arq-memory")
CONNECTIONS = CONCURRENCY = 64
WORKERS = 8


def say(text: str = "") -> None:
    print(text, flush=True)


def median_of(runs: list[dict], key: str, p99: str | None = None) -> dict | None:
    """The median of ``key`` over the runs; with ``p99``, also that field of the median run (lower middle)."""
    if not runs:
        return None
    out = {"median": statistics.median(r[key] for r in runs), "runs": [round(r[key], 1) for r in runs]}
    if p99:
        out["p99_ms"] = sorted(runs, key=lambda r: r[key])[(len(runs) - 1) // 2][p99]
    return out


def quiet(args: argparse.Namespace) -> None:
    note = wait_quiet(args.quiet_wait)
    if note:
        say(f"    {note}")


def repeat(label: str, args: argparse.Namespace, once, failures: dict[str, str], wait: bool = True) -> list[dict]:
    """Call ``once()`` --runs times; a failing run is reported (and remembered) and the rest go on."""
    results = []
    for i in range(1, args.runs + 1):
        if wait:  # pg.run_setup waits for a quiet machine itself
            quiet(args)
        t0 = time.monotonic()
        try:
            r = once()
        except Exception as exc:  # reported, the run goes on
            said = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
            if isinstance(exc, asyncio.TimeoutError) and not said:
                said = f"the deadline ({args.deadline:g} s) passed"
            failures[label] = f"{type(exc).__name__}: {said}"
            say(f"  {label} run {i}/{args.runs}: FAILED: {failures[label]}")
            continue
        results.append(r)
        say(f"  {label} run {i}/{args.runs} ({time.monotonic() - t0:.0f} s): {r['_show']}")
    return results


# ------------------------------------------------------------------------------------------- the parts

def w1(fn, *fn_args) -> dict:
    r, pinned = fn(*fn_args)
    show = f"{r['rps']:.0f} req/s, p50 {r['p50']:.2f} ms, p99 {r['p99']:.2f} ms, non-2xx {r['non2xx']}"
    if r["errors"]:
        show += f", socket errors {r['errors']}"
    if not pinned:
        show += " (taskset on the server failed: not pinned)"
    return {**{k: v for k, v in r.items() if k != "raw"}, "_show": show}


def on_load_core(coro_fn):
    """Run a coroutine with this thread on the load core, restoring the affinity after."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    try:
        return asyncio.run(coro_fn())
    finally:
        os.sched_setaffinity(0, before)


def w2_bare(jobs: int, deadline: float) -> dict:
    port = free_port()
    proc = subprocess.Popen(["taskset", "-c", SERVER_CORE, sys.executable, str(BENCH / "bare.py"), "--port",
                             str(port)], stdout=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        pinned = pin(proc.pid, SERVER_CORE)
        target = types.SimpleNamespace(host="127.0.0.1", port=port)  # all raw_submitter reads

        async def submit() -> float:
            import orjson

            ids: list[str] = []
            counter = iter(range(jobs))
            body = orjson.dumps({"task": "noop", "params": {}})
            t0 = time.perf_counter()
            await asyncio.wait_for(asyncio.gather(*(raw_submitter(target, body, counter, ids)
                                                    for _ in range(CONCURRENCY))), deadline)
            return time.perf_counter() - t0

        submit_s = on_load_core(submit)
    finally:
        stop_process(proc)
    rate = jobs / submit_s
    return {"per_s": rate, "submit_s": submit_s,
            "_show": f"{rate:.0f} submits/s ({submit_s:.2f} s){'' if pinned else ' (server not pinned)'}"}


def w2_sqlite(jobs: int, deadline: float) -> dict:
    server = Server()  # the defaults: synchronous full, 8 workers
    try:
        pinned = pin(server.proc.pid, SERVER_CORE)
        r = on_load_core(lambda: run(server, jobs, CONCURRENCY, deadline, client="raw"))
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)
    rate = r["jobs"] / r["total_s"]
    return {**r, "per_s": rate, "_show": f"{rate:.0f} jobs/s ({r['total_s']:.2f} s, submits {r['submit_s']:.2f} s,"
                                         f" {r['not_succeeded']} not succeeded){'' if pinned else ' (not pinned)'}"}


def pin_cluster(pg: Cluster) -> str:
    pids = proc_tree(pg.pid)
    ok = [p for p in pids if subprocess.run(["taskset", "-a", "-p", "-c", SERVER_CORE, str(p)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0]
    return (f"PostgreSQL: {len(ok)} of {len(pids)} processes pinned to core {SERVER_CORE} (later backends inherit"
            f" it); asyncjobs nodes, wrk, the Python client and procrastinate's worker run unpinned (pg.run_setup"
            f" starts them so; pg.py not modified)")


def pg_setup_once(pg: Cluster, name: str, args: argparse.Namespace) -> dict:
    ns = argparse.Namespace(no_wrk=False, duration=args.duration, connections=CONNECTIONS, jobs=args.pg_jobs,
                            concurrency=CONCURRENCY, workers=WORKERS, loop="asyncio", deadline=args.deadline,
                            quiet_wait=args.quiet_wait)
    out = run_setup(pg, SETUPS[name], ns)
    w, p = out["wrk"], out["py"]
    return {"wrk_rps": w["rps"], "wrk_p99": w["p99"], "py_rate": p["submit_rate"], "py_p99": p["p99"],
            "per_s": p["jobs_per_s"], "_show": f"wrk {w['rps']:.0f} req/s (p99 {w['p99']:.2f} ms), Python "
            f"{p['submit_rate']:.0f} submits/s (p99 {p['p99']:.2f} ms), W2 {p['jobs_per_s']:.0f} jobs/s"}


def procrastinate_once(pg: Cluster, i: list[int], args: argparse.Namespace) -> dict:
    from pg_peer_procrastinate import run_peer

    i[0] += 1
    db = pg.create_database(f"procrastinate_{i[0]}")
    pg.checkpoint()
    r = run_peer(db, jobs=args.pg_jobs, concurrency=CONCURRENCY, workers=WORKERS, pool=10,
                 deadline_s=args.deadline, pg_pid=pg.pid)
    return {"py_rate": r["submit_rate"], "py_p99": r["p99"], "per_s": r["jobs_per_s"],
            "_show": f"defer {r['submit_rate']:.0f}/s (p99 {r['p99']:.2f} ms), W2 {r['jobs_per_s']:.0f} jobs/s"}


def huey_arq(args: argparse.Namespace) -> dict[str, dict | str]:
    """peers.py as a subprocess; {system: medians} or {system: "failed: why"}."""
    systems = tuple(s for s in args.peer_systems.split(",") if s)
    script = BENCH / "peers.py"
    if not script.exists():
        return {s: "failed: bench/peers.py not found" for s in systems}
    out_json = Path(tempfile.mkdtemp(prefix="round2-peers-")) / "peers.json"
    cmd = [sys.executable, str(script), "--runs", str(args.runs), "--jobs", str(args.sqlite_jobs),
           "--systems", ",".join(systems), "--deadline", str(args.deadline), "--json", str(out_json)]
    say(f"  $ {shlex.join(cmd)}")
    timeout = (args.runs + 1) * len(systems) * args.deadline + 120
    proc = subprocess.Popen(cmd, cwd=BENCH, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(timeout, proc.terminate)  # peers.py cleans up its services on SIGTERM
    timer.start()
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip())
            say(f"    | {line.rstrip()}")
        proc.wait()
    finally:
        timer.cancel()
    why = f"peers.py exited {proc.returncode}" + (f" (timed out after {timeout:.0f} s)" if proc.returncode in (-15, 143)
                                                  else "")
    try:
        medians = json.loads(out_json.read_text())
    except (OSError, ValueError):
        medians = {}
        tail = next((ln.strip() for ln in reversed(lines) if ln.strip()), "")
        why += f": {' '.join(tail.split())[-200:]}" if tail else ""
    shutil.rmtree(out_json.parent, ignore_errors=True)
    result: dict[str, dict | str] = {}
    for s in systems:
        if s in medians:
            result[s] = medians[s]
        else:
            said = next((ln.split("FAILED:", 1)[1].strip() for ln in reversed(lines)
                         if "FAILED:" in ln and ln.split()[0] == s), "")
            result[s] = f"failed: {said or why}"
    return result


# ------------------------------------------------------------------------------------------- report

def fmt(x: float | None, spec: str = ".0f") -> str:
    return "n/a" if x is None else format(x, spec)


def goal(label: str, value: float | None, target: float | None, ok, detail: str) -> dict:
    if value is None or target is None:
        verdict = "not evaluated (a figure is missing)"
    else:
        verdict = "met" if ok(value, target) else "NOT met"
    return {"goal": label, "verdict": verdict, "detail": detail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10, help="W1 wrk seconds")
    parser.add_argument("--sqlite-jobs", type=int, default=20000, help="W2 jobs (bare, SQLite, huey, arq)")
    parser.add_argument("--pg-jobs", type=int, default=5000, help="W1 Python / W2 jobs on PostgreSQL")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {','.join(PARTS)}")
    parser.add_argument("--deadline", type=float, default=300, help="seconds per W2 run before giving up")
    parser.add_argument("--quiet-wait", type=float, default=30, help="wait up to this for a quiet machine")
    parser.add_argument("--peer-systems", default=",".join(PEER_SYSTEMS),
                        help="peers.py's systems (arq's W2 is capped near 200 jobs/s by its poll: arq-memory adds"
                             " little but time)")
    parser.add_argument("--json", type=Path, help="write all medians and the goals' verdicts here")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    if shutil.which("wrk") is None and {"bare", "sqlite", "pg"} & set(parts):
        sys.exit("wrk not found: apt-get install wrk")

    import aiohttp

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    commit = subprocess.run(["git", "-C", str(BENCH.parent), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "?"
    info = {"command": shlex.join([sys.executable, *sys.argv]), "machine": machine(), "cpu": model,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
            "aiohttp": aiohttp.__version__, "postgresql": None, "notes": []}
    say(f"$ {info['command']}")
    say(f"{info['machine']}; {model}; {info['date']}; commit {commit}; aiohttp {aiohttp.__version__}")
    say(f"runs {args.runs}, W1 wrk -t1 -c{CONNECTIONS} -d{args.duration}s, W2 {args.sqlite_jobs} jobs (SQLite),"
        f" {args.pg_jobs} jobs (PostgreSQL), {CONCURRENCY} submitters, {WORKERS} workers, parts {','.join(parts)}")

    failures: dict[str, str] = {}
    m: dict[str, dict | None] = {}  # the medians
    peers: dict[str, dict | str] = {}

    if "bare" in parts:
        say("\n== bare aiohttp (ceiling): server core 0, load core 1")
        m["bare_w1"] = median_of(repeat("bare W1", args, lambda: w1(bare_run, args.duration, CONNECTIONS),
                                        failures), "rps", "p99")
        m["bare_w2"] = median_of(repeat("bare W2 (submits only)", args,
                                        lambda: w2_bare(args.sqlite_jobs, args.deadline), failures), "per_s")
    if "sqlite" in parts:
        say("\n== asyncjobs SQLite, defaults (synchronous full, 8 workers): server core 0, load core 1")
        m["sqlite_w1"] = median_of(repeat("SQLite W1", args, lambda: w1(asyncjobs_run, "full", args.duration,
                                                                        CONNECTIONS), failures), "rps", "p99")
        m["sqlite_w2"] = median_of(repeat("SQLite W2", args, lambda: w2_sqlite(args.sqlite_jobs, args.deadline),
                                          failures), "per_s")
    if "pg" in parts or "peers" in parts:
        say("\n== PostgreSQL (one throwaway cluster, fsync on)")
        try:
            with Cluster(fsync=True) as pg:
                info["postgresql"] = pg.describe()
                note = pin_cluster(pg)
                info["notes"].append(note)
                say(f"  {info['postgresql']}\n  {note}")
                if "pg" in parts:
                    for name in ("1node", "2nodes"):
                        say(f"-- asyncjobs PostgreSQL {name}: {SETUPS[name].describe(WORKERS)}")
                        runs = repeat(f"PG {name}", args, lambda name=name: pg_setup_once(pg, name, args), failures,
                                      wait=False)
                        m[f"pg_{name}_wrk"] = median_of(runs, "wrk_rps", "wrk_p99")
                        m[f"pg_{name}_py"] = median_of(runs, "py_rate", "py_p99")
                        m[f"pg_{name}_w2"] = median_of(runs, "per_s")
                if "peers" in parts:
                    try:
                        from pg_peer_procrastinate import procrastinate_version

                        info["procrastinate"] = procrastinate_version()
                        say(f"-- procrastinate: {info['procrastinate']}, worker concurrency {WORKERS}, pool 10")
                        counter = [0]
                        runs = repeat("procrastinate", args, lambda: procrastinate_once(pg, counter, args), failures)
                    except ImportError as exc:
                        failures["procrastinate"] = f"not installed ({exc})"
                        say(f"  procrastinate: FAILED: {failures['procrastinate']}")
                        runs = []
                    m["procrastinate_py"] = median_of(runs, "py_rate", "py_p99")
                    m["procrastinate_w2"] = median_of(runs, "per_s")
        except Exception as exc:  # the cluster itself failed
            failures["postgresql"] = f"{type(exc).__name__}: {exc}"
            say(f"  PostgreSQL: FAILED: {failures['postgresql']}")
    if "peers" in parts:
        say("\n== huey and arq (bench/peers.py)")
        try:
            peers = huey_arq(args)
        except Exception as exc:  # reported as failed
            peers = {s: f"failed: {type(exc).__name__}: {exc}" for s in PEER_SYSTEMS}

    # ---- the table
    def get(key: str, field: str = "median") -> float | None:
        return (m.get(key) or {}).get(field)

    def cell_w1(key: str, kind: str) -> str:
        if m.get(key) is None:
            return "failed (see notes)" if key in m else "not run"
        return f"{kind} {get(key):,.0f} ({get(key, 'p99_ms'):.2f})"

    def peer_cells(s: str) -> tuple[str, str]:
        r = peers.get(s)
        if r is None:
            return "not run", "not run"
        if isinstance(r, str):
            return r, r
        return f"Python {r['w1_per_s']:,.0f} ({r['w1_p99_ms']:.2f})", f"{r['w2_per_s']:,.0f}"

    def w2_cell(key: str, suffix: str = "") -> str:
        return "not run" if key not in m else ("failed (see notes)" if m[key] is None else f"{get(key):,.0f}{suffix}")

    rows = [("bare aiohttp (ceiling)", cell_w1("bare_w1", "wrk"), w2_cell("bare_w2", " (bare ceiling, submits only)")),
            ("asyncjobs SQLite defaults", cell_w1("sqlite_w1", "wrk"), w2_cell("sqlite_w2"))]
    for name, label in (("1node", "1 node"), ("2nodes", "2 nodes")):
        w1c = cell_w1(f"pg_{name}_wrk", "wrk")
        if m.get(f"pg_{name}_py"):
            w1c += f"; {cell_w1(f'pg_{name}_py', 'Python')}"
        rows.append((f"asyncjobs PostgreSQL {label}", w1c, w2_cell(f"pg_{name}_w2")))
    rows.append(("procrastinate (PostgreSQL)", cell_w1("procrastinate_py", "Python"), w2_cell("procrastinate_w2")))
    for s, label in (("huey", "huey (SQLite)"), ("arq", "arq (Redis AOF always)"),
                     ("arq-memory", "arq (Redis in memory)")):
        rows.append((label, *peer_cells(s)))

    say(f"\n## Round 2: medians of {args.runs} run(s)\n")
    say("| system | W1 per s (p99 ms) | W2 jobs/s |")
    say("| --- | --- | --- |")
    for row in rows:
        say(f"| {' | '.join(row)} |")
    say("\nW1: wrk = wrk -c64 requests/s (p99 of the median run); Python = submits (defers, enqueues) per s from a"
        " Python client with 64 at once. W2: jobs / time until all are confirmed done.")

    # ---- the goals
    sq_w2, sq_w1, bare_w1 = get("sqlite_w2"), get("sqlite_w1"), get("bare_w1")
    sq_p99, bare_p99 = get("sqlite_w1", "p99_ms"), get("bare_w1", "p99_ms")
    pg1, pg2, pro = get("pg_1node_w2"), get("pg_2nodes_w2"), get("procrastinate_w2")
    peer_w2 = {s: r["w2_per_s"] for s, r in peers.items() if isinstance(r, dict)}
    if pro is not None:
        peer_w2["procrastinate"] = pro
    best = max(peer_w2.items(), key=lambda kv: kv[1]) if peer_w2 else None
    ratio = sq_w1 / bare_w1 if sq_w1 and bare_w1 else None
    goals = [
        goal("(a) W2 SQLite >= 5,000 jobs/s", sq_w2, 5000, lambda v, t: v >= t, f"{fmt(sq_w2)} jobs/s"),
        goal("(b) W2 SQLite >= 3x the best peer's W2", sq_w2, best and best[1], lambda v, t: v >= 3 * t,
             f"{fmt(sq_w2)} vs best peer {best[0]} {best[1]:.0f} (x{sq_w2 / best[1]:.1f})"
             if best and sq_w2 and best[1] else f"{fmt(sq_w2)}; peers: {peer_w2 or 'none measured'}"),
        goal("(c) W1 SQLite req/s >= 0.50 of bare", sq_w1, bare_w1, lambda v, t: v >= 0.5 * t,
             f"{fmt(sq_w1)} / {fmt(bare_w1)} = {fmt(ratio, '.2f')}"
             + (f"; >= 0.70: {'yes' if ratio >= 0.7 else 'no'}" if ratio else "")),
        goal("(d) W1 SQLite p99 <= 2x bare p99", sq_p99, bare_p99, lambda v, t: v <= 2 * t,
             f"{fmt(sq_p99, '.2f')} ms vs {fmt(bare_p99, '.2f')} ms"
             + (f" (x{sq_p99 / bare_p99:.2f})" if sq_p99 and bare_p99 else "")),
        goal("(e) PG 1 node W2 >= 10x procrastinate W2", pg1, pro, lambda v, t: v >= 10 * t,
             f"{fmt(pg1)} vs {fmt(pro)}" + (f" (x{pg1 / pro:.1f})" if pg1 and pro else "")),
        goal("(f) PG 2 nodes W2 >= 1.6x PG 1 node W2", pg2, pg1, lambda v, t: v >= 1.6 * t,
             f"{fmt(pg2)} vs {fmt(pg1)}" + (f" (x{pg2 / pg1:.2f})" if pg2 and pg1 else "")),
    ]
    say("\n## Goals\n")
    for g in goals:
        say(f"- {g['goal']}: **{g['verdict']}** ({g['detail']})")
    say("\n## Notes\n")
    for note in info["notes"] + [f"{k}: failed: {v}" for k, v in failures.items()]:
        say(f"- {note}")
    say(f"- {info['machine']}; {model}; {info['date']}; commit {commit}; aiohttp {aiohttp.__version__};"
        f" {info['postgresql'] or 'PostgreSQL not run'}")
    say(f"- command: {info['command']}")
    if args.json:
        args.json.write_text(json.dumps({"info": info, "args": {k: str(v) for k, v in vars(args).items()},
                                         "medians": m, "peers": peers, "failures": failures, "goals": goals},
                                        indent=2) + "\n")
        say(f"wrote {args.json}")


if __name__ == "__main__":
    main()
