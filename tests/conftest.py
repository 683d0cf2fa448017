"""Fixtures: a real App on a temp SQLite file behind aiohttp's test server, and real `asyncjobs serve` processes.

Which store the Apps use, and what runs where (``--store``):

- ``pytest`` (``--store sqlite``, the default) runs every test, each App on its temp SQLite file, as always.
  The store contract (test_store.py) and test_postgres_node.py run on PostgreSQL in this run too.
- ``pytest --store postgres`` runs the modules that talk HTTP to an App again, each App on a PostgreSQL
  database instead: ``make_config`` (and so ``app_factory``, ``make_client``, ``client``, ``start``) sets
  ``store.url``, and ``server_factory``/``ServerProcess`` pass ``--db <url>`` (and the SQLite path they would
  have used as ASYNCJOBS_STORE_PATH, so the files folder stays where it was). Each SQLite path of a test gets a
  fresh database of its own on the session's throwaway cluster (tests/postgres_cluster.py), made on first use
  and dropped after the test (a module-scoped server's, at the end of the session): two paths, two databases;
  a restart on the same path, the same database. A test that names its own store (``store.url``, or its own
  ``--db`` to a start-up that is meant to fail) keeps it.
  Left out of that run (deselected, not skipped):
  - the modules in NOT_HTTP_MODULES: pure unit tests with no App (codec, config, rules, models, layers, ...),
    the store's own tests (test_store runs both backends in the default run), and the browser, video
    example, fuzz and packaging tests (they need not run twice);
  - the modules of many nodes and one node on PostgreSQL (test_postgres_node, test_cluster*,
    test_processes), and any test that requests ``postgres_url``: they run on PostgreSQL in the default
    run already;
  - tests marked ``sqlite_only``: they hold only on SQLite (they open the SQLite file, test its pragmas,
    crash it via the file, fill a tmpfs under it, ...); each says why beside the mark.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import aiohttp
import pytest
from aiohttp import WSMsgType

from asyncjobs import App, Client
from asyncjobs import config as config_module
from tests.postgres_cluster import (  # noqa: F401 (postgres_server, postgres_url: fixtures for --store postgres)
    create_database, drop_database, postgres_server, postgres_url, run_sync)

ROOT = Path(__file__).resolve().parent.parent
TEST_MODULES = ["asyncjobs.builtin", "tests.sample_tasks"]


# -- the store backend: --store sqlite (the default) or postgres -------------------------------------------

# Modules left out of the --store postgres run (see the docstring above): no App behind HTTP, or run already.
# Tests that request a PostgreSQL fixture themselves are left out too (they are on PostgreSQL in any run).
NOT_HTTP_MODULES = {
    "test_codec", "test_config", "test_file_rules", "test_layers", "test_models", "test_protocol",
    "test_quota_rules", "test_rules", "test_tasks",  # pure unit tests
    "test_store", "test_sqlite_store",  # the store's own tests (test_store runs both backends in any run)
    "test_browser", "test_example_video", "test_fuzz", "test_packaging",  # need not run twice
    "test_postgres_node", "test_cluster", "test_cluster_process", "test_processes",  # on PostgreSQL in any run
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--store", choices=("sqlite", "postgres"), default="sqlite",
                     help="the store backend of the Apps the HTTP tests start: a temp SQLite file (default),"
                          " or a fresh database on a throwaway PostgreSQL cluster (runs only the HTTP modules)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("store") != "postgres":
        return
    kept, left_out = [], []
    for item in items:
        module = getattr(item, "module", None)
        on_postgres_already = any(name in getattr(item, "fixturenames", ())
                                  for name in ("postgres_url", "postgres_server"))
        module = module.__name__.rsplit(".", 1)[-1] if module is not None else ""
        if module in NOT_HTTP_MODULES or item.get_closest_marker("sqlite_only") or on_postgres_already:
            left_out.append(item)
        else:
            kept.append(item)
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept


class PostgresDatabases:
    """Under --store postgres: a fresh database for each SQLite path a test would have used, made on first use.

    Those made while a test runs are dropped after it; those made outside one (a module-scoped server's), at
    the end of the session."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.urls: dict[str, str] = {}
        self.scopes: list[list[str]] = [[]]  # the session's, then the running test's

    def url_for(self, path: str | Path) -> str:
        key = os.path.abspath(path)
        if key not in self.urls:
            self.urls[key] = create_database(self.server)
            self.scopes[-1].append(key)
        return self.urls[key]

    def drop_scope(self) -> None:
        for key in self.scopes.pop():
            drop_database(self.server, self.urls.pop(key))


_databases: PostgresDatabases | None = None  # set for the session under --store postgres


def store_url(path: str | Path) -> str | None:
    """The PostgreSQL database standing in for the SQLite file ``path`` under --store postgres; else None."""
    return _databases.url_for(path) if _databases is not None else None


@pytest.fixture(scope="session", autouse=True)
def _store_backend(request: pytest.FixtureRequest) -> Iterator[None]:
    """Under --store postgres: the session's cluster (started before the first test), and its databases."""
    global _databases
    if request.config.getoption("store") != "postgres":
        yield
        return
    _databases = PostgresDatabases(request.getfixturevalue("postgres_server"))
    try:
        yield
    finally:
        databases, _databases = _databases, None
        databases.drop_scope()


@pytest.fixture(autouse=True)
def _store_per_test() -> Iterator[None]:
    """The databases a test makes are dropped after it (set up first, so torn down after its Apps and servers)."""
    databases = _databases
    if databases is None:
        yield
        return
    databases.scopes.append([])
    try:
        yield
    finally:
        databases.drop_scope()


def postgres_row(url: str, sql: str, *args: Any) -> tuple | None:
    """One row straight from the PostgreSQL database ``url`` (a reader beside the server), as a tuple like
    sqlite3 gives; callable from sync code and from inside a running loop."""

    async def fetch() -> tuple | None:
        import asyncpg

        conn = await asyncpg.connect(url, timeout=10)
        try:
            row = await conn.fetchrow(sql, *args)
        finally:
            await conn.close()
        return None if row is None else tuple(row)

    return run_sync(fetch())


def make_config(tmp_path: Path, **sections: dict[str, Any]) -> config_module.Config:
    data: dict[str, Any] = {"store": {"path": str(tmp_path / "jobs.db")}, "tasks": {"modules": TEST_MODULES}}
    merged = config_module.merge(data, sections)
    if "url" not in merged["store"] and (url := store_url(merged["store"]["path"])):
        merged["store"]["url"] = url  # --store postgres: a database instead of that file
    return config_module.from_dict(merged)


@pytest.fixture
def app_factory(tmp_path: Path) -> Callable[..., App]:
    def factory(**sections: dict[str, Any]) -> App:
        return App(make_config(tmp_path, **sections))

    return factory


@pytest.fixture
async def make_client(aiohttp_client, app_factory):
    """Start an App (with any config sections) behind a real test server; returns (client, app)."""

    async def make(**sections: dict[str, Any]):
        app = app_factory(**sections)
        client = await aiohttp_client(app.web)
        return client, app

    return make


@pytest.fixture
async def client(make_client):
    client, _ = await make_client()
    return client


async def submit(client, task: str, params: dict | None = None, **extra: Any) -> dict:
    resp = await client.post("/jobs", json={"task": task, "params": params or {}, **extra})
    assert resp.status == 202, await resp.text()
    return await resp.json()


async def wait_status(client, job_id: str, statuses: set[str] | str, timeout_s: float = 10.0,
                      headers: dict[str, str] | None = None) -> dict:
    """Poll the monitor (without following redirects, with ``headers``) until the job reaches one of ``statuses``."""
    if isinstance(statuses, str):
        statuses = {statuses}
    deadline = time.monotonic() + timeout_s
    while True:
        resp = await client.get(f"/jobs/{job_id}", allow_redirects=False, headers=headers)
        body = await resp.json()
        if body.get("status") in statuses:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} stayed {body.get('status')}, wanted {statuses}")
        await asyncio.sleep(0.02)


def files_under(folder: Path) -> list[Path]:
    """Every file under ``folder``, sorted. A folder the server removes while this looks (a job's, once it
    ended) is passed over: os.walk skips a folder it can no longer list, where Path.rglob raises."""
    found = (Path(parent, name) for parent, _, names in os.walk(folder) for name in names)
    return sorted(p for p in found if p.is_file())


async def eventually(check: Callable[[], Any], what: str, timeout_s: float = 10.0) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)



async def recv(ws, timeout_s: float = 10.0) -> dict:
    msg = await ws.receive(timeout=timeout_s)
    assert msg.type is WSMsgType.TEXT, msg
    return json.loads(msg.data)


async def recv_until(ws, done: Callable[[dict], bool], timeout_s: float = 10.0) -> list[dict]:
    """Frames up to and including the first for which ``done`` holds."""
    deadline = time.monotonic() + timeout_s
    frames = []
    while True:
        frame = await recv(ws, max(0.01, deadline - time.monotonic()))
        frames.append(frame)
        if done(frame):
            return frames


def config_text(**sections: dict[str, Any]) -> str:
    """A TOML config with the test task modules and the given sections."""
    sections = {"tasks": {"modules": TEST_MODULES}, **sections}
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


class ServerProcess:
    """A real `asyncjobs serve` subprocess on 127.0.0.1 and a free port."""

    def __init__(self, tmp_path: Path, db: Path, args: list[str], env: dict[str, str]) -> None:
        self.tmp_path = tmp_path
        self.db = db
        self.args = args
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.log_path = tmp_path / f"server-{time.monotonic_ns()}.log"

    def start(self, timeout_s: float = 20.0) -> "ServerProcess":
        self.log_path = self.tmp_path / f"server-{time.monotonic_ns()}.log"
        log = open(self.log_path, "wb")
        db, env = str(self.db), self.env
        if url := store_url(self.db):  # --store postgres: its database, and the files folder beside the path
            db, env = url, {**env, "ASYNCJOBS_STORE_PATH": str(self.db)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "asyncjobs", "serve", "--host", "127.0.0.1", "--port", "0",
             "--db", db, *self.args],
            cwd=self.tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = re.search(r"listening on (http://[\d.]+:\d+)", self.log_path.read_text(errors="replace"))
            if match:
                self.url = match.group(1)
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"server did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)


@pytest.fixture
def server_factory(tmp_path: Path):
    """Start `asyncjobs serve` subprocesses; every one is killed at the end of the test."""
    started: list[ServerProcess] = []

    def factory(*args: str, db: Path | None = None, config_text: str | None = None,
                env: dict[str, str] | None = None) -> ServerProcess:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCJOBS_")}
        full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.update(env or {})
        extra = list(args)
        if config_text is not None:
            path = tmp_path / f"config-{len(started)}.toml"
            path.write_text(config_text)
            extra = ["--config", str(path), *extra]
        elif "--config" not in args:
            path = tmp_path / "default-config.toml"
            path.write_text(f'[tasks]\nmodules = {TEST_MODULES!r}\n'.replace("'", '"'))
            extra = ["--config", str(path), *extra]
        server = ServerProcess(tmp_path, db or tmp_path / "server.db", extra, full_env)
        started.append(server)
        return server.start()

    yield factory
    for server in started:
        server.kill()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# -- for the client tests: a real App behind aiohttp's test server, and clients closed at the end --

@dataclass
class Server:
    url: str
    http: Any  # aiohttp TestClient on the same server, for looking behind the client's back
    app: App


@pytest.fixture
def start(make_client):
    """A real App behind aiohttp's test server, with a short shutdown grace so a left-over job never slows teardown."""

    async def start_(**sections: dict[str, Any]) -> Server:
        queue = {"shutdown_grace": 0.5, **sections.pop("queue", {})}
        http, app = await make_client(queue=queue, **sections)
        return Server(str(http.make_url("/")), http, app)

    return start_


@pytest.fixture
async def connect():
    """Make Clients that are all closed at the end of the test."""
    made: list[Client] = []

    def connect_(url: str, **options: Any) -> Client:
        made.append(Client(url, request_timeout_s=10.0, **options))
        return made[-1]

    yield connect_
    for made_client in made:
        await made_client.close()
