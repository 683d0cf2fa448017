"""Files: upload and download throughput (MiB/s) and server memory, asyncjobs against a bare aiohttp ceiling.

    python bench/files.py [--size-mib 1024] [--runs 3] [--warmup 1] [--profile DIR]

One test file of N MiB (random bytes) is written to a temp folder on the same
filesystem as the servers' temp stores. Each server is pinned to core 0 (all
its threads, with taskset); this process, the client, runs on core 1. The
client is lean and never holds a file in memory: blocking sockets, one fresh
connection per transfer, the upload body sent from the file with
`socket.sendfile` (zero copy), the download received with `recv_into` a 4 MiB
buffer and dropped (as if to /dev/null). Timed from the first byte sent to the
last byte of the answer (the `202` of an upload, the end of the body of a
download).

For each server, `--runs` runs (median reported) of:
- upload raw: `PUT /blobs/{name}` with Content-Length, the body is the file
  (the `blob` task of bench_tasks.py; on the ceiling the same route);
- upload multipart: `POST /jobs`, a `job` JSON part then the file part;
- download: asyncjobs `GET /jobs/{id}/result` of a `bytes` job of the same
  size (made once, waited for until it succeeded); the ceiling
  `GET /download`, the test file by `web.FileResponse`.
The ceiling is bench/bare_files.py (the same upload path without a job:
256 KiB reads, write + SHA-256 in 1 MiB batches in a thread, fsync, rename).

Before each timed transfer the file it reads (the test file, or the file
result) is read through once so that the page cache holds it (this machine
pages cold files out), dirty pages are written out (sync), and the script
waits, at most 120 s, for a quiet second (the machine less than 10% of a core
busy besides the servers). One untimed warm-up round per kind (`--warmup`)
comes first; the two servers' runs are interleaved, the order alternating.

The server's VmRSS (/proc/<pid>/status) is sampled every 50 ms during each
transfer: idle (just before its first transfer of the kind), peak (over all of
them), peak - idle. Per transfer (medians) the CPU time of the server's
event-loop thread (user, system) and of its other threads, its minor page
faults (/proc/<pid>/stat, /proc/<pid>/task/*/stat), and the CPU the rest of
the machine used meanwhile (/proc/stat less the server and the client).
With `--profile DIR`, after the measured runs, one more transfer of each kind
on each server is sampled by py-spy (pip install py-spy; ptrace rights
needed) into DIR (flat profiles; not the measured figures).
Everything written (test file, uploads, stores) is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from server import BENCH, Server, machine, stop_process
from w1_submit import free_port, pin, summarise_profile, wait_port

SERVER_CORE, CLIENT_CORE = "0", "1"
MIB = 1 << 20
RECV_BYTES = 4 * MIB
IO_TIMEOUT = 300.0  # one socket operation (send, receive) at most
JOB_TIMEOUT = 1800.0  # a job (the `bytes` generation of the download file) at most
SAMPLE_S = 0.05
QUIET_WAIT_S = 120  # at most, before each timed transfer, for the machine to be quiet
TICK = os.sysconf("SC_CLK_TCK")
TERMINAL = {"succeeded", "failed", "canceled"}


# -- server-side observation ---------------------------------------------------------

def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _stat(path: Path) -> list[str]:
    return path.read_text().rsplit(")", 1)[1].split()  # fields from the 3rd (state) on


def cpu_counts(pid: int) -> dict:
    """The event-loop (main) thread's user and system CPU seconds, the other threads' CPU seconds
    (threads alive now), and the process's minor page faults (all threads, dead ones included)."""
    main = _stat(Path(f"/proc/{pid}/task/{pid}/stat"))
    others = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        if task.name == str(pid):
            continue
        try:
            fields = _stat(task / "stat")
        except (FileNotFoundError, ProcessLookupError):
            continue
        others += (int(fields[11]) + int(fields[12])) / TICK
    return {"loop_user": int(main[11]) / TICK, "loop_sys": int(main[12]) / TICK, "other": others,
            "minflt": int(_stat(Path(f"/proc/{pid}/stat"))[7])}


class Sampler(threading.Thread):
    """VmRSS of ``pid`` every 50 ms while the block runs, its peak; CPU and page faults over the block."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, rss_kib(self.pid))
            self.samples += 1
            self._done.wait(SAMPLE_S)

    def __enter__(self) -> Sampler:
        self.before = cpu_counts(self.pid)
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self.join(5)
        self.peak = max(self.peak, rss_kib(self.pid))
        after = cpu_counts(self.pid)
        self.cpu = {k: after[k] - self.before[k] for k in after}


# -- the client: blocking sockets, files never in memory ------------------------------

def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes = b"", size: int = 0) -> None:
        self.status, self.headers, self.body, self.size = status, headers, body, size
        self.tail_s = 0.0  # an upload: from its last byte sent to the end of the answer

    def json(self) -> dict:
        return json.loads(self.body)


def read_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The status line and headers; returns what came after them too."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before the answer's headers ({data[:200]!r})")
        data += chunk
        if len(data) > 1 << 20:
            raise ConnectionError("answer headers too large")
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


def read_small(sock: socket.socket) -> Answer:
    status, headers, body = read_head(sock)
    length = int(headers.get("content-length", "-1"))
    while length < 0 or len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            if length < 0:
                break
            raise ConnectionError("connection closed inside the answer's body")
        body += chunk
        if len(body) > 16 * MIB:
            raise ConnectionError("a small answer is not small")
    return Answer(status, headers, body)


def send_body(sock: socket.socket, head: bytes, src: Path, size: int, tail: bytes = b"") -> None:
    """``head``, then the file (sendfile), then ``tail``; an early answer from the server is read after."""
    try:
        sock.sendall(head)
        with open(src, "rb") as file:
            sent = sock.sendfile(file, 0, size)
        if sent != size:
            raise RuntimeError(f"sent {sent} of {size} bytes")
        if tail:
            sock.sendall(tail)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered (and closed) early: read_small shows why


def upload_raw(port: int, src: Path, size: int) -> tuple[float, Answer]:
    head = (f"PUT /blobs/bench.bin HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n"
            f"Connection: close\r\n\r\n").encode()
    with connect(port) as sock:
        t0 = time.perf_counter()
        send_body(sock, head, src, size)
        sent = time.perf_counter()
        answer = read_small(sock)
        done = time.perf_counter()
        answer.tail_s = done - sent
        return done - t0, answer


def upload_multipart(port: int, src: Path, size: int) -> tuple[float, Answer]:
    boundary = f"asyncjobs-bench-{secrets.token_hex(8)}"
    job = json.dumps({"task": "blob", "params": {"name": "bench.bin"}})
    pre = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"job\"\r\n"
           f"Content-Type: application/json\r\n\r\n{job}\r\n"
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"bench.bin\"\r\n"
           f"Content-Type: application/octet-stream\r\n\r\n").encode()
    post = f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(pre) + size + len(post)}\r\nConnection: close\r\n\r\n").encode()
    with connect(port) as sock:
        t0 = time.perf_counter()
        send_body(sock, head + pre, src, size, post)
        sent = time.perf_counter()
        answer = read_small(sock)
        done = time.perf_counter()
        answer.tail_s = done - sent
        return done - t0, answer


def download(port: int, path: str, prefix: bytes) -> tuple[float, Answer]:
    """GET ``path``; the body is received and dropped, its length checked, its first bytes compared."""
    buf = bytearray(RECV_BYTES)
    view = memoryview(buf)
    with connect(port) as sock:
        t0 = time.perf_counter()
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        status, headers, rest = read_head(sock)
        if status != 200:
            return time.perf_counter() - t0, Answer(status, headers, rest)
        length = int(headers["content-length"])
        first = bytes(rest[:len(prefix)])
        got = len(rest)
        while got < length:
            n = sock.recv_into(view, min(RECV_BYTES, length - got))
            if not n:
                raise ConnectionError(f"connection closed after {got} of {length} bytes")
            if len(first) < len(prefix):
                first += bytes(view[:min(n, len(prefix) - len(first))])
            got += n
        elapsed = time.perf_counter() - t0
    if got != length or first != prefix:
        raise RuntimeError(f"download: {got} of {length} bytes, first bytes {first[:8].hex()} != {prefix[:8].hex()}")
    return elapsed, Answer(status, headers, size=got)


def call(url: str, method: str = "GET", body: dict | None = None, timeout: float = 120) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return json.loads(answer.read())


def wait_terminal(base: str, job_id: str, timeout_s: float = JOB_TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = call(f"{base}/jobs/{job_id}?wait=30&redirect=false", timeout=60)
        if job["status"] in TERMINAL:
            return job
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} still {job['status']} after {timeout_s:g} s")


# -- measuring ----------------------------------------------------------------------

KINDS = ("upload raw", "upload multipart", "download")


@dataclass
class Target:
    """A server under test: how to run each kind of transfer on it, check the answer, and tidy up after."""

    name: str
    pid: int
    transfers: dict[str, Callable[[], tuple[float, Answer]]]
    checks: dict[str, Callable[[Answer], dict]]
    after: dict[str, Callable[[Answer], None]] = field(default_factory=dict)
    warm: dict[str, Path] = field(default_factory=dict)  # the file each kind reads, put in the page cache first


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine, all cores (/proc/stat: user, nice, system, irq, softirq, steal)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / TICK


def process_cpu(pid: int) -> float:
    fields = _stat(Path(f"/proc/{pid}/stat"))
    return (int(fields[11]) + int(fields[12])) / TICK


def warm(path: Path) -> None:
    """Read a file through, so that the page cache holds it (this machine pages out cold files)."""
    buf = bytearray(RECV_BYTES)
    with open(path, "rb", buffering=0) as file:
        while file.readinto(buf):
            pass


def settle(warm_path: Path | None, pids: list[int]) -> bool:
    """Before a timed transfer: its file read into the page cache, dirty pages written out, then up to
    QUIET_WAIT_S for a quiet second (the machine busy less than 10% of a core, the servers' own CPU
    aside). False if it never came."""
    if warm_path is not None:
        warm(warm_path)
    os.sync()
    deadline = time.monotonic() + QUIET_WAIT_S
    while True:
        t0, busy0, own0 = time.monotonic(), machine_busy(), sum(process_cpu(p) for p in pids)
        time.sleep(1.0)
        others = machine_busy() - busy0 - (sum(process_cpu(p) for p in pids) - own0)
        if others < 0.10 * (time.monotonic() - t0):
            return True
        if time.monotonic() > deadline:
            return False


def client_cpu() -> float:
    usage = os.times()
    return usage.user + usage.system


def run_kind(kind: str, targets: list[Target], runs: int, size: int, warmup: int = 1) -> dict[str, dict]:
    """``warmup`` untimed rounds, then ``runs`` rounds of one transfer on each target, interleaved (the
    order alternates per round) so that drift of the machine (disk, neighbours) falls on both alike.
    Median MiB/s (and the range); RSS idle just before the first transfer (warm-up included), peak over
    all of them; CPU and page faults per timed run (medians)."""
    records: dict[str, list[dict]] = {t.name: [] for t in targets}
    idle: dict[str, int] = {}
    peak: dict[str, int] = {t.name: 0 for t in targets}
    pids = [t.pid for t in targets]
    for i in range(-warmup, runs):
        for target in (targets if i % 2 == 0 else targets[::-1]):
            quiet = settle(target.warm.get(kind), pids)
            idle.setdefault(target.name, rss_kib(target.pid))
            busy0, client0 = machine_busy(), client_cpu()
            with Sampler(target.pid) as sampler:
                seconds, answer = target.transfers[kind]()
            cpu = sampler.cpu
            own = cpu["loop_user"] + cpu["loop_sys"] + cpu["other"] + client_cpu() - client0
            cpu["rest"] = max(0.0, machine_busy() - busy0 - own)
            extra = target.checks[kind](answer)
            if kind in target.after:
                target.after[kind](answer)
            peak[target.name] = max(peak[target.name], sampler.peak)
            if i >= 0:
                records[target.name].append({"seconds": seconds, **cpu, **extra})
            detail = "".join(f", {k} {v:.2f} s" for k, v in extra.items())
            print(f"  {target.name} {kind} {f'run {i + 1}' if i >= 0 else 'warm-up'}: "
                  f"{size / MIB / seconds:6.0f} MiB/s ({seconds:.2f} s), "
                  f"RSS peak {sampler.peak / 1024:.1f} MiB ({sampler.samples} samples), CPU loop thread "
                  f"{cpu['loop_user']:.2f} user + {cpu['loop_sys']:.2f} sys, other threads {cpu['other']:.2f},"
                  f" {cpu['minflt']} page faults, rest of the machine {cpu['rest']:.2f}{detail}"
                  + ("" if quiet else f" (the machine was not quiet for {QUIET_WAIT_S} s before it)"), flush=True)
    out = {}
    for name, recs in records.items():
        medians = {k: statistics.median(r[k] for r in recs) for k in recs[0]}
        out[name] = {**medians, "mibps": size / MIB / medians["seconds"], "idle": idle[name], "peak": peak[name],
                     "min": size / MIB / max(r["seconds"] for r in recs),
                     "max": size / MIB / min(r["seconds"] for r in recs)}
    return out


def expect_202(size: int, sha256: str, where: Callable[[dict], tuple[int, str]]) -> Callable[[Answer], dict]:
    def check(answer: Answer) -> dict:
        if answer.status != 202:
            raise RuntimeError(f"upload answered {answer.status}: {answer.body[:500]!r}")
        body = answer.json()
        got_size, got_sha = where(body)
        if (got_size, got_sha) != (size, sha256):
            raise RuntimeError(f"upload stored {got_size} bytes, sha256 {got_sha}; sent {size}, {sha256}")
        return {"tail_s": answer.tail_s, **{k: body[k] for k in ("write_s", "fsync_s") if k in body}}
    return check


def expect_200(answer: Answer) -> dict:
    if answer.status != 200:
        raise RuntimeError(f"download answered {answer.status}: {answer.body[:500]!r}")
    return {}


@contextlib.contextmanager
def bare_target(work: Path, src: Path, size: int, sha256: str) -> Iterator[Target]:
    """bare_files.py on core 0, serving ``src``; uploads land in ``work``/bare and are removed after each run."""
    port = free_port()
    updir = work / "bare"
    proc = subprocess.Popen(["taskset", "-c", SERVER_CORE, sys.executable, str(BENCH / "bare_files.py"),
                             "--port", str(port), "--dir", str(updir), "--serve", str(src)],
                            stdout=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        if not pin(proc.pid, SERVER_CORE):
            print("  (ceiling: taskset on the server failed, not pinned)")

        def clear(_: Answer) -> None:
            for path in (updir / "done").iterdir():
                path.unlink()

        check = expect_202(size, sha256, lambda b: (b["size"], b["sha256"]))
        with open(src, "rb") as file:
            prefix = file.read(32)
        yield Target(
            "ceiling", proc.pid,
            {"upload raw": lambda: upload_raw(port, src, size),
             "upload multipart": lambda: upload_multipart(port, src, size),
             "download": lambda: download(port, "/download", prefix)},
            {"upload raw": check, "upload multipart": check, "download": expect_200},
            {"upload raw": clear, "upload multipart": clear},
            {"upload raw": src, "upload multipart": src, "download": src})
    finally:
        stop_process(proc)


@contextlib.contextmanager
def asyncjobs_target(work: Path, src: Path, size: int, sha256: str) -> Iterator[Target]:
    """``asyncjobs serve`` on core 0 (a temp store, its files beside it) with a `bytes` result of ``size``
    made before anything is timed; each upload's `blob` job is waited for (its input is then removed)."""
    limit = max(size, 1 << 30)
    with Server(extra_config=f"[files]\nmax_upload_bytes = {limit}\n") as server:
        try:
            if os.stat(server.dir).st_dev != os.stat(work).st_dev:
                print(f"  (warning: {server.dir} and {work} are not on the same filesystem)")
            if not pin(server.proc.pid, SERVER_CORE):
                print("  (asyncjobs: taskset on the server failed, not pinned)")
            base, port = server.url, server.port

            def finished(answer: Answer) -> None:
                job = wait_terminal(base, answer.json()["id"], 120)
                if job["status"] != "succeeded" or job["result"]["size"] != size:
                    raise RuntimeError(f"blob job: {job}")

            t0 = time.monotonic()
            job = call(f"{base}/jobs", "POST", {"task": "bytes", "params": {"size": size, "seed": "bench"}})
            job = wait_terminal(base, job["id"])
            if job["status"] != "succeeded" or job["files"]["result"]["size"] != size:
                raise RuntimeError(f"bytes job: {job}")
            print(f"  (asyncjobs: the bytes job made the {size / MIB:.0f} MiB result in"
                  f" {time.monotonic() - t0:.1f} s)")
            path = f"/jobs/{job['id']}/result"
            prefix = hashlib.sha256(b"bench:0").digest()
            check = expect_202(size, sha256, lambda b: (b["files"]["inputs"]["file"]["size"],
                                                        b["files"]["inputs"]["file"]["sha256"]))
            yield Target(
                "asyncjobs", server.proc.pid,
                {"upload raw": lambda: upload_raw(port, src, size),
                 "upload multipart": lambda: upload_multipart(port, src, size),
                 "download": lambda: download(port, path, prefix)},
                {"upload raw": check, "upload multipart": check, "download": expect_200},
                {"upload raw": finished, "upload multipart": finished},
                {"upload raw": src, "upload multipart": src,
                 "download": server.db.with_name(f"{server.db.stem}.files") / "jobs" / job["id"] / "result"})
        finally:
            server.stop()
            shutil.rmtree(server.dir, ignore_errors=True)


def profiled(target: Target, kind: str, out: Path) -> None:
    """One transfer under py-spy (on the client's core): its flat profile into ``out``, and the
    event-loop thread's own profile (busy samples only) appended."""
    if shutil.which("py-spy") is None:
        sys.exit("py-spy not found: pip install py-spy")
    raw = out.with_suffix(".raw")
    settle(target.warm.get(kind), [target.pid])
    spy = subprocess.Popen(["taskset", "-c", CLIENT_CORE, "py-spy", "record", "--format", "raw", "--threads",
                            "--idle", "-r", "200", "-o", str(raw), "-p", str(target.pid)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        seconds, answer = target.transfers[kind]()
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(10)
    if kind in target.after:
        target.after[kind](answer)
    summarise_profile(raw, out)
    loop_self: Counter = Counter()
    loop_total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not stack or "MainThread" not in frames[0]:
            continue
        loop_total += int(count)
        loop_self[frames[-1]] += int(count)
    text = out.read_text().split("\n", 1)[1]
    lines = [(f"py-spy record --threads --idle, {target.name} serve during one {kind} ({seconds:.2f} s;"
              " idle samples included: a waiting thread shows where it waits)"), "",
             f"## the event-loop thread (MainThread), self, {loop_total} samples"]
    lines += [f"{n / loop_total:6.1%}  {f}" for f, n in loop_self.most_common(25)]
    out.write_text("\n".join(lines) + "\n\n" + text)
    shutil.copy(raw, out.with_suffix(".collapsed"))
    raw.unlink(missing_ok=True)
    print(f"  profile of {target.name} {kind} written to {out}")


# -- the test file and the disk ------------------------------------------------------

def make_source(path: Path, size: int) -> str:
    """``size`` random bytes, written 1 MiB at a time; returns their SHA-256."""
    digest = hashlib.sha256()
    with open(path, "wb") as file:
        left = size
        while left:
            block = os.urandom(min(MIB, left))
            digest.update(block)
            file.write(block)
            left -= len(block)
    return digest.hexdigest()


def disk_write_mibps(folder: Path, size: int) -> float:
    """The disk alone: ``size`` bytes written 1 MiB at a time from one buffer, then fsync."""
    path = folder / "disk.probe"
    block = os.urandom(MIB)
    settle(None, [])
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        left = size
        while left:
            left -= os.write(fd, block[:min(MIB, left)])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return size / MIB / seconds


def describe_machine(folder: Path) -> list[str]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")
    import aiohttp
    df = subprocess.run(["df", "-hT", str(folder)], capture_output=True, text=True, check=False).stdout
    df = df.strip().splitlines()[-1] if df.strip() else "?"
    return [machine(), f"CPU: {model}; aiohttp {aiohttp.__version__}", f"temp folder {folder}: {df}"]


# -- the report ------------------------------------------------------------------------

def report(results: dict[str, dict[str, dict]], size_mib: int, runs: int) -> None:
    """``results[kind][server]``: the figures of run_kind."""
    print()
    print(f"median of {runs} runs (after a warm-up), {size_mib} MiB per transfer, the two servers' runs"
          " interleaved; range: slowest-fastest run")
    print(f"{'transfer':<18}{'asyncjobs MiB/s':>16}{'ceiling MiB/s':>15}{'ratio':>7}  goal >= 0.80"
          f"{'asyncjobs range':>19}{'ceiling range':>15}")
    speed_ok = True
    for kind in KINDS:
        aj, bare = results[kind]["asyncjobs"], results[kind]["ceiling"]
        ratio = aj["mibps"] / bare["mibps"]
        speed_ok &= ratio >= 0.80
        print(f"{kind:<18}{aj['mibps']:>16.0f}{bare['mibps']:>15.0f}{ratio:>7.2f}  "
              f"{'met' if ratio >= 0.80 else 'NOT met':<12}{aj['min']:>12.0f}-{aj['max']:<6.0f}"
              f"{bare['min']:>8.0f}-{bare['max']:<6.0f}")
    print()
    print(f"{'server RSS, MiB':<30}{'idle':>7}{'peak':>7}{'peak-idle':>11}  goal < 64")
    memory_ok = True
    for server in ("asyncjobs", "ceiling"):
        for kind in KINDS:
            f = results[kind][server]
            growth = (f["peak"] - f["idle"]) / 1024
            memory_ok &= growth < 64
            print(f"{server + ' ' + kind:<30}{f['idle'] / 1024:>7.1f}{f['peak'] / 1024:>7.1f}{growth:>11.1f}  "
                  f"{'met' if growth < 64 else 'NOT met'}")
    print()
    print(f"{'server CPU per transfer, s':<30}{'loop user':>10}{'loop sys':>10}{'other thr':>10}{'pg faults':>11}"
          f"{'rest':>7}{'tail s':>8}{'write s':>9}{'fsync s':>9}")
    for server in ("asyncjobs", "ceiling"):
        for kind in KINDS:
            f = results[kind][server]
            cells = "".join(f"{f[k]:>{w}.2f}" if k in f else f"{'':>{w}}"
                            for k, w in (("tail_s", 8), ("write_s", 9), ("fsync_s", 9)))
            print(f"{server + ' ' + kind:<30}{f['loop_user']:>10.2f}{f['loop_sys']:>10.2f}{f['other']:>10.2f}"
                  f"{f['minflt']:>11.0f}{f['rest']:>7.2f}{cells}")
    print("(loop: the server's main thread; other thr: its other threads; rest: CPU of the rest of the machine"
          " meanwhile (kernel writeback, softirqs, neighbours); tail: from the client's last byte sent to the 202;"
          " write, fsync: the ceiling's own timers of write + SHA-256 and of fsync + rename)")
    print()
    print(f"goal: at least 80% of the ceiling both ways: {'met' if speed_ok else 'NOT met'}; "
          f"memory flat (peak - idle < 64 MiB): {'met' if memory_ok else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="size of each transfer (default 1024)")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median; default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before the runs (default 1)")
    parser.add_argument("--profile", type=Path, help="after the measured runs, py-spy one transfer of each kind"
                                                     " on each server into this folder")
    args = parser.parse_args()
    if not 1 <= args.size_mib <= 16384 or not 1 <= args.runs <= 20 or not 0 <= args.warmup <= 3:
        sys.exit("--size-mib 1..16384, --runs 1..20, --warmup 0..3")
    size = args.size_mib * MIB
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {int(CLIENT_CORE)})
    else:
        print("one core: client and servers share it")
    work = Path(tempfile.mkdtemp(prefix="asyncjobs-files-bench-"))
    try:
        for line in describe_machine(work):
            print(line)
        free = shutil.disk_usage(work).free
        if free < 4 * size + (1 << 30):
            sys.exit(f"not enough room in {work}: {free / MIB:.0f} MiB free, {4 * size / MIB:.0f} needed")
        src = work / "source.bin"
        sha256 = make_source(src, size)
        print(f"disk alone: {disk_write_mibps(work, size):.0f} MiB/s ({args.size_mib} MiB written + fsync)")
        print(f"client on core {CLIENT_CORE}, servers on core {SERVER_CORE}; {args.size_mib} MiB per transfer,"
              f" {args.runs} runs")
        with bare_target(work, src, size, sha256) as bare, asyncjobs_target(work, src, size, sha256) as aj:
            results = {kind: run_kind(kind, [bare, aj], args.runs, size, args.warmup) for kind in KINDS}
            if args.profile is not None:
                args.profile.mkdir(parents=True, exist_ok=True)
                for target in (aj, bare):
                    for kind in KINDS:
                        profiled(target, kind, args.profile / f"{target.name}_{kind.replace(' ', '_')}.txt")
        report(results, args.size_mib, args.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
