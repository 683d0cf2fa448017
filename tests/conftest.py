"""Fixtures: a real App on a temp SQLite file behind aiohttp's test server, and real `asyncjobs serve` processes."""

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
from typing import Any, AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import WSMsgType

from asyncjobs import App, Client
from asyncjobs import config as config_module

ROOT = Path(__file__).resolve().parent.parent
TEST_MODULES = ["asyncjobs.builtin", "tests.sample_tasks"]


def make_config(tmp_path: Path, **sections: dict[str, Any]) -> config_module.Config:
    data: dict[str, Any] = {"store": {"path": str(tmp_path / "jobs.db")}, "tasks": {"modules": TEST_MODULES}}
    return config_module.from_dict(config_module.merge(data, sections))


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
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "asyncjobs", "serve", "--host", "127.0.0.1", "--port", "0",
             "--db", str(self.db), *self.args],
            cwd=self.tmp_path, env=self.env, stdout=log, stderr=subprocess.STDOUT,
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
