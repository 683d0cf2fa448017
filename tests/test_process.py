"""Real `asyncjobs serve` processes: start-up, configuration, kill -9, graceful shutdown, malformed HTTP."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ROOT, ServerProcess, config_text

TERMINAL = {"succeeded", "failed", "canceled"}
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=15)


# -- helpers -------------------------------------------------------------------



async def submit(http: aiohttp.ClientSession, server: ServerProcess, task: str, params: dict | None = None,
                 **extra: Any) -> dict:
    async with http.post(f"{server.url}/jobs", json={"task": task, "params": params or {}, **extra},
                         timeout=REQUEST_TIMEOUT) as resp:
        assert resp.status == 202, await resp.text()
        return await resp.json()


async def get_job(http: aiohttp.ClientSession, server: ServerProcess, job_id: str) -> tuple[int, dict]:
    async with http.get(f"{server.url}/jobs/{job_id}", params={"redirect": "false"},
                        allow_redirects=False, timeout=REQUEST_TIMEOUT) as resp:
        return resp.status, await resp.json(content_type=None)


async def wait_job(http: aiohttp.ClientSession, server: ServerProcess, job_id: str, statuses: set[str] | str,
                   timeout_s: float = 15.0) -> dict:
    """Poll until the job has one of ``statuses``; fail on a 404 or after ``timeout_s``."""
    statuses = {statuses} if isinstance(statuses, str) else statuses
    deadline = time.monotonic() + timeout_s
    while True:
        code, body = await get_job(http, server, job_id)
        assert code in (200, 202), f"job {job_id}: monitor answered {code} {body}"  # 202: flow style
        if body["status"] in statuses:
            return body
        assert time.monotonic() < deadline, f"job {job_id} stayed {body['status']}, wanted {statuses}"
        await asyncio.sleep(0.02)


async def cancel(http: aiohttp.ClientSession, server: ServerProcess, job_id: str) -> dict:
    async with http.post(f"{server.url}/jobs/{job_id}/cancel", timeout=REQUEST_TIMEOUT) as resp:
        assert resp.status in (200, 202), await resp.text()
    return await wait_job(http, server, job_id, "canceled")


async def statuses_of(http: aiohttp.ClientSession, server: ServerProcess, ids: list[str]) -> list[str]:
    return [(await get_job(http, server, job_id))[1]["status"] for job_id in ids]


async def wait_until_running(http: aiohttp.ClientSession, server: ServerProcess, ids: list[str], count: int,
                             timeout_s: float = 10.0) -> list[str]:
    """Wait until ``count`` of ``ids`` are running; return their statuses a moment later (nothing else starts)."""
    deadline = time.monotonic() + timeout_s
    while (await statuses_of(http, server, ids)).count("running") < count:
        assert time.monotonic() < deadline, f"fewer than {count} jobs started"
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)  # a dispatcher that would start more has had ample time to do it
    return await statuses_of(http, server, ids)


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def serve_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCJOBS_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `asyncjobs serve` expecting it to stop by itself (a start-up error); a hang is a failure."""
    command = [sys.executable, "-m", "asyncjobs", "serve", "--host", "127.0.0.1", "--port", "0", *args]
    try:
        return subprocess.run(command, cwd=tmp_path, env=env or serve_env(), capture_output=True, text=True,
                              timeout=20)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"`asyncjobs serve {' '.join(args)}` did not stop: {exc.stderr!r}") from None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def raw_exchange(server: ServerProcess, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes on a fresh connection; read the answer until the server closes it."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        try:
            await writer.drain()
        except ConnectionError:
            pass  # the server may answer and close before it has read everything
        raw = b""
        async with asyncio.timeout(10):
            while b"\r\n\r\n" not in raw or not _body_complete(raw):
                chunk = await reader.read(65536)
                if not chunk:
                    break
                raw += chunk
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines and lines[0].startswith("HTTP/1."), f"not an HTTP answer: {raw[:200]!r}"
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def _body_complete(raw: bytes) -> bool:
    head, _, body = raw.partition(b"\r\n\r\n")
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return match is not None and len(body) >= int(match.group(1))


# -- 1. start ------------------------------------------------------------------

async def test_logs_one_listening_line_and_serves(server_factory, http):
    """The server logs exactly one line saying where it listens, and answers there."""
    server = server_factory()
    lines = [line for line in server.log().splitlines() if "listening on" in line]
    assert len(lines) == 1, server.log()
    assert re.search(r"listening on http://127\.0\.0\.1:\d+", lines[0])
    async with http.get(server.url + "/healthz", timeout=REQUEST_TIMEOUT) as resp:
        assert resp.status == 200


async def test_serve_collects_garbage_less_often_and_freezes_its_startup(server_factory, http):
    """`asyncjobs serve` collects the youngest generation after 20,000 new objects instead of Python's 700
    and leaves what its startup built out of every collection (bench/RESULTS.md: 3% of a job's work)."""
    server = server_factory()
    async with http.post(server.url + "/jobs", json={"task": "gc_settings", "params": {}},
                         headers={"Prefer": "wait=5"}, timeout=REQUEST_TIMEOUT) as resp:
        assert resp.status == 201, await resp.text()
        settings = (await resp.json())["result"]
    assert settings["threshold"][0] == 20_000, settings
    assert settings["frozen"] > 10_000, settings  # the modules, the app and the store, at least


def _minor_faults(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


async def test_reading_requests_on_asyncio_maps_no_fresh_memory(server_factory, http):
    """asyncio reads a socket with recv(256 KiB); under load glibc serves that with a fresh mmap, shrunk and
    unmapped again after the read: a page fault and three system calls a request. `asyncjobs serve` keeps
    such buffers in the heap (bench/RESULTS.md): 1,000 submits from 64 connections fault in far fewer pages
    than one each (about 1.6 each without it)."""
    server = server_factory(config_text='[server]\nloop = "asyncio"\n')
    assert "(asyncio event loop)" in server.log(), server.log()

    async def submits(n: int) -> None:
        for _ in range(n):  # delayed: no worker runs them, the requests alone are measured
            async with http.post(server.url + "/jobs", json={"task": "noop", "delay": 3600},
                                 timeout=REQUEST_TIMEOUT) as resp:
                assert resp.status == 202, await resp.text()

    connections = 64
    await asyncio.gather(*(submits(4) for _ in range(connections)))  # the heap grows to its working size
    before = _minor_faults(server.proc.pid)
    await asyncio.gather(*(submits(16) for _ in range(connections)))
    faults = _minor_faults(server.proc.pid) - before
    assert faults < 500, f"{faults} minor page faults for {16 * connections} submits"


async def test_uvloop_is_chosen_in_config(server_factory, http):
    """`server.loop = "uvloop"` runs the service on uvloop (the `speed` extra), and it serves."""
    assert importlib.util.find_spec("uvloop"), "uvloop is in the test extra: pip install '.[test]'"
    server = server_factory(config_text='[server]\nloop = "uvloop"\n')
    assert "(uvloop event loop)" in server.log(), server.log()
    async with http.post(server.url + "/jobs", json={"task": "echo", "params": {"x": 1}},
                         headers={"Prefer": "wait=5"}, timeout=REQUEST_TIMEOUT) as resp:
        assert resp.status == 201, await resp.text()
        assert (await resp.json())["result"] == {"x": 1}


async def test_the_default_loop_is_uvloop_where_it_is_installed(server_factory, http):
    """With no `server.loop` set ("auto"), a service where uvloop is installed runs on it."""
    assert importlib.util.find_spec("uvloop"), "uvloop is in the test extra: pip install '.[test]'"
    server = server_factory(config_text="")
    assert "(uvloop event loop)" in server.log(), server.log()
    async with http.get(server.url + "/healthz", timeout=REQUEST_TIMEOUT) as resp:
        assert resp.status == 200


def _without_uvloop(tmp_path: Path) -> dict[str, str]:
    """serve's environment with a uvloop that cannot be imported first on the path."""
    fake = tmp_path / "no_uvloop"
    (fake / "uvloop").mkdir(parents=True)
    (fake / "uvloop" / "__init__.py").write_text('raise ImportError("uvloop is not installed here")\n')
    env = serve_env()
    env["PYTHONPATH"] = str(fake) + os.pathsep + env["PYTHONPATH"]
    return env


@pytest.mark.parametrize("text", ["", '[server]\nloop = "asyncio"\n'])
def test_without_uvloop_auto_and_asyncio_run_on_asyncio(tmp_path, text):
    """Where uvloop is missing, the default ("auto") starts on asyncio, as `loop = "asyncio"` does anywhere."""
    config = tmp_path / "loop.toml"
    config.write_text(text)
    proc = subprocess.Popen([sys.executable, "-m", "asyncjobs", "serve", "--config", str(config), "--port", "0",
                             "--db", str(tmp_path / "jobs.db")], env=_without_uvloop(tmp_path), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "listening on" in line:
                break
        assert any("(asyncio event loop)" in line for line in lines), "".join(lines)
    finally:
        proc.terminate()
        proc.wait(30)
        proc.stdout.close()


def test_uvloop_missing_stops_the_start_with_the_install_hint(tmp_path):
    """Without the uvloop package, `loop = "uvloop"` is a configuration error that says what to install."""
    config = tmp_path / "uv.toml"
    config.write_text('[server]\nloop = "uvloop"\n')
    done = run_serve(tmp_path, "--config", str(config), "--db", str(tmp_path / "jobs.db"), env=_without_uvloop(tmp_path))
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "server.loop" in output and "asyncjobs[speed]" in output, output
    assert "Traceback" not in output, output


async def test_port_flag_sets_the_listening_port(server_factory, http):
    """`--port P` makes the server listen on P (and log it)."""
    port = free_port()
    server = server_factory("--port", str(port))
    assert server.url == f"http://127.0.0.1:{port}"
    async with http.get(server.url + "/healthz", timeout=REQUEST_TIMEOUT) as resp:
        assert resp.status == 200


@pytest.mark.sqlite_only  # --db PATH: checks the SQLite file itself
async def test_db_flag_chooses_the_store_file(server_factory, http, tmp_path):
    """`--db PATH` stores jobs in PATH: they are there after a restart on it, and absent from another file."""
    db_a, db_b = tmp_path / "a.db", tmp_path / "b.db"
    server = server_factory(db=db_a)
    job = await submit(http, server, "echo", {"x": 1})
    await wait_job(http, server, job["id"], "succeeded")
    assert db_a.exists()
    assert server.terminate() == 0
    other = server_factory(db=db_b)
    assert (await get_job(http, other, job["id"]))[0] == 404
    other.kill()
    again = server_factory(db=db_a)
    code, body = await get_job(http, again, job["id"])
    assert code == 200 and body["status"] == "succeeded" and body["result"] == {"x": 1}


@pytest.mark.parametrize(("file_workers", "env_workers", "flag_workers", "expected"), [
    (3, None, None, 3),
    (3, "1", None, 1),
    (3, "1", 2, 2),
])
async def test_workers_from_file_env_and_flag(server_factory, http, file_workers, env_workers, flag_workers,
                                              expected):
    """The number of jobs running at once is queue.workers, with flags over environment over file."""
    env = {"ASYNCJOBS_QUEUE_WORKERS": env_workers} if env_workers else {}
    args = ("--workers", str(flag_workers)) if flag_workers else ()
    server = server_factory(*args, config_text=config_text(queue={"workers": file_workers}), env=env)
    ids = [(await submit(http, server, "block", {"seconds": 30}))["id"] for _ in range(4)]
    statuses = await wait_until_running(http, server, ids, expected)
    assert statuses.count("running") == expected, statuses
    assert statuses.count("queued") == 4 - expected, statuses
    for job_id in ids:
        await cancel(http, server, job_id)


async def test_env_sets_the_monitor_style_over_the_file(server_factory, http):
    """ASYNCJOBS_PROTOCOL_MONITOR=flow (over a file saying rest) makes the monitor answer 202 for a running job."""
    server = server_factory(config_text=config_text(protocol={"monitor": "rest"}),
                            env={"ASYNCJOBS_PROTOCOL_MONITOR": "flow"})
    job = await submit(http, server, "block", {"seconds": 30})
    await wait_job(http, server, job["id"], "running")
    async with http.get(f"{server.url}/jobs/{job['id']}", allow_redirects=False,
                        timeout=REQUEST_TIMEOUT) as resp:
        assert resp.status == 202
        assert resp.headers["Location"].endswith(f"/jobs/{job['id']}")
        assert int(resp.headers["Retry-After"]) >= 1
    await cancel(http, server, job["id"])
    async with http.get(f"{server.url}/jobs/{job['id']}", allow_redirects=False,
                        timeout=REQUEST_TIMEOUT) as resp:
        assert resp.status == 200


# -- 2. configuration errors -----------------------------------------------------

BAD_CONFIGS = {
    "unknown key": ('[queue]\nwrokers = 2\n', {}, "queue.wrokers"),
    "wrong type": ('[queue]\nworkers = "many"\n', {}, "queue.workers"),
    "wrong choice": ('[store]\nsynchronous = "off"\n', {}, "store.synchronous"),
    "unknown event loop": ('[server]\nloop = "trio"\n', {}, "server.loop"),
    "unknown section": ('[qeueu]\nworkers = 2\n', {}, "qeueu"),
    "invalid toml": ('[queue\nworkers = 2\n', {}, "bad.toml"),
    "unknown task module": ('[tasks]\nmodules = ["asyncjobs.builtin", "no_such_tasks_module"]\n', {},
                            "no_such_tasks_module"),
    "bad env value": ('', {"ASYNCJOBS_QUEUE_WORKERS": "abc"}, "queue.workers"),
    "env section misspelt": ('', {"ASYNCJOBS_SEVER_PORT": "9000"}, "ASYNCJOBS_SEVER_PORT"),
    "a module name that is none": ('[tasks]\nmodules = [""]\n', {}, "tasks.modules"),
    "a relative module name": ('[tasks]\nmodules = [".builtin"]\n', {}, "tasks.modules"),
    "not a finite number": ('[jobs]\nmax_age = inf\n', {}, "jobs.max_age"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_config_error_stops_the_start(tmp_path, case):
    """A wrong key or value stops the start with a message naming it, a non-zero exit and no traceback."""
    text, env, named = BAD_CONFIGS[case]
    path = tmp_path / "bad.toml"
    path.write_text(text)
    done = run_serve(tmp_path, "--config", str(path), "--db", str(tmp_path / "jobs.db"), env=serve_env(**env))
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert named in output, output
    assert "Traceback" not in output, output
    assert "listening on" not in output, output


@pytest.mark.parametrize("args,named", [
    (["--port", "70000"], "server.port"),  # the default loop would have listened on 70000 - 65536
    (["--db", "/"], "store.path"),
    (["--config", "."], "cannot read the config file"),
])
def test_flags_out_of_range_stop_the_start(tmp_path, args, named):
    done = run_serve(tmp_path, "--db", str(tmp_path / "jobs.db"), *args)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert named in output and "Traceback" not in output and "listening on" not in output, output


def test_abbreviated_flags_are_refused_so_processes_children_serve():
    """`--proc 2` was taken for `--processes 2`, which the children's command did not strip: each child
    supervised children of its own. Only whole option names are options."""
    from asyncjobs.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--proc", "2"])


def test_missing_config_file_stops_the_start(tmp_path):
    """A config file that does not exist stops the start with a message naming it."""
    missing = tmp_path / "nowhere.toml"
    done = run_serve(tmp_path, "--config", str(missing), "--db", str(tmp_path / "jobs.db"))
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert str(missing) in output, output
    assert "Traceback" not in output, output


@pytest.mark.sqlite_only  # a SQLite file in a missing folder
def test_store_in_missing_folder_stops_the_start(tmp_path):
    """A store path in a folder that does not exist stops the start with a clear message, without a traceback."""
    path = tmp_path / "ok.toml"
    path.write_text(config_text())
    db = tmp_path / "no-such-folder" / "jobs.db"
    done = run_serve(tmp_path, "--config", str(path), "--db", str(db))
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "no-such-folder" in output and "does not exist" in output, output
    assert "Traceback" not in output, output
    assert not db.parent.exists()


@pytest.mark.sqlite_only  # one process holds a SQLite store
async def test_a_second_server_on_the_same_store_stops_and_leaves_the_first_ones_jobs_alone(server_factory, http,
                                                                                             tmp_path):
    """A second `serve` on a SQLite file another process holds stops at once with a clear message; it does
    not take the first one's running job for a crash's (failed, "interrupted"), and the first goes on."""
    db = tmp_path / "held.db"
    first = server_factory(db=db)
    running = (await submit(http, first, "sleep", {"seconds": 1.5, "steps": 3}))["id"]
    await wait_job(http, first, running, "running")
    config = tmp_path / "second.toml"
    config.write_text(config_text())
    done = run_serve(tmp_path, "--config", str(config), "--db", str(db))
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "another process has this store open" in output and "Traceback" not in output, output
    assert (await wait_job(http, first, running, {"succeeded", "failed"}))["status"] == "succeeded"


# -- 3. crash safety -----------------------------------------------------------

async def test_kill_9_loses_no_acknowledged_job(server_factory, http, tmp_path):
    """After kill -9 mid-flight and a restart, every acknowledged job is there and none is stuck running."""
    db = tmp_path / "crash.db"
    server = server_factory("--workers", "4", db=db)
    # One block and one hold surely running at the kill (their handlers never end by themselves in time).
    block_run = (await submit(http, server, "block", {"seconds": 60}))["id"]
    hold_run = (await submit(http, server, "hold", {"seconds": 60}))["id"]
    await wait_job(http, server, block_run, "running")
    await wait_job(http, server, hold_run, "running")

    rng = random.Random(20261123)
    specs: list[tuple[str, dict, int]] = []
    for i in range(200):
        if i % 2:
            specs.append(("echo", {"i": i}, 0))
        else:
            specs.append(("sleep", {"seconds": round(rng.uniform(0.05, 0.2), 3), "steps": 2}, 0))
        if i in (40, 90, 140):  # more long jobs behind the short ones: queued or running at the kill
            specs.append(("hold", {"seconds": 60}, -1))
            specs.append(("block", {"seconds": 60}, -1))
    accepted: dict[str, tuple[str, dict, int]] = {block_run: ("block", {}, 0), hold_run: ("hold", {}, 0)}
    refused: list[str] = []
    enough = asyncio.Event()
    gate = asyncio.Semaphore(16)

    async def send(spec: tuple[str, dict, int]) -> None:
        task, params, priority = spec
        async with gate:
            if enough.is_set() and server.proc.poll() is not None:
                return
            try:
                async with http.post(f"{server.url}/jobs", timeout=REQUEST_TIMEOUT,
                                     json={"task": task, "params": params, "priority": priority}) as resp:
                    if resp.status == 202:
                        accepted[(await resp.json())["id"]] = spec
                    else:
                        refused.append(f"{resp.status} {await resp.text()}")
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return  # the kill cut this request off: it was never acknowledged
            if len(accepted) >= 130:
                enough.set()

    senders = [asyncio.create_task(send(spec)) for spec in specs]
    await asyncio.wait_for(enough.wait(), 30)
    long_ids = [job_id for job_id, spec in accepted.items() if spec[0] in ("block", "hold")]
    running_before = {job_id for job_id in long_ids if (await get_job(http, server, job_id))[1]["status"] == "running"}
    server.kill()
    await asyncio.wait_for(asyncio.gather(*senders), 30)
    assert not refused, refused[:5]
    assert {block_run, hold_run} <= running_before

    restarted_at = time.time()
    server = server_factory("--workers", "4", db=db)
    bodies = {}
    for job_id in accepted:
        code, body = await get_job(http, server, job_id)
        assert code == 200, f"acknowledged job {job_id} ({accepted[job_id][0]}) answered {code} after the restart"
        if body["status"] == "running":  # only if it started again after the restart
            assert parse_time(body["started_at"]) >= restarted_at - 1.0, body
        bodies[job_id] = body

    for job_id in long_ids:
        task, body = accepted[job_id][0], bodies[job_id]
        if task == "block" and job_id in running_before:
            assert body["status"] == "failed" and body["error"]["type"] == "interrupted", body
            assert body["attempts"] == 1, body
        elif task == "hold" and job_id in running_before:
            again = await wait_job(http, server, job_id, "running")
            assert again["attempts"] == 2, again
            await cancel(http, server, job_id)
        elif body["status"] == "failed":  # a block claimed between the look and the kill
            assert task == "block" and body["error"]["type"] == "interrupted", body
        else:
            assert body["status"] in ("queued", "running"), body
            await cancel(http, server, job_id)

    for job_id, (task, params, _) in accepted.items():
        if task in ("block", "hold"):
            continue
        body = await wait_job(http, server, job_id, TERMINAL, timeout_s=30)
        if body["status"] == "failed":  # it was running at the kill and has no attempt left
            assert body["error"]["type"] == "interrupted" and body["attempts"] == 1, body
        else:
            assert body["status"] == "succeeded", body
            assert body["result"] == (params if task == "echo" else {"slept": params["seconds"]}), body


async def test_a_version_shown_before_a_kill_9_never_stands_for_another_state_after_the_restart(
        server_factory, http, tmp_path):
    """Progress reaches a client at once and the store at most every half second, so a kill -9 loses the last
    versions a client saw. After the restart the job (failed as interrupted) has a version past every one
    shown, and an If-None-Match with the last one seen gets the job, not a 304 that says nothing changed."""
    db = tmp_path / "versions.db"
    server = server_factory(db=db)
    job_id = (await submit(http, server, "sleep", {"seconds": 60, "steps": 6000}))["id"]  # 100 reports a second
    await wait_job(http, server, job_id, "running")
    seen = 0
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline:
        code, body = await get_job(http, server, job_id)
        assert code == 200 and body["status"] == "running", body
        seen = max(seen, body["version"])
    server.kill()

    server = server_factory(db=db)
    code, body = await get_job(http, server, job_id)
    assert code == 200 and body["status"] == "failed" and body["error"]["type"] == "interrupted", body
    assert body["version"] > seen, (body["version"], seen)
    async with http.get(f"{server.url}/jobs/{job_id}", headers={"If-None-Match": f'W/"{seen}"'},
                        params={"wait": "5"}, timeout=REQUEST_TIMEOUT) as resp:
        assert resp.status == 200, f"a version seen before the kill ({seen}) matched the failed job"


async def test_kill_9_keeps_queued_jobs_for_the_restart(server_factory, http, tmp_path):
    """Jobs queued behind a busy worker at a kill -9 run after the restart; the interrupted block fails."""
    db = tmp_path / "queued.db"
    server = server_factory("--workers", "1", db=db)
    blocker = (await submit(http, server, "block", {"seconds": 60}))["id"]
    await wait_job(http, server, blocker, "running")
    queued = [(await submit(http, server, "echo", {"n": n}))["id"] for n in range(5)]
    assert set(await statuses_of(http, server, queued)) == {"queued"}
    server.kill()

    server = server_factory("--workers", "1", db=db)
    body = await wait_job(http, server, blocker, "failed")
    assert body["error"]["type"] == "interrupted", body
    for n, job_id in enumerate(queued):
        done = await wait_job(http, server, job_id, TERMINAL)
        assert done["status"] == "succeeded" and done["result"] == {"n": n} and done["attempts"] == 1, done


# -- 4. graceful shutdown ----------------------------------------------------------

async def test_sigterm_finishes_running_job_and_keeps_queued_ones(server_factory, http, tmp_path):
    """On SIGTERM the running job finishes, the server exits 0 within the grace, and queued jobs wait for a restart."""
    db = tmp_path / "drain.db"
    grace_s = 5.0
    server = server_factory("--workers", "1", db=db, config_text=config_text(queue={"shutdown_grace": grace_s}))
    running = (await submit(http, server, "sleep", {"seconds": 1.0}))["id"]
    await wait_job(http, server, running, "running")
    # A block first so that, after the restart, the echo jobs can be seen still queued behind it.
    blocker = (await submit(http, server, "block", {"seconds": 60}))["id"]
    echoes = [(await submit(http, server, "echo", {"n": n}))["id"] for n in range(3)]
    assert set(await statuses_of(http, server, [blocker, *echoes])) == {"queued"}

    started = time.monotonic()
    code = server.terminate(timeout_s=grace_s + 10)
    elapsed = time.monotonic() - started
    assert code == 0, server.log()
    assert elapsed < grace_s, f"took {elapsed:.1f}s"

    server = server_factory("--workers", "1", db=db)
    code, body = await get_job(http, server, running)
    assert code == 200 and body["status"] == "succeeded" and body["result"] == {"slept": 1.0}, body
    blocked = await wait_job(http, server, blocker, "running")
    assert blocked["attempts"] == 1, blocked
    for job_id in echoes:
        code, body = await get_job(http, server, job_id)
        assert code == 200 and body["status"] == "queued" and body["attempts"] == 0, body
        assert body["error"] is None, body
    await cancel(http, server, blocker)
    for n, job_id in enumerate(echoes):
        done = await wait_job(http, server, job_id, TERMINAL)
        assert done["status"] == "succeeded" and done["result"] == {"n": n}, done


@pytest.mark.parametrize("task", ["block", "stubborn"], ids=["stops when asked", "ignores the stop"])
async def test_sigterm_with_short_grace_requeues_the_running_job(server_factory, http, tmp_path, task):
    """With a short grace, SIGTERM stops a long job promptly; after a restart it is queued again, attempt refunded.
    A sync handler that ignores the stop (its thread cannot be ended) is handed back all the same, and the
    process exits without waiting for that thread."""
    db = tmp_path / "grace.db"
    server = server_factory(db=db, config_text=config_text(queue={"shutdown_grace": 0.5}))
    job = (await submit(http, server, task, {"seconds": 60}))["id"]
    await wait_job(http, server, job, "running")

    started = time.monotonic()
    code = server.terminate(timeout_s=20)
    elapsed = time.monotonic() - started
    assert code == 0, server.log()
    assert elapsed < 5.0, f"took {elapsed:.1f}s with a 0.5s grace"

    server = server_factory(db=db)
    code, body = await get_job(http, server, job)
    assert code == 200, body
    assert body["status"] in ("queued", "running") and body["error"] is None, body
    assert body["attempts"] == (1 if body["status"] == "running" else 0), body
    if task == "block":  # (a stubborn handler would ignore this too: the fixture's kill ends it)
        await cancel(http, server, job)


async def test_sigterm_answers_open_long_polls_and_ends_event_streams(server_factory, http, tmp_path):
    """A long poll and an event stream open on a job that outlives the grace are not cut off at SIGTERM: the
    long poll answers 200 with the job as it is (queued again), the stream ends after its last event."""
    server = server_factory(db=tmp_path / "term.db", config_text=config_text(queue={"shutdown_grace": 0.5}))
    job = (await submit(http, server, "block", {"seconds": 60}))["id"]
    await wait_job(http, server, job, "running")

    async def long_poll() -> tuple[int, dict]:
        async with http.get(f"{server.url}/jobs/{job}", params={"wait": "30"},
                            timeout=aiohttp.ClientTimeout(total=30)) as resp:
            return resp.status, await resp.json()

    async def stream() -> list[bytes]:
        async with http.get(f"{server.url}/jobs/{job}/events", timeout=aiohttp.ClientTimeout(total=30)) as resp:
            assert resp.status == 200
            return [line async for line in resp.content]

    polled, streamed = asyncio.create_task(long_poll()), asyncio.create_task(stream())
    await asyncio.sleep(0.5)  # both are open and waiting
    server.proc.send_signal(signal.SIGTERM)
    status, body = await polled
    assert status == 200 and body["status"] in ("queued", "running"), (status, body)
    lines = await streamed
    assert any(line.startswith(b"event: status") for line in lines), lines
    assert server.proc.wait(20) == 0, server.log()


async def test_submit_while_draining_gets_503(server_factory, http, tmp_path):
    """While the server drains after SIGTERM, a submit gets 503 with Retry-After, and the server still exits 0."""
    server = server_factory(db=tmp_path / "503.db", config_text=config_text(queue={"shutdown_grace": 5}))
    running = (await submit(http, server, "sleep", {"seconds": 3.0}))["id"]
    await wait_job(http, server, running, "running")
    # Warm a keep-alive connection, then signal and submit on it until the drain shows.
    async with http.get(server.url + "/healthz", timeout=REQUEST_TIMEOUT) as resp:
        assert resp.status == 200
    server.proc.send_signal(signal.SIGTERM)
    answers: list[int | str] = []
    deadline = time.monotonic() + 2.5  # well inside the 3 s the running job keeps the server draining
    while time.monotonic() < deadline:
        draining = "shutting down" in server.log()  # the server has seen the signal
        try:
            async with http.post(f"{server.url}/jobs", json={"task": "noop"}, timeout=REQUEST_TIMEOUT) as resp:
                answers.append(resp.status)
                if resp.status != 202 or draining:
                    assert resp.status == 503, f"{resp.status} while draining: {await resp.text()}"
                    assert resp.content_type == "application/problem+json"
                    assert int(resp.headers["Retry-After"]) >= 1
                    break
        except aiohttp.ClientConnectionError:
            answers.append("closed")  # a server may close its listener at once; then no answer to check
            break
        await asyncio.sleep(0.01)
    assert answers and answers[-1] in (503, "closed"), answers
    assert server.proc.wait(15) == 0, server.log()


# -- 5. malformed HTTP ---------------------------------------------------------------

MALFORMED = {
    "garbage request line": b"GARBAGE\r\n\r\n",
    "invalid header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nThis is not a header\r\n\r\n",
    "huge header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
}


async def test_malformed_http_gets_problem_answers(server_factory, http):
    """Requests the HTTP parser rejects get a 4xx problem+json answer, and the server goes on."""
    server = server_factory()
    for case, data in MALFORMED.items():
        status, headers, body = await raw_exchange(server, data)
        assert 400 <= status < 500, (case, status, body[:200])
        assert headers.get("content-type", "").split(";")[0] == "application/problem+json", (case, headers)
        problem = json.loads(body)
        assert problem["status"] == status and problem["title"] and "Traceback" not in body.decode(), case
        async with http.get(server.url + "/healthz", timeout=REQUEST_TIMEOUT) as resp:
            assert resp.status == 200, case
