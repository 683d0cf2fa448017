"""Receiving files: multipart submits and raw bodies, streamed to the file store in fixed-size chunks.

Nothing here holds a whole file in memory, and every byte is counted here (aiohttp's
``client_max_size`` does not bound streamed reads). Whatever fails, the uploads of the
request are removed before the error answer leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any, TypeVar
from urllib.parse import unquote

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import content_disposition_filename, parse_content_disposition
from aiohttp.web_protocol import RequestPayloadError

from .. import codec, protocol
from ..errors import InvalidRequest, TooLarge, UnsupportedType, UploadStalled
from ..files import Upload, file_too_large
from ..tasks import FileParam, TaskSpec
from .common import QUEUE_KEY, SETTINGS_KEY, refuse_undecodable

READ_BYTES = 256 * 1024  # one read from a part or a raw body
# The job part and form fields are read in smaller pieces: aiohttp reads one piece past a part's end before it
# hands the part out, and a piece as large as READ_BYTES would take in the next file's bytes that had already
# arrived, then wait for more (a client that stopped there would get 408 instead of its 413).
SMALL_READ_BYTES = 16 * 1024
HELD_CHECK_S = 0.05  # while a file part's read waits, how often the bytes it holds back are counted
MULTIPART_SLACK = 64 * 1024  # boundaries and part headers, beyond the parts' own limits
T = TypeVar("T")


def is_multipart(request: web.Request) -> bool:
    raw = request.headers.get("Content-Type")
    if raw is None or "multipart" not in raw.lower():  # most submits are JSON: no parse of their header
        return False
    return request.content_type.lower() == "multipart/form-data"


class Received:
    """What a file submit carried: the submit body, and its uploads once they are all on disk."""

    def __init__(self) -> None:
        self.submit: protocol.Submit | None = None
        self.uploads: list[Upload] = []
        self.fields: dict[str, Any] = {}

    def discard(self) -> None:
        for upload in self.uploads:
            upload.discard()

    def digests(self) -> dict[str, str]:
        return {u.param: u.stored.sha256 for u in self.uploads if u.stored is not None}


@contextlib.asynccontextmanager
async def receiving() -> AsyncIterator[Received]:
    """Uploads are removed unless the block finishes and hands them on (a disconnect included)."""
    received = Received()
    try:
        yield received
    except BaseException:
        received.discard()
        raise


async def _timed(read: Awaitable[T], timeout_s: float) -> T:
    """One read of the body: a stalled client gets 408; a malformed or cut body gets 400."""
    try:
        async with asyncio.timeout(timeout_s):
            return await read
    except TimeoutError:
        raise UploadStalled(f"the upload stalled for {timeout_s:g} seconds; send it again") from None
    except (ValueError, AssertionError, HttpProcessingError, RequestPayloadError) as exc:
        raise InvalidRequest(f"malformed or truncated multipart body: {exc}",
                         errors=[{"field": "", "message": "malformed or truncated body"}]) from None


# -- multipart ---------------------------------------------------------------------

async def read_multipart(request: web.Request, received: Received, *, spec: TaskSpec | None) -> None:
    """``POST /jobs`` (``spec`` None): a ``job`` part, then the files. A task route: form fields
    as params and the files, in any order."""
    settings = request.app[SETTINGS_KEY]
    queue = request.app[QUEUE_KEY]
    refuse_undecodable(request)
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError, KeyError) as exc:
        raise InvalidRequest(f"malformed multipart body: {exc}",
                             errors=[{"field": "", "message": "malformed"}]) from None
    budget = settings.max_body_bytes  # the job part and form fields together
    seen: set[str] = set()
    while True:
        part = await _timed(reader.next(), settings.upload_read_timeout_s)
        if part is None:
            break
        if isinstance(part, MultipartReader):
            raise InvalidRequest("nested multipart bodies are not accepted",
                                 errors=[{"field": "", "message": "nested"}])
        name = part.name
        if not name:
            raise InvalidRequest("a multipart part has no name",
                                 errors=[{"field": "", "message": "part without a name"}])
        if not _is_text(name):
            raise InvalidRequest("a multipart part's name is not UTF-8",
                                 errors=[{"field": codec.scrubbed(name), "message": "not UTF-8"}])
        if name in seen:
            raise InvalidRequest(f"the part {name!r} is sent more than once",
                             errors=[{"field": name, "message": "is sent more than once"}])
        seen.add(name)
        if spec is None and received.submit is None:
            if name != "job":
                raise InvalidRequest(f"the first part must be 'job' (the JSON submit body), not {name!r}",
                                 errors=[{"field": name, "message": "comes before the job part"}])
            data = await _read_small(part, name, budget, settings.upload_read_timeout_s)
            budget -= len(data)
            received.submit = _job_part(data, part)
            spec = queue.registry.get(received.submit.task) if isinstance(received.submit.task, str) else None
            queue.check_params(received.submit.task, received.submit.params)  # fail before any file arrives
            continue
        assert spec is not None
        file_param = spec.file_param(name)
        if file_param is None and received.submit is None and part.filename is None:  # a task route's form field
            data = await _read_small(part, name, budget, settings.upload_read_timeout_s)
            budget -= len(data)
            received.fields[name] = _text(data, name)
            continue
        if file_param is None:
            raise InvalidRequest(f"{name}: not a file param of task {spec.name!r}" if spec.files else
                             f"{name}: task {spec.name!r} takes no files",
                             errors=[{"field": name, "message": "unexpected part"}])
        upload = _start_upload(request, spec, file_param, _part_file_name(part.filename),
                               part.headers.get("Content-Type"))
        received.uploads.append(upload)
        await _read_file(part, upload, settings.upload_read_timeout_s)


async def _read_file(part: BodyPartReader, upload: Upload, timeout_s: float) -> None:
    """A file part into its upload; 413 as soon as the file's bytes that arrived cross the limit.

    aiohttp hands out a part's bytes one read behind (it holds the last read back until it knows the
    boundary does not start in it), so a client that stops sending just past the limit would wait for
    a chunk that never comes, and get 408. A watch counts the held bytes too while a read waits (every
    ``HELD_CHECK_S``), and stops that read once they cross the limit: nothing is added to each read."""
    reader = asyncio.current_task()
    assert reader is not None
    watch = _HeldWatch(part, upload, reader)
    watching = asyncio.create_task(watch.run(), name="asyncjobs-upload-watch")
    try:
        while True:
            watch.reading = True
            try:
                chunk = await _timed(part.read_chunk(READ_BYTES), timeout_s)
            except asyncio.CancelledError:
                if not watch.over:
                    raise
                reader.uncancel()  # the watch's own cancel: the answer is the 413
                raise file_too_large(upload.param, upload.files.max_upload_bytes) from None
            finally:
                watch.reading = False
            if not chunk:
                break
            await upload.write(chunk)
        await upload.finish()
    finally:
        watching.cancel()


class _HeldWatch:
    """Stops a file part's read (only while it waits for bytes) once the part is over the limit."""

    def __init__(self, part: BodyPartReader, upload: Upload, reader: asyncio.Task[Any]) -> None:
        self.part, self.upload, self.reader = part, upload, reader
        self.reading = False
        self.over = False

    async def run(self) -> None:
        while True:
            await asyncio.sleep(HELD_CHECK_S)
            if self.reading and self.upload.size + _held_data(self.part) > self.upload.files.max_upload_bytes:
                self.over = True
                self.reader.cancel()
                return


def _held_data(part: BodyPartReader) -> int:
    """At least how many bytes of the part's data aiohttp holds back: its held read, up to where its
    boundary starts (or, where none starts yet, all but what could be the boundary's beginning), less
    the CRLF aiohttp adds in front of the first. 0 where aiohttp keeps it otherwise (another version)."""
    held, boundary = getattr(part, "_prev_chunk", None), getattr(part, "_boundary", None)
    if not isinstance(held, bytes) or not isinstance(boundary, bytes):
        return 0
    sub = b"\r\n" + boundary
    at = held.find(sub)
    data = at if at >= 0 else len(held) - len(sub) + 1
    return max(0, data - 2)


async def _read_small(part: BodyPartReader, name: str, budget: int, timeout_s: float) -> bytes:
    data = bytearray()
    while chunk := await _timed(part.read_chunk(SMALL_READ_BYTES), timeout_s):
        data += chunk
        if len(data) > budget:
            raise TooLarge(f"{name}: the submit body and form fields exceed the limit of"
                                  " server.max_body_bytes")
    return bytes(data)


def _job_part(data: bytes, part: BodyPartReader) -> protocol.Submit:
    content_type = part.headers.get("Content-Type")
    if content_type and not protocol.is_json_content_type(content_type):
        raise UnsupportedType(f"the job part must be application/json, not {content_type}")
    try:
        body = codec.loads(data)
    except codec.JSONDecodeError as exc:
        raise InvalidRequest(f"the job part is not valid JSON: {exc}",
                         errors=[{"field": "job", "message": "not valid JSON"}]) from None
    return protocol.parse_submit(body)


def _part_file_name(name: str | None) -> str | None:
    """Browsers send ``"``, CR and LF in a part's file name as ``%22``, ``%0D``, ``%0A`` (and some clients
    percent-encode the whole name): decode it where it decodes as UTF-8."""
    if not name or "%" not in name:
        return name
    try:
        return unquote(name, errors="strict")
    except UnicodeDecodeError:
        return name


def _text(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"{name}: a form field must be UTF-8 text",
                         errors=[{"field": name, "message": "not UTF-8"}]) from None


def _is_text(text: str) -> bool:
    """Whether a header's text is valid Unicode (aiohttp keeps bytes that are not UTF-8 as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _start_upload(request: web.Request, spec: TaskSpec, param: FileParam, name: str | None,
                  content_type: str | None) -> Upload:
    kind = (content_type or "application/octet-stream").split(";", 1)[0].strip().lower() or \
        "application/octet-stream"
    if not kind.isascii():  # a media type is ASCII (RFC 9110 8.3.1); these bytes could not even be stored
        raise UnsupportedType(f"{param.name}: the Content-Type is not a media type (it has bytes outside ASCII)")
    if not param.accepts(kind):
        raise UnsupportedType(f"{param.name}: {kind} is not accepted (accepted: {', '.join(param.accept)})")
    # A submit that may repeat a job (its key, or an equal job of a unique or reusing task) is answered even
    # past max_total_bytes when it does: its files are then hashed to the end, not refused at once.
    may_repeat = "Idempotency-Key" in request.headers or spec.unique or spec.reuse is not None
    return request.app[QUEUE_KEY].files.upload(param=param.name, name=name, content_type=kind, may_repeat=may_repeat)


# -- raw bodies --------------------------------------------------------------------

async def read_raw(request: web.Request, received: Received, spec: TaskSpec) -> None:
    """The whole body is the task's single file; 413 at once when ``Content-Length`` is over the limit."""
    settings = request.app[SETTINGS_KEY]
    refuse_undecodable(request)
    if len(spec.files) != 1:
        raise UnsupportedType(f"task {spec.name!r} takes {len(spec.files)} files: send multipart/form-data"
                                   if spec.files else f"task {spec.name!r} takes no file; send JSON")
    if request.content_length is not None and request.content_length > settings.max_upload_bytes:
        raise file_too_large(spec.files[0].name, settings.max_upload_bytes)
    name = request.query.get("filename") or _disposition_name(request.headers.get("Content-Disposition"))
    upload = _start_upload(request, spec, spec.files[0], name, request.headers.get("Content-Type"))
    received.uploads.append(upload)
    while chunk := await _timed(request.content.read(READ_BYTES), settings.upload_read_timeout_s):
        await upload.write(chunk)
    await upload.finish()


def _disposition_name(header: str | None) -> str | None:
    if not header:
        return None
    _, params = parse_content_disposition(header)
    return content_disposition_filename(params, "filename")


# -- strings from paths, queries and forms as params --------------------------------

def coerce(values: Mapping[str, str], schema: Mapping[str, Any]) -> dict[str, Any]:
    """Query and form values are strings: turn them into what the task's schema asks, where they parse."""
    properties = schema.get("properties", {})
    out: dict[str, Any] = {}
    for name, value in values.items():
        kind = properties.get(name, {}).get("type")
        out[name] = _convert(value, kind)
    return out


def _convert(value: str, kind: Any) -> Any:
    try:
        if kind == "integer":
            return int(value)
        if kind == "number":
            return float(value)
    except ValueError:
        return value
    if kind == "boolean" and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    return value


# -- how large a body may be ----------------------------------------------------------

def body_limit(request: web.Request, spec: TaskSpec | None) -> int | None:
    """The largest body a route takes: JSON ``max_body_bytes``, one raw file, or a multipart of
    the task's files (on ``POST /jobs``, of the task with the most files)."""
    settings = request.app[SETTINGS_KEY]
    if is_multipart(request):
        specs = [spec] if spec is not None else list(request.app[QUEUE_KEY].registry)
        most_files = max((len(s.files) for s in specs), default=0)
        return settings.max_body_bytes + most_files * settings.max_upload_bytes + MULTIPART_SLACK
    if spec is not None and spec.files:
        return settings.max_upload_bytes
    return settings.max_body_bytes
