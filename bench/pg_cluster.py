"""The PostgreSQL benchmarks' plumbing: a throwaway cluster, `asyncjobs serve` nodes on it, RSS and CPU.

``Cluster`` runs initdb and pg_ctl from the installed server binaries (PATH, else the newest
/usr/lib/postgresql/*/bin) in a temp folder, on 127.0.0.1 and a free port, as the ``postgres`` user when
run as root (PostgreSQL refuses root), and removes it all on exit. fsync is on (PostgreSQL's default,
with synchronous_commit on: a commit is on disk when it returns) unless ``fsync=False``.
Never the shared server on 5432: each run has its own cluster.

``Node`` is one `asyncjobs serve --db postgresql://... --port P [--processes N]` (the built-in tasks plus
``bench_tasks.py``), started from this checkout (PYTHONPATH), its files folder shared with the other nodes.
"""

from __future__ import annotations

import asyncio
import glob
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from server import serve_env

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bins() -> tuple[str, str, str]:
    """(initdb, pg_ctl, postgres) from PATH, else from the newest /usr/lib/postgresql/*/bin."""
    names = ("initdb", "pg_ctl", "postgres")
    found = [shutil.which(n) for n in names]
    if all(found):
        return found[0], found[1], found[2]  # type: ignore[return-value]

    def version(folder: str) -> float:
        try:
            return float(folder.split("/")[-2])
        except ValueError:
            return 0.0

    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        paths = [os.path.join(folder, n) for n in names]
        if all(os.path.exists(p) for p in paths):
            return paths[0], paths[1], paths[2]
    sys.exit("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")


def as_postgres(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--", *argv]
    return ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(f"'{a}'" for a in argv)]


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n"
                           f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done


class Cluster:
    """A throwaway PostgreSQL cluster; ``with Cluster(fsync=True) as pg: pg.create_database("x")``."""

    def __init__(self, *, fsync: bool = True, max_connections: int = 300) -> None:
        self.fsync = fsync
        self.max_connections = max_connections
        self.initdb, self.pg_ctl, self.postgres = pg_bins()
        self.version = subprocess.run([self.postgres, "--version"], capture_output=True, text=True).stdout.strip()

    def __enter__(self) -> Cluster:
        if os.geteuid() == 0 and subprocess.run(["id", "postgres"], capture_output=True).returncode != 0:
            _run(["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", "postgres"])
        self.base = tempfile.mkdtemp(prefix="asyncjobs-bench-pg-")
        os.chmod(self.base, 0o755)
        self.data = os.path.join(self.base, "data")
        os.mkdir(self.data, 0o700)
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres", "postgres")
            shutil.chown(self.data, "postgres", "postgres")
        self.port = free_port()
        try:
            _run(as_postgres([self.initdb, "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                              "--no-locale", "--no-sync"]), cwd=self.base)
            options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.base}"
                       f" -c max_connections={self.max_connections} -c fsync={'on' if self.fsync else 'off'}")
            _run(as_postgres([self.pg_ctl, "-D", self.data, "-o", options, "-l", os.path.join(self.base, "log"),
                              "-w", "-t", "60", "start"]), cwd=self.base)
        except BaseException:
            shutil.rmtree(self.base, ignore_errors=True)
            raise
        self.admin_url = self.url("postgres")
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            self.pid = int(f.readline())
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(as_postgres([self.pg_ctl, "-D", self.data, "-m", "fast", "-t", "30", "stop"]),
                       capture_output=True, cwd=self.base)
        shutil.rmtree(self.base, ignore_errors=True)

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str, database: str = "postgres") -> list:
        return asyncio.run(self._sql(statement, database))

    async def _sql(self, statement: str, database: str) -> list:
        import asyncpg

        conn = await asyncpg.connect(self.url(database))
        try:
            return await conn.fetch(statement)
        finally:
            await conn.close()

    def create_database(self, name: str) -> str:
        """A fresh empty database (dropped first if it exists); its URL."""
        self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.sql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def checkpoint(self) -> None:
        """Flush what earlier runs left dirty, so one run's writes do not land in the next one's time."""
        self.sql("CHECKPOINT")

    def describe(self) -> str:
        return (f"{self.version}, throwaway cluster on 127.0.0.1:{self.port}, fsync={'on' if self.fsync else 'off'},"
                " synchronous_commit=on, other settings default")


def proc_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def python_tree(pid: int) -> list[int]:
    """The process tree of ``pid`` without non-Python helpers (e.g. taskset)."""
    out = []
    for p in proc_tree(pid):
        try:
            exe = os.readlink(f"/proc/{p}/exe")
        except OSError:
            continue
        if "python" in os.path.basename(exe):
            out.append(p)
    return out


def process_rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB of the one process ``pid`` (0, 0 if it is gone)."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB, summed over the Python processes of ``pid``'s tree."""
    per_process = [process_rss_kib(p) for p in python_tree(pid)]
    return sum(r for r, _ in per_process), sum(h for _, h in per_process)


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of ``pid``'s tree, with its reaped children's."""
    ticks = 0
    for p in proc_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        ticks += sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def _busy_s() -> float:
    with open("/proc/stat") as f:  # the machine: user nice system idle iowait irq softirq steal ...
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def wait_quiet(max_s: float, busy_cores: float = 0.15) -> str:
    """Wait (at most ``max_s``) until the machine is quiet: under ``busy_cores`` busy over a second (other
    engineers' tests share it). Returns a note for the output when it never was."""
    deadline = time.monotonic() + max_s
    while True:
        b0, t0 = _busy_s(), time.monotonic()
        time.sleep(1.0)
        load = (_busy_s() - b0) / (time.monotonic() - t0)
        if load < busy_cores:
            return ""
        if time.monotonic() > deadline:
            return f"(the machine was not quiet: {load:.2f} cores busy before this run)"


class CpuMeter:
    """CPU seconds spent between enter and exit by named process trees and by this process (+ its children)."""

    def __init__(self, trees: dict[str, object]) -> None:
        self.trees = trees  # name -> callable returning the root pids (read at enter and at exit)

    def _read(self) -> dict[str, float]:
        out = {name: sum(cpu_s(p) for p in roots()) for name, roots in self.trees.items()}
        t = os.times()
        out["load generator"] = t.user + t.system + t.children_user + t.children_system
        out[" busy"] = _busy_s()
        return out

    def __enter__(self) -> CpuMeter:
        self.t0 = time.perf_counter()
        self.start = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._read()
        self.wall = time.perf_counter() - self.t0
        self.used = {k: end[k] - self.start.get(k, 0.0) for k in end}

    def describe(self) -> str:
        """The named trees' CPU seconds, everything else on the machine ("other"), and idle."""
        mine = {k: v for k, v in self.used.items() if k != " busy"}
        other = max(0.0, self.used[" busy"] - sum(mine.values()))
        idle = max(0.0, self.wall * (os.cpu_count() or 1) - self.used[" busy"])
        used = ", ".join(f"{k} {v:.1f} s" for k, v in mine.items())
        return f"{used}, other {other:.1f} s, idle {idle:.1f} s (of {self.wall:.1f} s x {os.cpu_count()} cores)"


class RssSampler:
    """Samples the summed VmRSS of the Python processes of some process trees every 100 ms in a thread:
    idle (the first sample), peak, last, and the last sample per process."""

    def __init__(self, pids_of) -> None:
        self.pids_of = pids_of
        self.samples: list[int] = []
        self.split: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            split = [process_rss_kib(p)[0] for root in self.pids_of() for p in python_tree(root)]
            if sum(split):
                self.samples.append(sum(split))
                self.split = split
            self._stop.wait(0.1)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def figures(self) -> dict:
        if not self.samples:
            return {"rss_idle_mib": float("nan"), "rss_peak_mib": float("nan"), "rss_end_mib": float("nan")}
        return {"rss_idle_mib": self.samples[0] / 1024, "rss_peak_mib": max(self.samples) / 1024,
                "rss_end_mib": self.samples[-1] / 1024,
                "rss_split": " + ".join(f"{kib / 1024:.0f}" for kib in self.split) + " MiB"}


class Node:
    """One `asyncjobs serve` on a PostgreSQL database (``processes`` > 1: that many processes on one port)."""

    def __init__(self, db_url: str, *, files_dir: Path, workers: int = 8, processes: int = 1, max_wait: int = 600,
                 loop: str = "asyncio", extra_config: str = "", name: str = "node",
                 modules: tuple[str, ...] = ("asyncjobs.builtin", "bench_tasks")) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"asyncjobs-bench-{name}-"))
        self.processes = processes
        self.port = free_port()
        self.host = "127.0.0.1"
        self.url = f"http://127.0.0.1:{self.port}"
        config = self.dir / "config.toml"
        module_list = ", ".join(f'"{m}"' for m in modules)
        config.write_text(
            f'[server]\nmax_wait = {max_wait}\nloop = "{loop}"\n'
            f'[queue]\nworkers = {workers}\nmax_queued = 10000000\n'
            f'[files]\ndir = "{files_dir}"\n'
            f'[tasks]\nmodules = [{module_list}]\n{extra_config}'
        )
        self.log = self.dir / "server.log"
        env = serve_env()
        argv = [sys.executable, "-m", "asyncjobs", "serve", "--config", str(config), "--host", "127.0.0.1",
                "--port", str(self.port), "--db", db_url]
        if processes != 1:
            argv += ["--processes", str(processes)]
        t0 = time.monotonic()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
                                         start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.monotonic() - t0

    def _healthz(self) -> dict | None:
        import json

        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as r:
                return json.loads(r.read())
        except Exception:
            return None

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"asyncjobs serve exited ({self.proc.returncode}):\n"
                                   + self.log.read_text(errors="replace")[-3000:])
            if self._healthz() is not None:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("asyncjobs serve did not answer /healthz:\n"
                               + self.log.read_text(errors="replace")[-3000:])
        if self.processes > 1:  # every process up: /healthz names its node, distinct per process
            seen: set[str] = set()
            until = time.monotonic() + 20
            while time.monotonic() < until and len(seen) < self.processes:
                body = self._healthz()
                if body and body.get("node"):
                    seen.add(body["node"])
                else:
                    time.sleep(0.05)
            self.nodes_seen = len(seen)
            if len(seen) < self.processes:
                print(f"  (note: /healthz named {len(seen)} distinct node(s) of {self.processes} processes)")

    def rss(self) -> tuple[int, int]:
        return rss_kib(self.proc.pid)

    def pids(self) -> list[int]:
        return python_tree(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def source_digest() -> str:
    """A short SHA-256 of this checkout's asyncjobs/**/*.py: which code was measured, without asking git."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((ROOT / "asyncjobs").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def machine() -> str:
    import aiohttp

    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "?"
    return (f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}, aiohttp {aiohttp.__version__}, "
            f"{platform.system()} {platform.release()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())},"
            f" asyncjobs sources {source_digest()}")
