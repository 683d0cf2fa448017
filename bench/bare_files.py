"""The files ceiling: a bare aiohttp app that receives an upload to disk and serves a file, storing no job.

    python bench/bare_files.py --port 8082 --dir /tmp/somewhere --serve /path/to/file

Uploads are handled the way asyncjobs handles them (asyncjobs/files.py `Upload`),
without the job around them:
- `PUT /blobs/{name}`: the raw body is the file;
- `POST /jobs`: `multipart/form-data`, a `job` part (JSON, parsed) then the file part,
  read with aiohttp's own multipart reader.
The body is read 256 KiB at a time; every 1 MiB gathered is written and SHA-256-hashed
in a thread of the default executor (awaited before the next read, as asyncjobs does);
then fsync, rename into `--dir`/done, fsync of the folder, and `202` with a small JSON
body (size, sha256, and where the time went: reading, write + hash, fsync).
`GET /download` answers `--serve` with `web.FileResponse` (sendfile).
Listens on 127.0.0.1 only. Used by bench/files.py.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import secrets
import time
from pathlib import Path

import orjson
from aiohttp import web

READ_BYTES = 256 * 1024
FLUSH_BYTES = 1 << 20
DIR_KEY = web.AppKey("dir", Path)
SERVE_KEY = web.AppKey("serve", Path)


class Sink:
    """One upload: chunks gathered to 1 MiB, written and hashed in a thread, fsynced, renamed."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / "tmp" / f"{secrets.token_hex(12)}.part"
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.hash = hashlib.sha256()
        self.size = 0
        self.chunks: list[bytes] = []
        self.pending = 0
        self.write_s = 0.0  # time awaiting write + hash
        self.fsync_s = 0.0

    async def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self.chunks.append(chunk)
        self.pending += len(chunk)
        if self.pending >= FLUSH_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if not self.chunks:
            return
        data = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks, self.pending = [], 0
        t0 = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(None, self._write, data)
        self.write_s += time.perf_counter() - t0

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.hash.update(data)

    async def finish(self) -> dict:
        await self.flush()
        t0 = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(None, self._place)
        self.fsync_s = time.perf_counter() - t0
        return {"size": self.size, "sha256": self.hash.hexdigest(),
                "write_s": round(self.write_s, 4), "fsync_s": round(self.fsync_s, 4)}

    def _place(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        done = self.folder / "done"
        os.replace(self.path, done / self.path.name.replace(".part", ".bin"))
        fd = os.open(done, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.path.unlink(missing_ok=True)


def accepted(info: dict, started: float) -> web.Response:
    info["handler_s"] = round(time.perf_counter() - started, 4)
    return web.Response(status=202, body=orjson.dumps(info), content_type="application/json",
                        headers={"Location": "/jobs/bare", "Cache-Control": "no-store"})


async def put_raw(request: web.Request) -> web.Response:
    started = time.perf_counter()
    sink = Sink(request.app[DIR_KEY])
    try:
        while chunk := await request.content.read(READ_BYTES):
            await sink.write(chunk)
        info = await sink.finish()
    except BaseException:
        sink.discard()
        raise
    return accepted(info, started)


async def post_multipart(request: web.Request) -> web.Response:
    started = time.perf_counter()
    reader = await request.multipart()
    part = await reader.next()
    if part is None or part.name != "job":
        raise web.HTTPBadRequest(text="the first part must be 'job'")
    job = orjson.loads(await part.read())
    if not isinstance(job, dict) or not isinstance(job.get("task"), str):
        raise web.HTTPBadRequest(text="the job part must name a task")
    part = await reader.next()
    if part is None:
        raise web.HTTPBadRequest(text="no file part")
    sink = Sink(request.app[DIR_KEY])
    try:
        while chunk := await part.read_chunk(READ_BYTES):
            await sink.write(chunk)
        info = await sink.finish()
        if await reader.next() is not None:
            raise web.HTTPBadRequest(text="one file part only")
    except BaseException:
        sink.discard()
        raise
    return accepted(info, started)


async def download(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(request.app[SERVE_KEY])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8082)
    parser.add_argument("--dir", type=Path, required=True, help="uploads go to DIR/tmp, then DIR/done")
    parser.add_argument("--serve", type=Path, required=True, help="the file GET /download answers")
    parser.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"])
    args = parser.parse_args()
    for sub in ("tmp", "done"):
        (args.dir / sub).mkdir(parents=True, exist_ok=True)
    app = web.Application()  # client_max_size bounds read()/post(), not these streamed reads
    app[DIR_KEY] = args.dir
    app[SERVE_KEY] = args.serve
    app.router.add_put("/blobs/{name}", put_raw)
    app.router.add_post("/jobs", post_multipart)
    app.router.add_get("/download", download)
    print(f"bare_files listening on http://127.0.0.1:{args.port}", flush=True)
    loop = None
    if args.loop == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
