"""Many users: fair dispatch (a lone job behind another principal's backlog) and the submit rate (429s).

    python bench/fairness.py [--backlog 10000] [--runs 5] [--pause-ms 20] [--fifo-commit b9ed9c1]
    python bench/fairness.py --part fair --backlog 2000 --runs 1      # a quick check of part 1
    python bench/fairness.py --part rate                              # part 2 only (~30 s)

Part 1, fair dispatch (protocol "Quotas", version 1.3: a principal's lone job
waits behind at most one job per worker of another principal's backlog). Per
run, a fresh `asyncjobs serve` (auth on, tokens for `alice` and `bob`,
`--workers` workers, 8 by default) and the `pause` task of bench_tasks.py (it
sleeps `--pause-ms` and returns the wall-clock moment its handler started).
alice submits `--backlog` jobs, `--concurrency` submits in flight; once every
one has its `202`, bob submits one job and long-polls it (`GET /jobs/{id}?wait=60`).
Figures per run: bob's queue wait (`started_at - created_at` of its job, both
millisecond timestamps), how many of alice's jobs started between bob's submit
and bob's start (alice's jobs listed with `GET /jobs?limit=500` following
`next`; "handler clock": handler start times from the jobs' results, in
(bob's created_at, bob's handler start); "started_at": the jobs' own
millisecond `started_at` in [bob's created_at, bob's started_at], ties at
either end counted), what bob's `202` said (`queue_position`, `Retry-After`)
and what an immediate `GET` of it said. For comparison, the wait plain FIFO
order would have given it: alice's jobs not yet started at bob's submit x their
mean run time (finished_at - started_at of those that ran in the second after
bob's submit, when no submits competed for the cores) / workers. With
`--fifo-commit C`, the
same run is also measured (`--fifo-runs`, 1 by default) on commit C of the
repository (`--repo`, default this checkout) taken by `git archive` into a temp
folder: b9ed9c1 is the last commit before fair dispatch.

Part 2, the submit rate. One fresh server with auth on (alice, bob, carol,
dave), `[limits] submit_rate = --rate, submit_burst = --burst` and the JSON
access log on (its `duration_s` is the server's latency of each answer). The
task is `noop`. Three phases:
  a. baseline: dave alone submits at `--paced-rate` per second (under the rate)
     for `--paced-s` seconds;
  b. alice fires `--burst-submits` submits as fast as `--burst-concurrency`
     keep-alive connections allow: 202s vs 429s; every 429 must carry
     `Retry-After` >= 1 and the RateLimit fields (and every 202 the fields);
     accepted vs burst + rate x the burst's duration; alice's stored jobs
     (`GET /jobs` as alice, every page) must equal the 202s; latency p50/p99 of
     429 and 202 answers, the server's (access log) and the client's. Then,
     after the last 429's Retry-After, one more submit must get its 202;
  c. carol fires the same burst while bob submits at the paced rate, as dave
     did alone: bob's answers must all be 202, its latency next to dave's.
Load generators are this one Python process (aiohttp's client) on the same
two cores as the server, unpinned. Every loop is bounded; servers listen on
127.0.0.1 only and are stopped, their temp folders removed, even on error.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import aiohttp
import orjson

from server import ROOT, Server, machine, percentile, serve_env, source_env

TERMINAL = {"succeeded", "failed", "canceled"}
TOKENS = {name: f"bench-{name}-token-0123456789abcdef" for name in ("alice", "bob", "carol", "dave")}
POLICY_RE = re.compile(r'"submit";q=(\d+);w=(\d+)')
RATELIMIT_RE = re.compile(r'"submit";r=(\d+);t=(\d+)')
TIMEOUT = aiohttp.ClientTimeout(total=120)


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}", "Content-Type": "application/json"}


def auth_config(names: list[str]) -> str:
    return "[auth]\ntokens = {" + ", ".join(f'{n} = "{TOKENS[n]}"' for n in names) + "}\n"


def ts(iso: str | None) -> float | None:
    return None if iso is None else datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"


async def list_jobs(session: aiohttp.ClientSession, headers: dict[str, str], max_pages: int) -> list[dict]:
    """Every job the caller sees, `GET /jobs?limit=500` following `next` (at most ``max_pages`` pages)."""
    jobs: list[dict] = []
    url: str | None = "/jobs?limit=500"
    for _ in range(max_pages):
        if not url:
            return jobs
        async with session.get(url, headers=headers) as r:
            if r.status != 200:
                raise RuntimeError(f"GET {url} answered {r.status}: {await r.text()}")
            page = await r.json(loads=orjson.loads)
        jobs += page["jobs"]
        url = page["next"]
    if url:
        raise RuntimeError(f"more than {max_pages} pages of jobs")
    return jobs


# -- part 1: fair dispatch ------------------------------------------------------------

async def fairness_run(server: Server, backlog: int, concurrency: int, pause_ms: float, workers: int,
                       deadline_s: float) -> dict:
    a_headers, b_headers = auth("alice"), auth("bob")
    body = orjson.dumps({"task": "pause", "params": {"ms": float(pause_ms)}})
    async with aiohttp.ClientSession(server.url, connector=aiohttp.TCPConnector(limit=0), timeout=TIMEOUT) as session:
        counter = iter(range(backlog))
        a_ids: list[str] = []

        async def submitter() -> None:
            for _ in counter:
                async with session.post("/jobs", data=body, headers=a_headers) as r:
                    if r.status != 202:
                        raise RuntimeError(f"alice's submit answered {r.status}: {await r.text()}")
                    a_ids.append((await r.json(loads=orjson.loads))["id"])

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(submitter() for _ in range(concurrency))), deadline_s)
        submit_s = time.perf_counter() - t0

        # bob's one job, as soon as the backlog is queued
        async with session.post("/jobs", data=body, headers=b_headers) as r:
            if r.status != 202:
                raise RuntimeError(f"bob's submit answered {r.status}: {await r.text()}")
            b_retry_after = r.headers.get("Retry-After")
            b202 = await r.json(loads=orjson.loads)
        b_id = b202["id"]
        async with session.get(f"/jobs/{b_id}?redirect=false", headers=b_headers) as r:
            b_get = await r.json(loads=orjson.loads)
        b = b_get
        for _ in range(max(1, int(deadline_s // 60) + 1)):  # long polls of 60 s, bounded by the deadline
            if b["status"] in TERMINAL:
                break
            async with session.get(f"/jobs/{b_id}?wait=60&redirect=false", headers=b_headers) as r:
                b = await r.json(loads=orjson.loads)
        if b["status"] != "succeeded":
            raise RuntimeError(f"bob's job is {b['status']} after the deadline")
        await asyncio.sleep(1.0)  # alice's jobs that started before bob's have finished: their results hold their start
        a_jobs = await list_jobs(session, a_headers, max_pages=backlog // 500 + 10)

    if len(a_jobs) != backlog or {j["id"] for j in a_jobs} != set(a_ids):
        raise RuntimeError(f"alice sees {len(a_jobs)} jobs, submitted {backlog}")
    b_created, b_started = ts(b["created_at"]), ts(b["started_at"])
    b_handler = b["result"]["started"]
    between_handler = between_ms = ahead = started_before_submit = 0
    runs, runs_after = [], []
    for job in a_jobs:
        started = ts(job["started_at"])
        handler = (job["result"] or {}).get("started") if job["status"] == "succeeded" else None
        if handler is not None:
            between_handler += b_created <= handler < b_handler
        elif started is not None:  # still running when listed: its millisecond start, strictly inside
            between_handler += b_created < started < b_started
        if started is not None and b_created <= started <= b_started:
            between_ms += 1
        if started is None or started > b_created:
            ahead += 1
        else:
            started_before_submit += 1
        if job["status"] == "succeeded":
            runs.append(ts(job["finished_at"]) - started)
            if started > b_created:
                runs_after.append(runs[-1])
    # FIFO's wait: the run time of the jobs that ran after bob's submit, once no submits competed for the cores
    mean_run = statistics.fmean(runs_after) if len(runs_after) >= 50 else statistics.fmean(runs)
    return {
        "submit_s": submit_s,
        "wait_ms": (b_started - b_created) * 1000,
        "between_handler": between_handler,
        "between_ms": between_ms,
        "ahead": ahead,
        "position_202": b202.get("queue_position"),
        "retry_after_202": b_retry_after,
        "eta_202_s": None if b202.get("eta") is None else ts(b202["eta"]) - ts(b202["created_at"]),
        "get_status": b_get["status"],
        "position_get": b_get.get("queue_position"),
        "mean_run_ms": mean_run * 1000,
        "mean_run_n": len(runs_after) if len(runs_after) >= 50 else len(runs),
        "fifo_ms": ahead * mean_run / workers * 1000,
    }


def server_code(env: dict[str, str] | None = None) -> str:
    """Where the server's `asyncjobs` package is imported from, with the same PYTHONPATH as Server gives it."""
    out = subprocess.run([sys.executable, "-c", "import asyncjobs; print(asyncjobs.__file__)"], env=serve_env(env),
                         capture_output=True, text=True, cwd=tempfile.gettempdir(), check=True)
    return str(Path(out.stdout.strip()).parent.parent)


def export_commit(repo: Path, commit: str) -> Path:
    """``git archive`` of ``commit`` into a temp folder (no worktree, no checkout)."""
    folder = Path(tempfile.mkdtemp(prefix=f"asyncjobs-{commit}-"))
    tar = folder / "src.tar"
    subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", "-o", str(tar), commit], check=True)
    with tarfile.open(tar) as archive:
        archive.extractall(folder / "src", filter="data")
    tar.unlink()
    return folder


def fairness(args: argparse.Namespace) -> None:
    config = auth_config(["alice", "bob"])
    results: list[tuple[str, dict]] = []
    fifo_dir = None
    try:
        versions = [("fair", None)] * args.runs
        if args.fifo_commit:
            fifo_dir = export_commit(Path(args.repo), args.fifo_commit)
            src = fifo_dir / "src"
            env = source_env(src)
            print(f"FIFO comparison: commit {args.fifo_commit}, server code from {server_code(env)}")
            versions += [(f"FIFO ({args.fifo_commit})", env)] * args.fifo_runs
        for i, (label, env) in enumerate(versions, 1):
            server = Server(workers=args.workers, extra_config=config, env=env)
            try:
                r = asyncio.run(fairness_run(server, args.backlog, args.concurrency, args.pause_ms, args.workers,
                                             args.deadline))
            finally:
                server.stop()
                shutil.rmtree(server.dir, ignore_errors=True)
            results.append((label, r))
            print(f"  run {i} ({label}): bob waited {r['wait_ms']:,.1f} ms, {r['between_handler']} of alice's jobs "
                  f"started in between ({r['between_ms']} by started_at), {r['ahead']:,} of alice's queued at its "
                  f"submit; backlog submitted in {r['submit_s']:.1f} s", flush=True)
    finally:
        if fifo_dir is not None:
            shutil.rmtree(fifo_dir, ignore_errors=True)

    print(f"\nPart 1: bob's lone job behind alice's {args.backlog:,}-job backlog ({args.workers} workers, "
          f"pause {args.pause_ms:g} ms)\n")
    rows = []
    for i, (label, r) in enumerate(results, 1):
        rows.append([i, label, fmt(r["wait_ms"]), r["between_handler"], r["between_ms"], f"{r['ahead']:,}",
                     f"{r['position_202']:,}" if r["position_202"] is not None else "-", r["retry_after_202"] or "-",
                     r["get_status"] + (f" (position {r['position_get']})" if r["position_get"] else ""),
                     f"{fmt(r['mean_run_ms'], 2)} ({r['mean_run_n']:,})", fmt(r["fifo_ms"] / 1000, 2)])
    print(table(["run", "server", "bob's wait ms", "alice's started in between (handler clock)",
                 "same, by started_at (ties in)", "alice's queued at bob's submit", "bob's 202 queue_position",
                 "bob's 202 Retry-After", "GET right after", "alice's mean run ms (jobs)",
                 "FIFO wait s (computed)"], rows))
    print()
    summary = []
    for label in dict.fromkeys(lbl for lbl, _ in results):
        rs = [r for lbl, r in results if lbl == label]
        waits = [r["wait_ms"] for r in rs]
        between = [r["between_handler"] for r in rs]
        between_ms = [r["between_ms"] for r in rs]
        fifo = [r["fifo_ms"] for r in rs]
        summary.append([label, len(rs), fmt(statistics.median(waits)), fmt(max(waits)), statistics.median(between),
                        max(between), max(between_ms), fmt(statistics.median(fifo) / 1000, 2)])
    print(table(["server", "runs", "bob's wait median ms", "max ms", "alice's in between median", "max",
                 "max by started_at", "FIFO wait median s (computed)"], summary))
    fair = [r for lbl, r in results if lbl == "fair"]
    if fair:
        worst = max(max(r["between_handler"], r["between_ms"]) for r in fair)
        print(f"\nprotocol: at most {args.workers} of alice's jobs start between bob's submit and its start: "
              f"{'met' if worst <= args.workers else 'NOT met'} (worst {worst})")


# -- part 2: the submit rate ----------------------------------------------------------

@dataclass
class Answer:
    sent: float  # perf_counter
    received: float
    status: int
    retry_after: str | None
    policy: str | None
    ratelimit: str | None
    content_type: str

    @property
    def ms(self) -> float:
        return (self.received - self.sent) * 1000


async def post(session: aiohttp.ClientSession, headers: dict[str, str], body: bytes) -> Answer:
    sent = time.perf_counter()
    async with session.post("/jobs", data=body, headers=headers) as r:
        await r.read()
        return Answer(sent, time.perf_counter(), r.status, r.headers.get("Retry-After"),
                      r.headers.get("RateLimit-Policy"), r.headers.get("RateLimit"), r.content_type)


async def burst(session: aiohttp.ClientSession, who: str, body: bytes, n: int, concurrency: int) -> list[Answer]:
    counter = iter(range(n))
    answers: list[Answer] = []

    async def worker() -> None:
        for _ in counter:
            answers.append(await post(session, auth(who), body))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answers


async def paced(session: aiohttp.ClientSession, who: str, body: bytes, rate: float, seconds: float) -> list[Answer]:
    start = time.perf_counter()

    async def one(i: int) -> Answer:
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        return await post(session, auth(who), body)

    return list(await asyncio.gather(*(one(i) for i in range(int(rate * seconds)))))


def header_faults(answers: list[Answer], burst_size: int, window_s: int) -> Counter:
    """What is missing or wrong in the answers' Retry-After and RateLimit fields."""
    faults: Counter = Counter()
    for a in answers:
        policy = POLICY_RE.fullmatch(a.policy or "")
        limit = RATELIMIT_RE.fullmatch(a.ratelimit or "")
        if policy is None:
            faults[f"{a.status}: RateLimit-Policy missing or malformed"] += 1
        elif (int(policy[1]), int(policy[2])) != (burst_size, window_s):
            faults[f"{a.status}: RateLimit-Policy {a.policy}"] += 1
        if limit is None:
            faults[f"{a.status}: RateLimit missing or malformed"] += 1
        if a.status == 429:
            if not (a.retry_after or "").isdigit() or int(a.retry_after) < 1:
                faults[f"429: Retry-After {a.retry_after!r}"] += 1
            if limit is not None and int(limit[1]) != 0:
                faults[f"429 with RateLimit {a.ratelimit}"] += 1
            if a.content_type != "application/problem+json":
                faults[f"429: Content-Type {a.content_type}"] += 1
    return faults


def access_log(server: Server, start: int, end: int) -> list[dict]:
    """The JSON access-log records of `POST /jobs` written between two offsets of the server's log."""
    with open(server.log, "rb") as f:
        f.seek(start)
        chunk = f.read(end - start)
    records = []
    for line in chunk.splitlines():
        if line.startswith(b"{"):
            record = orjson.loads(line)
            if record.get("method") == "POST" and record.get("path") == "/jobs":
                records.append(record)
    return records


async def settle_log(server: Server) -> int:
    await asyncio.sleep(0.3)
    return server.log.stat().st_size


async def rate_run(server: Server, args: argparse.Namespace) -> dict:
    body = orjson.dumps({"task": "noop", "params": {}})
    window_s = math.ceil(args.burst / args.rate)
    out: dict = {}
    connector = aiohttp.TCPConnector(limit=args.burst_concurrency + 100)
    async with aiohttp.ClientSession(server.url, connector=connector, timeout=TIMEOUT) as session:
        # a. the baseline: dave alone, paced
        out["dave"] = await asyncio.wait_for(paced(session, "dave", body, args.paced_rate, args.paced_s),
                                             args.deadline)
        await asyncio.sleep(1)
        # b. alice's burst, alone
        log_start = await settle_log(server)
        out["alice"] = await asyncio.wait_for(burst(session, "alice", body, args.burst_submits,
                                                    args.burst_concurrency), args.deadline)
        out["alice_log"] = access_log(server, log_start, await settle_log(server))
        alice_jobs = await list_jobs(session, auth("alice"), max_pages=args.burst_submits // 500 + 10)
        out["alice_stored"] = len(alice_jobs)
        last_429 = max((a for a in out["alice"] if a.status == 429), key=lambda a: a.received, default=None)
        if last_429 is not None:
            wait = int(last_429.retry_after) if (last_429.retry_after or "").isdigit() else 1
            await asyncio.sleep(max(0.0, last_429.received + min(wait, 60) - time.perf_counter()))
            out["after_retry"] = await post(session, auth("alice"), body)
        await asyncio.sleep(1)
        # c. carol's burst while bob submits at the paced rate
        carol, bob = await asyncio.wait_for(asyncio.gather(
            burst(session, "carol", body, args.burst_submits, args.burst_concurrency),
            paced(session, "bob", body, args.paced_rate, args.paced_s)), args.deadline)
        out["carol"], out["bob"] = carol, bob
        out["carol_stored"] = len(await list_jobs(session, auth("carol"), max_pages=args.burst_submits // 500 + 10))
        out["bob_stored"] = len(await list_jobs(session, auth("bob"), max_pages=args.burst_submits // 500 + 10))
    out["window_s"] = window_s
    return out


def rate_report(out: dict, args: argparse.Namespace) -> None:
    print(f"\nPart 2: submit rate {args.rate:g}/s, burst {args.burst}; bursts of {args.burst_submits:,} submits "
          f"from {args.burst_concurrency} connections; paced principals at {args.paced_rate:g}/s for "
          f"{args.paced_s:g} s\n")
    rows = []
    for who in ("alice", "carol"):
        answers = out[who]
        statuses = Counter(a.status for a in answers)
        duration = max(a.received for a in answers) - min(a.sent for a in answers)
        expected = args.burst + args.rate * duration
        got = statuses[202]
        stored = out[f"{who}_stored"]
        rows.append([who + (" (alone)" if who == "alice" else " (with bob)"), f"{len(answers):,}", got,
                     f"{statuses[429]:,}", ", ".join(f"{s}: {n}" for s, n in statuses.items() if s not in (202, 429))
                     or "none", fmt(duration, 2), fmt(expected), got,
                     fmt((got - args.burst) / duration, 1), f"{stored} ({'=' if stored == got else '!='} 202s)"])
    print(table(["burst", "submits", "202", "429", "other", "duration s (client: first sent to last answered)",
                 "expected accepted (burst + rate x s)", "accepted", "refill seen /s ((accepted - burst) / s)",
                 "stored (GET /jobs)"], rows))
    # The bucket sees the requests arrive: the span from the first to the last arrival at the server (the access
    # log's time, the moment of the answer, less its duration; alice's phase holds only her requests).
    arrivals = [ts(r["time"]) - r["duration_s"] for r in out["alice_log"]]
    span = max(arrivals) - min(arrivals)
    got = sum(a.status == 202 for a in out["alice"])
    print(f"\nalice, server side: {len(arrivals):,} submits arrived over {span:.2f} s: expected accepted "
          f"{args.burst} + {args.rate:g} x {span:.2f} = {args.burst + args.rate * span:.1f}, accepted {got} "
          f"(refill seen {(got - args.burst) / span:.1f}/s)")

    print()
    rows = []
    for who in ("alice", "carol", "bob", "dave"):
        faults = header_faults(out[who], args.burst, out["window_s"])
        retry = Counter(a.retry_after for a in out[who] if a.status == 429)
        rows.append([who, f"{len(out[who]):,}", ", ".join(f"{k} x{v}" for k, v in faults.items()) or "none",
                     ", ".join(f"{k} s x{v:,}" for k, v in sorted(retry.items())) or "-"])
    print(table(["principal", "answers", "header faults (429: Retry-After >= 1, RateLimit r=0, problem+json; "
                 "all: RateLimit-Policy q/w, RateLimit)", "429 Retry-After values"], rows))
    sample = next((a for a in out["alice"] if a.status == 429), None)
    if sample is not None:
        print(f"\na 429's fields: Retry-After: {sample.retry_after}, RateLimit-Policy: {sample.policy}, "
              f"RateLimit: {sample.ratelimit}")
    after = out.get("after_retry")
    if after is not None:
        print(f"alice's submit after the last 429's Retry-After: {after.status} (RateLimit: {after.ratelimit})")

    print()
    rows = []
    log = out["alice_log"]
    for status in (202, 429):
        server_ms = [r["duration_s"] * 1000 for r in log if r["status"] == status]
        client_ms = [a.ms for a in out["alice"] if a.status == status]
        rows.append([f"alice's {status} (burst alone)", f"{len(server_ms):,}", fmt(percentile(server_ms, 50), 2),
                     fmt(percentile(server_ms, 99), 2), fmt(percentile(client_ms, 50), 1),
                     fmt(percentile(client_ms, 99), 1)])
    carol = out["carol"]
    c0, c1 = min(a.sent for a in carol), max(a.received for a in carol)
    overlapped = [a for a in out["bob"] if a.sent <= c1 and a.received >= c0]
    for label, answers in (("dave alone (paced)", out["dave"]), ("bob, carol's burst on (paced)", out["bob"]),
                           ("bob, those sent while carol's burst ran", overlapped)):
        client_ms = [a.ms for a in answers]
        statuses = Counter(a.status for a in answers)
        rows.append([label + ": " + ", ".join(f"{s} x{n}" for s, n in statuses.items()), f"{len(client_ms):,}",
                     "-", "-", fmt(percentile(client_ms, 50), 1), fmt(percentile(client_ms, 99), 1)])
    print(table(["answers", "n", "server p50 ms", "server p99 ms", "client p50 ms", "client p99 ms"], rows))
    print(f"\nbob: {sum(a.status == 202 for a in out['bob'])} of {len(out['bob'])} submits answered 202 "
          f"({len(overlapped)} of them sent while carol's burst ran, all "
          f"{'202' if all(a.status == 202 for a in overlapped) else 'NOT 202'}); bob's stored jobs "
          f"{out['bob_stored']}")


def rate(args: argparse.Namespace) -> None:
    config = auth_config(["alice", "bob", "carol", "dave"]) + \
        f"[limits]\nsubmit_rate = {args.rate:g}\nsubmit_burst = {args.burst}\n"
    server = Server(extra_config=config, env={"ASYNCJOBS_SERVER_ACCESS_LOG": "json"})
    try:
        out = asyncio.run(rate_run(server, args))
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)
    rate_report(out, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["fair", "rate", "all"], default="all")
    parser.add_argument("--backlog", type=int, default=10_000, help="alice's jobs ahead of bob's")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--pause-ms", type=float, default=20.0, help="each job's run time (the `pause` task)")
    parser.add_argument("--concurrency", type=int, default=64, help="alice's submits in flight")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--fifo-commit", help="also measure this commit (b9ed9c1: the last before fair dispatch)")
    parser.add_argument("--fifo-runs", type=int, default=1)
    parser.add_argument("--repo", default=str(ROOT), help="the git repository holding --fifo-commit")
    parser.add_argument("--rate", type=float, default=50.0, help="limits.submit_rate")
    parser.add_argument("--burst", type=int, default=100, help="limits.submit_burst")
    parser.add_argument("--burst-submits", type=int, default=2000)
    parser.add_argument("--burst-concurrency", type=int, default=200)
    parser.add_argument("--paced-rate", type=float, default=40.0, help="the paced principals' submits per second")
    parser.add_argument("--paced-s", type=float, default=5.0)
    parser.add_argument("--deadline", type=float, default=600, help="give up on a phase after this many seconds")
    args = parser.parse_args()
    print(machine())
    print(f"aiohttp {aiohttp.__version__}, orjson {orjson.__version__}; server code from {server_code()}")
    if args.part in ("fair", "all"):
        fairness(args)
    if args.part in ("rate", "all"):
        rate(args)


if __name__ == "__main__":
    main()
