"""Serving file results: streamed from disk (sendfile where the platform has it), one range at most."""

from __future__ import annotations

import asyncio
from typing import IO

from aiohttp import web

from .. import protocol
from ..errors import JobGone
from ..models import Job
from ..queue import JobQueue
from .common import list_header, problem_response
from .problems import problem_body

SEND_BYTES = 1 << 20  # a chunk when sendfile is not available


async def send_file_result(request: web.Request, queue: JobQueue, job: Job) -> web.StreamResponse:
    """``GET``/``HEAD`` of a succeeded job's file: validators, one range, and the bytes from disk."""
    stored = (job.files or {})["result"]
    answer = protocol.file_answer(
        sha256=stored["sha256"], size=stored["size"], name=stored["name"], content_type=stored["content_type"],
        stored_at=job.finished_at or job.created_at, method=request.method,
        range_header=request.headers.get("Range"), if_range=request.headers.get("If-Range"),
        if_none_match=list_header(request, "If-None-Match"), if_match=list_header(request, "If-Match"),
        if_unmodified_since=request.headers.get("If-Unmodified-Since"),
        if_modified_since=request.headers.get("If-Modified-Since"))
    if answer.status == 304:
        return web.Response(status=304, headers=answer.headers)
    if answer.status == 412:
        problem = problem_body(412, "the file does not meet the request's If-Match or If-Unmodified-Since"
                                    f" (its ETag is {answer.headers['ETag']}, Last-Modified"
                                    f" {answer.headers['Last-Modified']})")
        return problem_response({**problem, "job_status": job.status.value}, answer.headers)
    if answer.status == 416:
        problem = problem_body(416, f"the range {request.headers.get('Range')!r} cannot be served from a file of"
                                    f" {stored['size']} bytes; ask for one range within it")
        return problem_response({**problem, "job_status": job.status.value}, answer.headers)
    try:
        file = await asyncio.get_running_loop().run_in_executor(None, queue.files.open_result, job.id, job.attempts)
    except FileNotFoundError:  # deleted or expired between the read of the job and now
        raise JobGone(f"job {job.id} has expired", job_status=job.status.value, job_version=job.version) from None
    try:
        response = web.StreamResponse(status=answer.status, headers=answer.headers)
        response.content_length = answer.length
        await response.prepare(request)
        if request.method != "HEAD" and answer.length:
            await _send(request, response, file, answer.start, answer.length)
        await response.write_eof()
        return response
    finally:
        file.close()


async def _send(request: web.Request, response: web.StreamResponse, file: IO[bytes], start: int,
                length: int) -> None:
    loop = asyncio.get_running_loop()
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("the client went away")
    try:
        await loop.sendfile(transport, file, start, length)
        return
    except (NotImplementedError, AttributeError):  # no sendfile here (TLS, another event loop)
        pass
    file.seek(start)
    left = length
    while left > 0:
        chunk = await loop.run_in_executor(None, file.read, min(SEND_BYTES, left))
        if not chunk:
            raise ConnectionResetError("the file ended early")
        await response.write(chunk)
        left -= len(chunk)
