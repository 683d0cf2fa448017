"""Files against real `asyncjobs serve` processes: kill -9 around uploads, a full disk, a read-only or full
store, and 256 MiB transfers in flat memory."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import socket
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import pytest

from tests.conftest import config_text, files_under

MIB = 1 << 20


@pytest.fixture
def tmpfs(tmp_path: Path):
    """Mount small tmpfs folders (the tests run as root); each is unmounted at the end."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in files_under(folder))


async def chunks(path: Path, size: int = MIB) -> AsyncIterator[bytes]:
    with open(path, "rb") as data:
        while chunk := data.read(size):
            yield chunk


def raw_upload_start(url: str, path: str, length: int) -> socket.socket:
    """A PUT whose headers promise ``length`` bytes; the caller sends (some of) them."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(f"PUT {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n"
                 f"Content-Length: {length}\r\n\r\n".encode())
    return sock


async def wait_for(check, what: str, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return value


def fill_up(folder: Path) -> Path:
    """Fill the disk under ``folder`` to its last block with one file, returned (unlink it to make room).
    Unbuffered: a buffered file would try its last bytes again at its close, and raise there (ENOSPC) outside
    the loop that expects it."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(b"f" * 65536)
        except OSError:
            pass
    return filler


async def wait_for_status(http: aiohttp.ClientSession, url: str, job_id: str, statuses: set[str],
                          timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        async with http.get(f"{url}/jobs/{job_id}", params={"redirect": "false"}) as resp:
            body = await resp.json()
        if body["status"] in statuses:
            return body
        assert time.monotonic() < deadline, f"job {job_id} stayed {body['status']}, wanted {statuses}"
        await asyncio.sleep(0.05)


async def test_kill_9_during_an_upload_leaves_no_job_and_after_restart_no_file(server_factory, http, tmp_path):
    """The upload never reached a commit: no job exists, and the restart sweeps its partial file."""
    files = tmp_path / "files"
    text = config_text(files={"dir": str(files)})
    server = server_factory(config_text=text)
    sock = raw_upload_start(server.url, "/uploads/half", 20 * MIB)
    sock.sendall(b"u" * (4 * MIB))
    await wait_for(lambda: any((files / "tmp").iterdir()), "the partial upload on disk")
    server.kill()
    sock.close()
    assert files_in(files) != []  # the partial file is there after the crash...
    again = server_factory(config_text=text)
    async with http.get(f"{again.url}/jobs") as resp:
        assert (await resp.json())["jobs"] == []
    assert files_in(files) == []  # ...and the restart removed it


async def test_kill_9_right_after_202_keeps_the_job_and_its_file(server_factory, http, tmp_path):
    """A 202 means the job and its upload are durable: after kill -9 and a restart both are there and it runs."""
    files = tmp_path / "files"
    text = config_text(files={"dir": str(files)})
    server = server_factory(config_text=text)
    data = os.urandom(3 * MIB)
    form = aiohttp.FormData()
    form.add_field("job", json.dumps({"task": "digest", "delay": 1.5}), content_type="application/json")
    form.add_field("file", io.BytesIO(data), filename="d.bin", content_type="application/octet-stream")
    async with http.post(f"{server.url}/jobs", data=form) as resp:
        assert resp.status == 202
        job = await resp.json()
    server.kill()
    assert (files / "jobs" / job["id"] / "in.file").read_bytes() == data
    again = server_factory(config_text=text)
    deadline = time.monotonic() + 15
    while True:
        async with http.get(f"{again.url}/jobs/{job['id']}", allow_redirects=False) as resp:
            body = await resp.json()
        if body["status"] == "succeeded" or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert body["result"] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


async def test_a_disk_that_fills_up_answers_507_and_the_server_goes_on(server_factory, http, tmpfs, tmp_path):
    """An upload larger than the free space: 507 problem+json, the partial file removed, other requests served."""
    files = tmpfs("files", "8m")
    server = server_factory(config_text=config_text(files={"dir": str(files)}))
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(16 * MIB))

    async def health_meanwhile() -> int:
        served = 0
        for _ in range(20):
            async with http.get(f"{server.url}/healthz") as resp:
                served += resp.status == 200
            await asyncio.sleep(0.01)
        return served

    upload = http.put(f"{server.url}/uploads/big", data=chunks(big, 256 * 1024))
    resp, served = await asyncio.gather(upload, health_meanwhile())
    assert resp.status == 507, await resp.text()
    assert resp.content_type == "application/problem+json"
    resp.release()
    assert served == 20
    assert files_in(files) == []
    async with http.put(f"{server.url}/uploads/small", data=b"fits") as resp:
        assert resp.status == 202  # the room came back
    async with http.get(f"{server.url}/jobs") as resp:
        assert len((await resp.json())["jobs"]) == 1


@pytest.mark.sqlite_only  # fills a tmpfs under the SQLite file and checks its integrity
async def test_a_full_store_answers_503_and_stays_intact(server_factory, http, tmpfs):
    """SQLite on a full disk: submits get 503 with Retry-After, never 500; the file passes integrity_check
    afterwards and the server takes submits again once there is room."""
    store = tmpfs("store", "2m")
    db = store / "jobs.db"
    server = server_factory(db=db, config_text=config_text(files={"dir": str(store / "files")}))
    async with http.post(f"{server.url}/jobs", json={"task": "noop"}) as resp:
        assert resp.status == 202
    filler = fill_up(store)
    statuses = []
    for i in range(30):
        async with http.post(f"{server.url}/jobs", json={"task": "echo", "params": {"pad": "p" * 20000, "i": i}}) as r:
            statuses.append(r.status)
            if r.status == 503:
                assert "Retry-After" in r.headers and r.content_type == "application/problem+json"
    assert 503 in statuses and set(statuses) <= {202, 503}, statuses
    async with http.get(f"{server.url}/healthz") as resp:
        assert resp.status == 200
    filler.unlink()
    async with http.post(f"{server.url}/jobs", json={"task": "noop"}) as resp:
        assert resp.status == 202
    assert "Traceback" not in server.log()
    assert server.terminate() == 0
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.sqlite_only  # fills a tmpfs under the SQLite file
async def test_an_outcome_the_full_store_refused_is_stored_once_there_is_room(server_factory, http, tmpfs):
    """A job ends while the disk under the store is full: its outcome cannot be written. The server tries it
    again, and once there is room the job is succeeded, not running until the next restart."""
    store = tmpfs("store", "2m")
    server = server_factory(db=store / "jobs.db", config_text=config_text(files={"dir": str(store / "files")}))
    async with http.post(f"{server.url}/jobs", json={"task": "sleep", "params": {"seconds": 1.5, "steps": 1}}) as r:
        assert r.status == 202
        job_id = (await r.json())["id"]
    await wait_for_status(http, server.url, job_id, {"running"})
    filler = fill_up(store)
    deadline = time.monotonic() + 15
    while "outcome not stored" not in server.log():
        assert time.monotonic() < deadline, f"the outcome was stored on a full disk:\n{server.log()}"
        await asyncio.sleep(0.1)
    async with http.get(f"{server.url}/jobs/{job_id}", params={"redirect": "false"}) as resp:
        assert (await resp.json())["status"] == "running"
    filler.unlink()
    body = await wait_for_status(http, server.url, job_id, {"succeeded"}, timeout_s=15)
    assert body["result"] == {"slept": 1.5}, body
    assert "Traceback" not in server.log()


@pytest.mark.sqlite_only  # fills a tmpfs under the SQLite file
async def test_a_restart_on_a_full_disk_serves_and_recovers_the_running_jobs_once_there_is_room(
        server_factory, http, tmpfs):
    """kill -9 while a job runs and the disk under the store is full: the restart cannot write the job's
    recovery, yet it starts and answers (the job reads as running); once there is room a sweep recovers it
    (failed as interrupted, the task has no retries) and the queued job runs."""
    store = tmpfs("store", "2m")
    text = config_text(files={"dir": str(store / "files")}, jobs={"retention": 2})  # a sweep every 0.5 s
    server = server_factory(db=store / "jobs.db", config_text=text)
    async with http.post(f"{server.url}/jobs", json={"task": "block", "params": {"seconds": 60}}) as resp:
        job_id = (await resp.json())["id"]
    await wait_for_status(http, server.url, job_id, {"running"})
    async with http.post(f"{server.url}/jobs", json={"task": "echo", "params": {"n": 1}, "delay": 0.2}) as resp:
        queued_id = (await resp.json())["id"]
    filler = fill_up(store)
    await asyncio.sleep(0.3)  # the delayed job falls due before the restart, whose placement of it fails too
    server.kill()

    server.start()
    assert "cannot recover the jobs left running" in server.log(), server.log()
    async with http.get(f"{server.url}/healthz") as resp:
        assert resp.status == 200
    assert (await wait_for_status(http, server.url, job_id, {"running"}))["status"] == "running"
    filler.unlink()
    body = await wait_for_status(http, server.url, job_id, {"failed"}, timeout_s=15)
    assert body["error"]["type"] == "interrupted", body
    await wait_for_status(http, server.url, queued_id, {"succeeded"}, timeout_s=15)
    assert "Traceback" not in server.log()


async def test_a_read_only_files_folder_answers_503_and_the_server_goes_on(server_factory, http, tmpfs):
    """Uploads to a files folder that turned read-only get 503 with Retry-After, not 500; once it is
    writable again they are taken."""
    files = tmpfs("files", "8m")
    server = server_factory(config_text=config_text(files={"dir": str(files)}))
    subprocess.run(["mount", "-o", "remount,ro", str(files)], check=True)
    async with http.put(f"{server.url}/uploads/ro", data=b"x" * 1000) as resp:
        assert resp.status == 503, await resp.text()
        assert "Retry-After" in resp.headers and resp.content_type == "application/problem+json"
    async with http.post(f"{server.url}/jobs", json={"task": "noop"}) as resp:
        assert resp.status == 202  # jobs without files go on
    subprocess.run(["mount", "-o", "remount,rw", str(files)], check=True)
    async with http.put(f"{server.url}/uploads/rw", data=b"x" * 1000) as resp:
        assert resp.status == 202
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("how", ["raw", "raw-chunked", "multipart", "multipart-chunked"])
async def test_256_mib_upload_and_download_in_flat_memory(server_factory, http, tmp_path, how):
    """A 256 MiB upload (and, once, a 256 MiB download) keeps the server within 64 MiB of its idle size."""
    size = 256 * MIB
    server = server_factory(config_text=config_text())
    pid = server.proc.pid
    source = tmp_path / "source.bin"
    with open(source, "wb") as out:
        for i in range(size // MIB):
            out.write(hashlib.sha256(str(i).encode()).digest() * (MIB // 32))
    async with http.get(f"{server.url}/healthz") as resp:
        assert resp.status == 200
    idle = rss_bytes(pid)
    peak = idle
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_bytes(pid))
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    expected = hashlib.sha256(source.read_bytes()).hexdigest()
    try:
        if how.startswith("raw"):
            body = chunks(source) if how == "raw-chunked" else open(source, "rb")
            resp = await http.put(f"{server.url}/uploads/big", data=body)
        else:
            form = aiohttp.MultipartWriter("form-data")
            form.append(json.dumps({"task": "digest"}), {"Content-Type": "application/json"}
                        ).set_content_disposition("form-data", name="job")
            body = chunks(source) if how == "multipart-chunked" else open(source, "rb")
            form.append(body, {"Content-Type": "application/octet-stream"}
                        ).set_content_disposition("form-data", name="file", filename="big.bin")
            resp = await http.post(f"{server.url}/jobs", data=form)
        assert resp.status == 202, await resp.text()
        job = await resp.json()
        assert job["files"]["inputs"]["file"]["sha256"] == expected
        if how == "raw":  # the download, once
            resp = await http.post(f"{server.url}/jobs", json={"task": "fill", "params": {"size": size}},
                                   headers={"Prefer": "wait=60"})
            assert resp.status == 201, await resp.text()
            done = await resp.json()
            digest, got = hashlib.sha256(), 0
            async with http.get(f"{server.url}/jobs/{done['id']}/result") as resp:
                assert resp.status == 200
                async for chunk in resp.content.iter_chunked(MIB):
                    digest.update(chunk)
                    got += len(chunk)
            assert got == size and digest.hexdigest() == done["files"]["result"]["sha256"]
    finally:
        stop.set()
        await sampler
    assert peak - idle < 64 * MIB, f"resident memory grew by {(peak - idle) / MIB:.1f} MiB"
