"""Start and measure an `asyncjobs serve` process for the benchmarks (127.0.0.1 only)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


def serve_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a benchmarked `asyncjobs serve`: no ASYNCJOBS_ overrides from this shell, this
    checkout and bench/ (for bench_tasks) on the path, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCJOBS_")}
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH), str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra or {})
    return env


def source_env(checkout: Path) -> dict[str, str]:
    """``Server``'s ``env`` for running the asyncjobs package of another checkout (an older commit's worktree
    or export), with bench/ still on the path for bench_tasks."""
    return {"PYTHONPATH": os.pathsep.join([str(checkout.resolve()), str(BENCH)])}


class Server:
    def __init__(self, *, workers: int = 8, synchronous: str = "full", max_wait: int = 600, loop: str = "asyncio",
                 extra_config: str = "", db: Path | str | None = None, env: dict[str, str] | None = None,
                 wrap: list[str] | None = None) -> None:
        """``wrap``: a command the server runs under (e.g. valgrind's), its own process (the same pid)."""
        self.dir = Path(tempfile.mkdtemp(prefix="asyncjobs-bench-"))
        self.db = db or self.dir / "bench.db"
        config = self.dir / "config.toml"
        config.write_text(
            f'[server]\nmax_wait = {max_wait}\nloop = "{loop}"\n[store]\nsynchronous = "{synchronous}"\n'
            f'[queue]\nworkers = {workers}\nmax_queued = 10000000\n'
            f'[tasks]\nmodules = ["asyncjobs.builtin", "bench_tasks"]\n{extra_config}'
        )
        self.log = self.dir / "server.log"
        full_env = serve_env(env)
        self.started_at = time.monotonic()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [*(wrap or ()), sys.executable, "-m", "asyncjobs", "serve", "--config", str(config), "--port", "0",
                 "--db", str(self.db)],
                env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
            )
        deadline = time.monotonic() + (600 if wrap else 120)
        while time.monotonic() < deadline:
            match = re.search(r"listening on (http://[\d.]+:\d+)", self.log.read_text(errors="replace"))
            if match:
                self.url = match.group(1)
                self.ready_s = time.monotonic() - self.started_at
                host, port = self.url.removeprefix("http://").split(":")
                self.host, self.port = host, int(port)
                return
            if self.proc.poll() is not None:
                raise RuntimeError(self.log.read_text())
            time.sleep(0.01)
        raise RuntimeError("server did not start")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def scrape(server: Server, *samples: str) -> list[float]:
    """The values of these samples (a metric's name with its labels, as /metrics writes them) now; 0.0 for
    one not written."""
    text = urllib.request.urlopen(f"{server.url}/metrics", timeout=30).read().decode()
    values = dict.fromkeys(samples, 0.0)
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in values:
            values[name] = float(value)
    return list(values.values())


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def machine() -> str:
    import platform
    import sqlite3

    cores = os.cpu_count()
    return (f"{cores} cores, Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
            f"{platform.system()} {platform.release()}")


def fill_store(db: Path, n: int, *, task: str = "noop", status: str = "queued", batch: int = 50_000) -> list[str]:
    """Create ``db`` with the server's own migrations, then insert ``n`` jobs directly (fast, not through HTTP).

    Rows are what asyncjobs itself writes for a `noop` job that is queued (version 1) or succeeded
    (version 3, result ``null``); created over the last hour, expiring a day from now. Returns the ids.
    """
    import secrets
    import sqlite3

    if not db.exists():
        import shutil
        server = Server(workers=1, db=db)  # runs the migrations, then exits cleanly
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)
    ids = [secrets.token_urlsafe(16) for _ in range(n)]
    now = time.time()
    expires = now + 86400
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA synchronous = OFF")
    columns = ("id, task, params, status, priority, created_at, started_at, finished_at, expires_at, run_at,"
               " attempts, max_attempts, version, progress, result, result_type, error, owner")
    sql = f"INSERT INTO jobs ({columns}) VALUES ({', '.join('?' * 18)})"
    for start in range(0, n, batch):
        rows = []
        for i in range(start, min(n, start + batch)):
            created = now - 3600 + 3600 * i / n
            if status == "queued":
                rows.append((ids[i], task, b"{}", "queued", 0, created, None, None, expires, created,
                             0, 1, 1, None, None, None, None, ""))
            else:
                rows.append((ids[i], task, b"{}", "succeeded", 0, created, created + 0.001, created + 0.002,
                             expires, created, 1, 1, 3, None, b"null", None, None, ""))
        with conn:
            conn.executemany(sql, rows)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return ids
