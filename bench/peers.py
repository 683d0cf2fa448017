"""Peer job queues on our W1/W2 workloads: huey (SqliteHuey on a SQLite file) and arq (on Redis).

    python bench/peers.py [--jobs 20000] [--concurrency 64] [--runs 3]
        [--systems huey,arq,arq-memory] [--deadline 300] [--json PATH]

Systems
  huey        SqliteHuey(journal_mode="wal", fsync=True) on a fresh file in a temp dir (ext4). fsync=True
              is SqliteStorage's only durability option: it runs `PRAGMA synchronous=2` (FULL), read
              back and printed at the top. Each enqueue is its own `begin exclusive` transaction, so in
              WAL + FULL every enqueue, dequeue and result write fsyncs the WAL. One connection per
              process behind a lock, so the 64 producer threads commit one at a time.
  arq         arq against a private `redis-server --appendonly yes --appendfsync always --save ""`:
              Redis fsyncs the AOF before replying to a write (group commit per event-loop turn).
  arq-memory  the same against a private `redis-server --appendonly no --save ""`: nothing durable.

W1 "durable submits": --jobs enqueues of a no-op task (no args) from --concurrency producers with no
  consumer running. huey: 64 threads calling the task (huey's enqueue is synchronous); arq: 64 asyncio
  tasks calling `pool.enqueue_job("arq_noop")` on one ArqRedis pool. Reports submits/s (first enqueue
  to last reply) and per-enqueue latency p50/p99 (ms).
W2 "end to end": the same producers while the consumer runs; the clock runs from the first enqueue
  until every job is confirmed done. The consumer is first proven up with one warm-up job.
  huey consumer: `huey_consumer peer_tasks.huey -w 8 -k thread -n -q` (8 thread workers, --huey-workers; no periodic
    tasks, WARNING-level logging; polling defaults: initial delay 0.1 s, backoff 1.15, max 10 s).
    Confirmation: `storage.result_store_size()` (count of rows in the kv result table; the no-op's
    None result is stored because store_none=True) polled every 20 ms until it reaches --jobs.
  arq worker: `Worker(functions=[arq_noop], max_jobs=8)` with arq's other defaults (poll_delay 0.5 s,
    keep_result 3600 s), no logging configured. Confirmation: ZCARD of the queue `arq:queue` polled
    every 20 ms after the last enqueue returned until 0; arq's worker removes a job from that zset in
    the same MULTI that stores its result, so 0 means every job finished. Afterwards the result keys of
    all enqueued ids are counted with EXISTS and must equal --jobs. After the main runs, W2 is run once
    more per arq system with arq's default max_jobs=10. Note: a poll takes at most queue_read_limit
    (max(5 * max_jobs, 100) = 100) job ids and polls are poll_delay (0.5 s) apart, so with these
    defaults arq's W2 cannot exceed ~200 jobs/s whatever the storage; it measures that default.

Placement (2 cores): services and consumers (huey_consumer, redis-server, arq worker) are started
with `taskset -c 0`; this process, which runs all producers, pins itself to core 1 first.
Every run has a deadline (--deadline, per system per run) after which it stops and counts as failed.
Temp dirs and subprocesses are removed on exit, also on errors and SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import arq
import huey
import peer_tasks
import redis
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import default_queue_name, result_key_prefix

BENCH = Path(__file__).resolve().parent
SERVICE_CORE, LOAD_CORE = 0, 1
HUEY_WORKERS = 8
REDIS_MODES = {"arq": ["--appendonly", "yes", "--appendfsync", "always", "--save", ""],
               "arq-memory": ["--appendonly", "no", "--save", ""]}
ARQ_MAX_JOBS = 8
POLL_S = 0.02


def huey_consumer(workers: int = HUEY_WORKERS) -> list[str]:
    """huey's consumer command: ``workers`` thread workers, no periodic tasks, WARNING-level logging."""
    return [str(Path(sys.executable).parent / "huey_consumer"), "peer_tasks.huey", "-w", str(workers), "-k", "thread",
            "-n", "-q"]


_procs: list[subprocess.Popen] = []
_dirs: list[Path] = []


class RunFailed(Exception):
    pass


@dataclass
class Result:
    w1_per_s: float
    w1_p50_ms: float
    w1_p99_ms: float
    w2_per_s: float


# ---------------------------------------------------------------- processes and temp dirs

def tempdir(prefix: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    _dirs.append(d)
    return d


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start argv pinned to the service core, output to `log`."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(["taskset", "-c", str(SERVICE_CORE), *argv], cwd=BENCH, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    _procs.append(proc)
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if proc in _procs:
        _procs.remove(proc)


def cleanup() -> None:
    for proc in list(_procs):
        stop(proc)
    for d in _dirs:
        shutil.rmtree(d, ignore_errors=True)
    _dirs.clear()


def check_alive(proc: subprocess.Popen, log: Path) -> None:
    if proc.poll() is not None:
        tail = log.read_text(errors="replace")[-1500:]
        raise RunFailed(f"{Path(proc.args[3]).name} exited with {proc.returncode}: {tail}")


class PrivateRedis:
    """A redis-server on a free 127.0.0.1 port in its own temp dir, pinned to the service core."""

    def __init__(self, mode: list[str]) -> None:
        self.dir = tempdir("peers-redis-")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port: int = s.getsockname()[1]
        self.log = self.dir / "redis.log"
        self.proc = spawn(["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir),
                           "--daemonize", "no", *mode], self.log)
        client = redis.Redis(port=self.port)
        end = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                check_alive(self.proc, self.log)
                if time.monotonic() > end:
                    raise RunFailed("redis-server did not answer PING in 10 s")
                time.sleep(0.05)
        self.config = {k: client.config_get(k)[k] for k in ("appendonly", "appendfsync", "save")}
        client.close()

    def close(self) -> None:
        stop(self.proc)


# ---------------------------------------------------------------- measurements

def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile of seconds, in ms."""
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)] * 1000


def thread_producers(call: Callable[[], Any], jobs: int, concurrency: int,
                     deadline: float) -> tuple[float, float, list[float]]:
    """`jobs` calls of `call` from `concurrency` threads: (start, end, per-call latencies)."""
    counter = itertools.count()
    lat: list[float] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(concurrency + 1)

    def worker() -> None:
        barrier.wait()
        mine: list[float] = []
        try:
            while next(counter) < jobs and not errors:
                if time.monotonic() > deadline:
                    raise RunFailed("deadline passed while enqueueing")
                t = time.perf_counter()
                call()
                mine.append(time.perf_counter() - t)
        except BaseException as e:
            errors.append(e)
        lat.extend(mine)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 10)
    end = time.perf_counter()
    if errors or any(t.is_alive() for t in threads):
        raise RunFailed(f"producers failed: {errors[0] if errors else 'threads still running'}")
    return start, end, lat


def huey_run(jobs: int, concurrency: int, deadline: float, workers: int = HUEY_WORKERS) -> Result:
    # W1: no consumer.
    h = peer_tasks.make_huey(str(tempdir("peers-huey-w1-") / "huey.db"))
    start, end, lat = thread_producers(peer_tasks.register(h), jobs, concurrency, deadline)
    if (queued := h.storage.queue_size()) != jobs:
        raise RunFailed(f"huey W1: {queued} tasks in the queue, expected {jobs}")
    h.storage.close()
    w1 = (jobs / (end - start), pct(lat, 0.5), pct(lat, 0.99))

    # W2: consumer subprocess on the service core.
    d = tempdir("peers-huey-w2-")
    h = peer_tasks.make_huey(str(d / "huey.db"))
    task = peer_tasks.register(h)
    log = d / "consumer.log"
    consumer = spawn(huey_consumer(workers), log, {"PEERS_HUEY_DB": str(d / "huey.db"), "PYTHONPATH": str(BENCH)})
    try:
        task().get(blocking=True, timeout=30)  # the consumer is up; get() pops the warm-up result
        start, _, _ = thread_producers(task, jobs, concurrency, deadline)
        while (done := h.storage.result_store_size()) < jobs:
            check_alive(consumer, log)
            if time.monotonic() > deadline:
                raise RunFailed(f"huey W2: deadline passed with {done}/{jobs} results")
            time.sleep(POLL_S)
        end = time.perf_counter()
    finally:
        stop(consumer)
    h.storage.close()
    return Result(*w1, jobs / (end - start))


async def async_producers(pool: ArqRedis, jobs: int, concurrency: int,
                          deadline: float) -> tuple[float, float, list[float], list[str]]:
    todo = iter(range(jobs))
    lat: list[float] = []
    ids: list[str] = []

    async def producer() -> None:
        for _ in todo:
            t = time.perf_counter()
            job = await pool.enqueue_job("arq_noop")
            lat.append(time.perf_counter() - t)
            if job is None:
                raise RunFailed("enqueue_job returned None")
            ids.append(job.job_id)

    start = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(*(producer() for _ in range(concurrency))),
                               max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise RunFailed(f"deadline passed while enqueueing ({len(ids)}/{jobs})") from None
    return start, time.perf_counter(), lat, ids


async def arq_w1(port: int, jobs: int, concurrency: int, deadline: float) -> tuple[float, float, float]:
    pool = await create_pool(RedisSettings(host="127.0.0.1", port=port))
    try:
        start, end, lat, _ = await async_producers(pool, jobs, concurrency, deadline)
        if (queued := await pool.zcard(default_queue_name)) != jobs:
            raise RunFailed(f"arq W1: {queued} jobs queued, expected {jobs}")
    finally:
        await pool.aclose()
    return jobs / (end - start), pct(lat, 0.5), pct(lat, 0.99)


async def arq_w2(port: int, jobs: int, concurrency: int, deadline: float, max_jobs: int, log: Path) -> float:
    worker = spawn([sys.executable, str(BENCH / "peer_tasks.py"), str(port), str(max_jobs)], log)
    pool = await create_pool(RedisSettings(host="127.0.0.1", port=port))
    try:
        warm = await pool.enqueue_job("arq_noop")
        assert warm is not None
        await warm.result(timeout=30)  # the worker is up
        start, _, _, ids = await async_producers(pool, jobs, concurrency, deadline)
        while (left := await pool.zcard(default_queue_name)) > 0:
            check_alive(worker, log)
            if time.monotonic() > deadline:
                raise RunFailed(f"arq W2: deadline passed with {left} jobs left")
            await asyncio.sleep(POLL_S)
        end = time.perf_counter()
        found = 0
        for i in range(0, len(ids), 1000):
            found += await pool.exists(*(result_key_prefix + j for j in ids[i:i + 1000]))
        if found != jobs:
            raise RunFailed(f"arq W2: {found} result keys, expected {jobs}")
    finally:
        await pool.aclose()
        stop(worker)
    return jobs / (end - start)


def arq_run(system: str, jobs: int, concurrency: int, deadline: float, max_jobs: int = ARQ_MAX_JOBS,
            w2_only: bool = False) -> Result:
    w1 = (math.nan,) * 3
    if not w2_only:
        server = PrivateRedis(REDIS_MODES[system])
        try:
            w1 = asyncio.run(arq_w1(server.port, jobs, concurrency, deadline))
        finally:
            server.close()
    server = PrivateRedis(REDIS_MODES[system])
    try:
        w2 = asyncio.run(arq_w2(server.port, jobs, concurrency, deadline, max_jobs, server.dir / "worker.log"))
    finally:
        server.close()
    return Result(*w1, w2)


# ---------------------------------------------------------------- reporting

def header(args: argparse.Namespace) -> None:
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()
    h = peer_tasks.make_huey(str(tempdir("peers-probe-") / "huey.db"))
    sync = h.storage.conn.execute("pragma synchronous").fetchone()[0]
    journal = h.storage.conn.execute("pragma journal_mode").fetchone()[0]
    h.storage.close()
    print(f"versions: huey {huey.__version__}, arq {arq.VERSION}, redis-server "
          f"{next(w[2:] for w in redis_version if w.startswith('v='))}, redis-py {redis.__version__}, "
          f"SQLite {sqlite3.sqlite_version}, Python {platform.python_version()}")
    print(f"load: {args.jobs} jobs, {args.concurrency} producers, {args.runs} runs, deadline {args.deadline:.0f} s"
          f"/run; producers in this process on core {LOAD_CORE}, services/consumers on core {SERVICE_CORE}")
    print(f"huey: SqliteHuey(journal_mode='wal', fsync=True, store_none=True) -> journal_mode={journal}, "
          f"synchronous={sync} (2 = FULL); W2 consumer: "
          f"{' '.join(['huey_consumer', *huey_consumer(args.huey_workers)[1:]])}")
    for name, mode in REDIS_MODES.items():
        server = PrivateRedis(mode)  # read the settings back from a live server
        server.close()
        print(f"{name}: redis-server {' '.join(m or repr(m) for m in mode)} -> CONFIG {server.config}; W2 Worker("
              f"max_jobs={ARQ_MAX_JOBS}, poll_delay=0.5, keep_result=3600) + one W2 run at max_jobs=10")
    print(flush=True)


def show(label: str, r: Result) -> None:
    w1 = "" if math.isnan(r.w1_per_s) else \
        f"W1 {r.w1_per_s:8.0f} submits/s  p50 {r.w1_p50_ms:7.2f} ms  p99 {r.w1_p99_ms:7.2f} ms   "
    print(f"  {label:<34} {w1}W2 {r.w2_per_s:8.0f} jobs/s", flush=True)


def median(rs: list[Result]) -> Result:
    return Result(*(statistics.median(getattr(r, f) for r in rs) for f in Result.__dataclass_fields__))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--systems", default="huey,arq,arq-memory")
    p.add_argument("--deadline", type=float, default=300.0, help="seconds per system per run")
    p.add_argument("--json", type=Path, help="write the medians here")
    p.add_argument("--huey-workers", type=int, default=HUEY_WORKERS, help="huey_consumer -w (worker threads)")
    args = p.parse_args()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if unknown := set(systems) - {"huey", *REDIS_MODES}:
        p.error(f"unknown systems: {', '.join(sorted(unknown))}")

    os.sched_setaffinity(0, {LOAD_CORE})  # before any thread exists, so all producers inherit it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ok: dict[str, list[Result]] = {s: [] for s in systems}
    try:
        header(args)
        for run in range(1, args.runs + 1):
            print(f"run {run}/{args.runs}")
            for system in systems:
                deadline = time.monotonic() + args.deadline
                try:
                    r = huey_run(args.jobs, args.concurrency, deadline, args.huey_workers) if system == "huey" else \
                        arq_run(system, args.jobs, args.concurrency, deadline)
                except Exception as e:
                    print(f"  {system:<34} FAILED: {type(e).__name__}: {e}", flush=True)
                    continue
                ok[system].append(r)
                show(system, r)
        extra: dict[str, Result] = {}
        for system in (s for s in systems if s in REDIS_MODES):
            try:
                extra[system] = arq_run(system, args.jobs, args.concurrency, time.monotonic() + args.deadline,
                                        max_jobs=10, w2_only=True)
            except Exception as e:
                print(f"  {system + ' max_jobs=10':<34} FAILED: {type(e).__name__}: {e}", flush=True)
    finally:
        cleanup()

    print(f"\nmedians of successful runs ({args.jobs} jobs, {args.concurrency} producers)")
    medians: dict[str, dict[str, float]] = {}
    for system in systems:
        if not ok[system]:
            print(f"  {system:<34} no successful run")
            continue
        m = median(ok[system])
        medians[system] = {k: round(v, 2) for k, v in asdict(m).items()}
        show(f"{system} ({len(ok[system])}/{args.runs} ok)", m)
    for system, r in extra.items():
        show(f"{system} W2 max_jobs=10 (1 run)", r)
    if args.json:
        args.json.write_text(json.dumps(medians, indent=2) + "\n")
        print(f"wrote {args.json}")
    if any(not ok[s] for s in systems):
        sys.exit(1)


if __name__ == "__main__":
    main()
