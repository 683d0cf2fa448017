"""W1 submit: `POST /jobs` for `noop` under wrk, against the bare ceiling and asyncjobs.

    python bench/w1_submit.py [--duration 10] [--connections 64] [--profile OUT]

wrk (Debian's package) runs one thread, 64 connections, pinned to core 1
with taskset; each server is pinned to core 0 (all its threads). Three runs of
the same load in one go: the bare aiohttp app (`bare.py`, the ceiling), then
asyncjobs with `store.synchronous = "full"`, then `"normal"`. Prints
requests/s, p50, p99, non-2xx answers and the ratios to the ceiling.

With `--profile OUT`, the asyncjobs "full" run is sampled by py-spy (pinned
to core 1 with wrk) and its flat profile written to OUT (a separate run:
the profiled figures are not the measured ones).
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from server import BENCH, Server, machine, stop_process

SERVER_CORE, LOAD_CORE = "0", "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin(pid: int, core: str) -> bool:
    """Pin every thread of ``pid`` to ``core``; False if taskset refused."""
    return subprocess.run(["taskset", "-a", "-p", "-c", core, str(pid)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def to_ms(value: str) -> float:
    num, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()
    return float(num) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(url: str, duration: int, connections: int) -> dict:
    cmd = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency",
           "-s", str(BENCH / "submit.lua"), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    pct = dict(re.findall(r"^\s+(\d+)%\s+(\S+)$", out, re.M))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)$", out, re.M)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "p50": to_ms(pct["50"]), "p90": to_ms(pct["90"]), "p99": to_ms(pct["99"]),
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "errors": errors.group(1) if errors else "",
        "raw": out,
    }


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("bare app exited")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("bare app did not start")


def bare_run(duration: int, connections: int, loop: str = "asyncio") -> tuple[dict, bool]:
    port = free_port()
    proc = subprocess.Popen(["taskset", "-c", SERVER_CORE, sys.executable, str(BENCH / "bare.py"),
                             "--port", str(port), "--loop", loop], stdout=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        pinned = pin(proc.pid, SERVER_CORE)
        return run_wrk(f"http://127.0.0.1:{port}/jobs", duration, connections), pinned
    finally:
        stop_process(proc)


def asyncjobs_run(synchronous: str, duration: int, connections: int, profile: Path | None = None,
                  loop: str = "asyncio") -> tuple[dict, bool]:
    with Server(synchronous=synchronous, loop=loop) as server:
        try:
            pinned = pin(server.proc.pid, SERVER_CORE)
            spy = None
            if profile is not None:
                raw = server.dir / "profile.raw"
                spy = subprocess.Popen(["taskset", "-c", LOAD_CORE, "py-spy", "record", "--format", "raw", "--threads",
                                        "-r", "100", "-d", str(duration + 2), "-o", str(raw),
                                        "-p", str(server.proc.pid)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1)
            result = run_wrk(f"{server.url}/jobs", duration, connections)
            if spy is not None:
                spy.wait(duration + 60)
                summarise_profile(raw, profile)
            return result, pinned
        finally:
            server.stop()
            shutil.rmtree(server.dir, ignore_errors=True)


def _flat(stacks: list[tuple[list[str], int]]) -> tuple[Counter, Counter]:
    """Self and inclusive samples per frame of collapsed stacks."""
    self_t: Counter = Counter()
    incl: Counter = Counter()
    for frames, n in stacks:
        self_t[frames[-1] if frames else "(no Python frame)"] += n
        for frame in set(frames):
            incl[frame] += n
    return self_t, incl


def summarise_profile(raw: Path, out: Path, top: int = 40,
                      title: str = "asyncjobs serve under W1 load (synchronous=full)") -> None:
    """py-spy's raw format is collapsed stacks ("f1;f2;f3 count"): flat self and inclusive time; recorded
    with ``--threads`` (the first frame names the thread), each thread apart as well."""
    stacks = [(stack.split(";"), int(count)) for stack, _, count in
              (line.rpartition(" ") for line in raw.read_text().splitlines()) if stack]
    total = sum(n for _, n in stacks)
    self_t, incl = _flat(stacks)
    threads: Counter = Counter()
    for frames, n in stacks:
        threads[frames[0]] += n
    lines = [f"py-spy record --threads, {total} samples, {title}", "",
             "## samples per thread"]
    lines += [f"{n:6d}  {t}" for t, n in threads.most_common()]
    lines += ["", "## self (top)"]
    lines += [f"{n / total:6.1%}  {f}" for f, n in self_t.most_common(top)]
    lines += ["", "## inclusive (top)"]
    lines += [f"{n / total:6.1%}  {f}" for f, n in incl.most_common(top)]
    if len(threads) > 1:  # each thread apart, by function (line numbers merged), as shares of its own samples
        for thread, samples in threads.most_common():
            t_self, t_incl = _flat([([re.sub(r":\d+\)$", ")", f) for f in frames[1:]], n)
                                    for frames, n in stacks if frames[0] == thread])
            lines += ["", f"## {thread}: {samples} samples; self (top)"]
            lines += [f"{n / samples:6.1%}  {f}" for f, n in t_self.most_common(top // 2)]
            lines += ["", f"## {thread}: inclusive (top)"]
            lines += [f"{n / samples:6.1%}  {f}" for f, n in t_incl.most_common(top)]
    out.write_text("\n".join(lines) + "\n")
    shutil.copy(raw, out.with_suffix(".collapsed"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"],
                        help="event loop of both servers (asyncjobs: server.loop)")
    parser.add_argument("--profile", type=Path, help="profile a separate 'full' run with py-spy into this file")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    print(machine())
    print(f"wrk -t1 -c{args.connections} -d{args.duration}s --latency (taskset -c {LOAD_CORE}), "
          f"servers on core {SERVER_CORE}, {args.loop} event loop")
    if args.profile:
        asyncjobs_run("full", args.duration, args.connections, args.profile, loop=args.loop)
        print(f"profile written to {args.profile} (+ .collapsed)")
        return
    results = {}
    for name, fn in (("bare", lambda: bare_run(args.duration, args.connections, args.loop)),
                     ("full", lambda: asyncjobs_run("full", args.duration, args.connections, loop=args.loop)),
                     ("normal", lambda: asyncjobs_run("normal", args.duration, args.connections, loop=args.loop))):
        results[name], pinned = fn()
        if not pinned:
            print(f"  ({name}: taskset on the server failed, not pinned)")
    ceiling = results["bare"]
    print(f"{'server':<10}{'req/s':>10}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'non2xx':>8}"
          f"{'rps ratio':>11}{'p99 ratio':>11}")
    for name, r in results.items():
        print(f"{name:<10}{r['rps']:>10.0f}{r['p50']:>9.2f}{r['p90']:>9.2f}{r['p99']:>9.2f}{r['non2xx']:>8}"
              f"{r['rps'] / ceiling['rps']:>11.2f}{r['p99'] / ceiling['p99']:>11.2f}"
              + (f"  socket errors: {r['errors']}" if r["errors"] else ""))
    for name, goal in (("full", 0.70), ("normal", 0.80)):
        r = results[name]
        rps_ok = r["rps"] >= goal * ceiling["rps"]
        p99_ok = r["p99"] <= 2 * ceiling["p99"]
        print(f"goal {name}: req/s >= {goal:.0%} of ceiling: {'met' if rps_ok else 'NOT met'}"
              + (f"; p99 <= 2x ceiling: {'met' if p99_ok else 'NOT met'}" if name == "full" else ""))


if __name__ == "__main__":
    main()
