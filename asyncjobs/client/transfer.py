"""Files on the wire for the client: a multipart upload read from disk, a download written to disk."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hashlib
import os
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from .. import codec
from . import rules
from .errors import ClientError, ProtocolError

__all__ = ["CHUNK_BYTES", "BinaryWriter", "Download", "FileArg", "FileSink", "Progress", "Restart", "Sink",
           "StreamSink", "Upload", "upload_files"]

CHUNK_BYTES = 256 * 1024  # read and sent per step: big enough to keep the pipe full, small enough to show progress
Progress = Callable[[int, "int | None"], None]  # (bytes done, bytes in all, None when the server did not say)
FileArg = str | os.PathLike[str] | tuple[str | os.PathLike[str], str]  # a path, or (path, content type)


class BinaryWriter(Protocol):
    """Where a download may go instead of a path: anything with ``write(bytes)`` and ``flush()``."""

    def write(self, data: bytes, /) -> object: ...

    def flush(self) -> object: ...


# -- upload --------------------------------------------------------------------------------

@dataclass(frozen=True)
class UploadFile:
    """One file param of a submit, as found on disk before anything is sent."""

    param: str
    path: Path
    filename: str  # the base name, sent for display
    content_type: str
    size: int


def upload_files(files: Mapping[str, FileArg]) -> list[UploadFile]:
    """The files of a submit, each checked to be a readable regular file now (``OSError`` otherwise),
    so a wrong path fails before any request is made."""
    found = []
    for param, value in files.items():
        path, content_type = (value[0], value[1]) if isinstance(value, tuple) else (value, None)
        path = Path(path)
        with path.open("rb") as handle:  # FileNotFoundError, IsADirectoryError, PermissionError: now
            size = os.fstat(handle.fileno()).st_size
        found.append(UploadFile(param, path, path.name, content_type or rules.guess_content_type(path.name), size))
    return found


class Upload:
    """The ``multipart/form-data`` body of a submit with files: the ``job`` part, then one part per file.

    Each iteration reads the files from disk afresh, a chunk at a time, so a retried submit sends
    them again from the start. A watchdog (``watch``) fails the exchange when no chunk went out for
    ``idle_s``, or no answer came ``answer_s`` after the last one: a large upload may take longer
    than any fixed limit, a stalled one may not.
    """

    def __init__(self, job: Mapping[str, Any], files: list[UploadFile], *, progress: Progress | None,
                 idle_s: float, answer_s: float) -> None:
        self.boundary = "asyncjobs-" + secrets.token_hex(16)
        self.job = codec.dumps(dict(job))
        self.files = files
        self.progress = progress
        self.idle_s = idle_s
        self.answer_s = answer_s
        self.total = sum(f.size for f in files)
        self.failure: BaseException | None = None  # a local error while reading, not the connection's fault
        self._timer: asyncio.Timeout | None = None

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def _heads(self) -> list[bytes]:
        job = rules.form_part_head(self.boundary, "job", "application/json")
        return [job, *(rules.form_part_head(self.boundary, f.param, f.content_type, filename=f.filename)
                        for f in self.files)]

    @property
    def length(self) -> int:
        """The body's exact size (sent as ``Content-Length``, so the server knows it up front)."""
        framing = sum(len(head) + len(rules.PART_END) for head in self._heads())
        return framing + len(self.job) + self.total + len(rules.form_end(self.boundary))

    @contextlib.asynccontextmanager
    async def watch(self) -> AsyncIterator[None]:
        """Limit the exchange that sends this body (``TimeoutError`` as ``asyncio.timeout`` raises it)."""
        async with asyncio.timeout(self.idle_s) as timer:
            self._timer = timer
            try:
                yield
            finally:
                self._timer = None

    def _touch(self, seconds: float) -> None:
        """Move the watchdog's deadline (the body is sent by aiohttp's task: the timer may have fired)."""
        if self._timer is not None and not self._timer.expired():
            self._timer.reschedule(asyncio.get_running_loop().time() + seconds)

    def _report(self, sent: int) -> None:
        if self.progress is not None:
            self.progress(sent, self.total)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        self.failure = None
        heads = self._heads()
        self._report(0)
        yield heads[0] + self.job + rules.PART_END
        sent = 0
        for head, upload in zip(heads[1:], self.files):
            yield head
            async for chunk in self._read(upload):
                yield chunk  # resumed once aiohttp has written it: now it has gone out
                sent += len(chunk)
                self._touch(self.idle_s)
                self._report(sent)
            yield rules.PART_END
        yield rules.form_end(self.boundary)
        self._touch(self.answer_s)

    async def _read(self, upload: UploadFile) -> AsyncIterator[bytes]:
        """The file's bytes; exactly ``size`` of them, since ``Content-Length`` already promised that many."""
        try:
            handle = await asyncio.to_thread(upload.path.open, "rb")
            try:
                left = upload.size
                while left > 0:
                    chunk = await asyncio.to_thread(handle.read, min(CHUNK_BYTES, left))
                    if not chunk:
                        break
                    left -= len(chunk)
                    yield chunk
                longer = await asyncio.to_thread(handle.read, 1)
                if left or longer:
                    raise ClientError(f"{upload.path} changed size while it was being sent")
            finally:
                handle.close()
        except (OSError, ClientError) as exc:
            self.failure = exc
            raise


# -- download ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Download:
    """A downloaded result, complete and checked."""

    path: Path | None  # where it was written (None: into a stream)
    size: int
    sha256: str  # of the whole file, lowercase hex
    content_type: str
    name: str | None  # the server's file name (``Content-Disposition``), for display; may be unsafe as a path
    resumed_from: int = 0  # bytes kept from an interrupted download (0: all of it came now)


class Restart(Exception):
    """What was kept of an interrupted download cannot be continued: drop it and start from zero."""


class Sink(abc.ABC):
    """Where a download's bytes go; keeps the SHA-256 of everything written so far."""

    def __init__(self) -> None:
        self.hasher = hashlib.sha256()
        self.size = 0

    @abc.abstractmethod
    def held(self) -> tuple[int, str | None]:
        """Bytes already held from an earlier try, and the strong ETag they belong to."""

    @abc.abstractmethod
    async def begin(self, offset: int, etag: str | None, total: int | None) -> None:
        """Start writing at ``offset`` (0, or what ``held`` said) for a representation tagged ``etag``."""

    @abc.abstractmethod
    def write(self, chunk: bytes) -> None:
        """Append ``chunk``."""

    @abc.abstractmethod
    async def complete(self) -> Path | None:
        """All bytes are in and checked: put them in place."""

    def suspend(self) -> None:
        """The download stopped early: keep what can be resumed, drop the rest."""

    def discard(self) -> None:
        """Forget what was written (it was wrong)."""


class FileSink(Sink):
    """Writes into ``<path>.part`` and renames it to ``path`` once complete and checked.

    While the download runs, ``<path>.part.json`` holds the strong ``ETag`` of what ``.part`` holds,
    so that a later download to the same path asks only for the rest (``Range`` + ``If-Range``).
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.part = path.with_name(path.name + ".part")
        self.meta = path.with_name(path.name + ".part.json")
        self._handle: IO[bytes] | None = None

    def held(self) -> tuple[int, str | None]:
        try:
            meta = codec.loads(self.meta.read_bytes())
            have = self.part.stat().st_size
        except (OSError, ValueError):
            self.discard()
            return 0, None
        etag = meta.get("etag") if isinstance(meta, dict) else None
        size = meta.get("size") if isinstance(meta, dict) else None
        if not rules.is_strong_etag(etag) or (isinstance(size, int) and have > size):
            self.discard()
            return 0, None
        return have, etag

    async def begin(self, offset: int, etag: str | None, total: int | None) -> None:
        self.hasher, self.size = hashlib.sha256(), 0
        if offset == 0:
            with contextlib.suppress(FileNotFoundError):
                self.meta.unlink()  # the sidecar goes first: a .part without one is never resumed
            self._handle = self.part.open("wb")
            if rules.is_strong_etag(etag):
                self.meta.write_bytes(codec.dumps({"etag": etag, "size": total}))
            return
        self._handle = self.part.open("r+b")
        await asyncio.to_thread(self._hash_held, offset)

    def _hash_held(self, offset: int) -> None:
        """Read back what the part holds (the digest covers the whole file), up to ``offset``."""
        assert self._handle is not None
        while self.size < offset:
            chunk = self._handle.read(min(CHUNK_BYTES, offset - self.size))
            if not chunk:
                raise Restart
            self.hasher.update(chunk)
            self.size += len(chunk)
        self._handle.truncate(offset)

    def write(self, chunk: bytes) -> None:
        assert self._handle is not None
        self._handle.write(chunk)  # to the page cache: quicker than a hop to a thread per chunk
        self.hasher.update(chunk)
        self.size += len(chunk)

    async def complete(self) -> Path | None:
        handle, self._handle = self._handle, None
        assert handle is not None
        await asyncio.to_thread(_sync_and_close, handle)
        os.replace(self.part, self.path)
        with contextlib.suppress(FileNotFoundError):
            self.meta.unlink()
        return self.path

    def suspend(self) -> None:
        self._close()
        if not self.meta.exists():  # without a validator it can never be resumed
            self.discard()

    def discard(self) -> None:
        self._close()
        for path in (self.meta, self.part):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()


def _sync_and_close(handle: IO[bytes]) -> None:
    with handle:
        handle.flush()
        os.fsync(handle.fileno())


class StreamSink(Sink):
    """Writes into an open binary stream (stdout, say); resumes within one call, never restarts."""

    def __init__(self, stream: BinaryWriter) -> None:
        super().__init__()
        self.stream = stream
        self.etag: str | None = None

    def held(self) -> tuple[int, str | None]:
        return (self.size, self.etag) if self.etag else (0, None)

    async def begin(self, offset: int, etag: str | None, total: int | None) -> None:
        if offset != self.size:
            raise ProtocolError(f"the download restarted after {self.size} bytes were written to a stream")
        self.etag = etag if rules.is_strong_etag(etag) else None

    def write(self, chunk: bytes) -> None:
        self.stream.write(chunk)
        self.hasher.update(chunk)
        self.size += len(chunk)

    async def complete(self) -> Path | None:
        self.stream.flush()
        return None

    def discard(self) -> None:
        self.etag = None  # written bytes cannot be taken back: never resume onto them
