"""A throwaway PostgreSQL cluster for the tests: one per session, a fresh database per test.

``postgres_server`` (session scope) starts a cluster in a temp folder, on 127.0.0.1 and a free port, with
its unix socket in that folder, tuned for speed (no fsync), and stops it at the end of the session. With
TEST_ASYNCJOBS_POSTGRES_URL set (``postgresql://user@host:port/db``), that server is used instead.
``postgres_url`` (function scope) creates a database ``test_<random>`` on it, yields its URL and drops it.

The binaries are looked up on PATH, then in /usr/lib/postgresql/*/bin; if they are missing and this runs
as root, the Debian package is installed; otherwise the tests fail saying what to install (never skip).
As root, PostgreSQL refuses to run, so the cluster belongs to the ``postgres`` user.
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

ENV_URL = "TEST_ASYNCJOBS_POSTGRES_URL"
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class Server:
    url: str  # of the maintenance database, where test databases are created and dropped


def _find_bins() -> tuple[str, str] | None:
    """(initdb, pg_ctl): from PATH, else from the newest /usr/lib/postgresql/*/bin."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return initdb, pg_ctl
    def version(folder: str) -> float:
        try:
            return float(folder.split("/")[-2])
        except ValueError:
            return 0.0
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        initdb, pg_ctl = os.path.join(folder, "initdb"), os.path.join(folder, "pg_ctl")
        if os.path.exists(initdb) and os.path.exists(pg_ctl):
            return initdb, pg_ctl
    return None


def _bins() -> tuple[str, str]:
    found = _find_bins()
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True)
            done = subprocess.run(install, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                pytest.fail(f"apt-get install postgresql failed:\n{done.stderr[-2000:]}")
        found = _find_bins()
        if found:
            return found
    pytest.fail("the PostgreSQL tests need the PostgreSQL server binaries (initdb, pg_ctl): install them"
                " (Debian/Ubuntu: apt-get install postgresql), or set TEST_ASYNCJOBS_POSTGRES_URL to a server"
                " where this user may create databases")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(argv: list[str]) -> list[str]:
    """As root, run as the unprivileged ``postgres`` user (PostgreSQL refuses to run as root)."""
    if os.geteuid() != 0:
        return argv
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--", *argv]
    return ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(f"'{a}'" for a in argv)]


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done


def run_sync(coro: Any) -> Any:
    """Run a coroutine to completion on a loop of its own in another thread (fixtures here are sync, so
    they work from inside the tests' running loops too)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = asyncio.run(coro)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("result")


async def _connect(url: str) -> Any:
    import asyncpg

    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            conn = await asyncpg.connect(url, timeout=10)
            break
        except (OSError, asyncpg.CannotConnectNowError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    return conn


async def _create_database(url: str, name: str) -> None:
    import asyncpg

    conn = await _connect(url)
    try:
        try:  # copying the template's files: no WAL to write for it (PostgreSQL 15 and later)
            await conn.execute(f'CREATE DATABASE "{name}" STRATEGY FILE_COPY')
        except asyncpg.PostgresSyntaxError:  # before PostgreSQL 15
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop_database(url: str, name: str) -> None:
    conn = await _connect(url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


class PrivateCluster:
    """A cluster of one test's own, which it may stop and start again (a database restart mid-load)."""

    def __init__(self, server: Server, pg_ctl: list[str], base: str) -> None:
        self.server = server
        self._pg_ctl = pg_ctl
        self._base = base

    def stop(self) -> None:
        _run(_as_postgres([*self._pg_ctl, "-m", "fast", "-w", "stop"]), cwd=self._base)

    def start(self) -> None:
        _run(_as_postgres([*self._pg_ctl, "-w", "-t", str(int(START_TIMEOUT)), "start"]), cwd=self._base)


def start_private_cluster() -> tuple[PrivateCluster, Any]:
    """A cluster for one test (never the shared one, nor TEST_ASYNCJOBS_POSTGRES_URL's: it will be
    restarted); returns it and the function that removes it."""
    server, stop, pg_ctl, base = _start_cluster_parts()
    return PrivateCluster(server, pg_ctl, base), stop


def _start_cluster() -> tuple[Server, Any]:
    server, stop, _, _ = _start_cluster_parts()
    return server, stop


def _start_cluster_parts() -> tuple[Server, Any, list[str], str]:
    initdb, pg_ctl = _bins()
    if os.geteuid() == 0 and subprocess.run(["id", "postgres"], capture_output=True).returncode != 0:
        _run(["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", "postgres"])
    base = tempfile.mkdtemp(prefix="asyncjobs-pg-")
    os.chmod(base, 0o755)
    data = os.path.join(base, "data")
    os.mkdir(data, 0o700)
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
        shutil.chown(data, "postgres", "postgres")
    port = _free_port()
    _run(_as_postgres([initdb, "-D", data, "-U", "postgres", "-A", "trust",
                       "-E", "UTF8", "--no-locale", "--no-sync"]), cwd=base)
    options = (f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={base}"
               " -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
    control = [pg_ctl, "-D", data, "-o", options, "-l", os.path.join(base, "log")]
    _run(_as_postgres([*control, "-w", "-t", str(int(START_TIMEOUT)), "start"]), cwd=base)

    def stop() -> None:
        subprocess.run(_as_postgres([pg_ctl, "-D", data, "-m", "immediate", "stop"]), capture_output=True,
                       cwd=base)
        shutil.rmtree(base, ignore_errors=True)

    return Server(url=f"postgresql://postgres@127.0.0.1:{port}/postgres"), stop, control, base


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Server]:
    """The PostgreSQL server of this test session (started on first use)."""
    url = os.environ.get(ENV_URL)
    if url:
        yield Server(url=url)
        return
    server, stop = _start_cluster()
    try:
        yield server
    finally:
        stop()


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def create_database(server: Server) -> str:
    """Create a fresh, empty database ``test_<random>`` on ``server``; returns its URL."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    run_sync(_create_database(server.url, name))
    return _with_database(server.url, name)


def drop_database(server: Server, url: str) -> None:
    """Drop a database that create_database made (closing whatever connections are still on it)."""
    run_sync(_drop_database(server.url, urlsplit(url).path.lstrip("/")))


@pytest.fixture
def postgres_url(postgres_server: Server) -> Iterator[str]:
    """The URL of a fresh, empty database, dropped after the test."""
    url = create_database(postgres_server)
    try:
        yield url
    finally:
        drop_database(postgres_server, url)
