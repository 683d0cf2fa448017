"""The file store: uploaded inputs and file results on local disk, one folder per job.

Layout under ``root``: ``jobs/<job id>/in.<param>`` and ``jobs/<job id>/result`` for
committed files, ``tmp/`` for uploads still arriving, ``work/<job id>.<attempt>/`` for a
handler's outputs. No name a client chose ever becomes a path. A file reaches its
place by write, fsync, rename, fsync of the folder, in that order, so a job that is
committed never points at a partial file; whatever a crash leaves outside that
order is removed by ``sweep_orphans`` at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import secrets
import shutil
import threading
import time
import unicodedata
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .errors import StorageFull, StoreError, TooLarge, Unavailable

log = logging.getLogger("asyncjobs.files")

FLUSH_BYTES = 1 << 20  # an upload is written and hashed off the event loop this much at a time
IOV_MAX = 1024  # buffers one writev takes (the POSIX minimum the kernel allows)
COPY_BYTES = 1 << 20
MAX_NAME_BYTES = 255
RESULT = "result"


@dataclass(frozen=True)
class StoredFile:
    """What the protocol says of a file: ``{"name", "size", "content_type", "sha256"}``."""

    name: str
    size: int
    content_type: str
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "content_type": self.content_type, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StoredFile:
        return cls(data["name"], data["size"], data["content_type"], data["sha256"])


# Bidirectional controls: not Cc, but they reorder what is shown ("\u202egnp.exe" reads as "exe.png").
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def sanitize_name(name: str | None) -> str:
    """A client's file name for display: after the last ``/`` or ``\\``, no control characters (the
    bidirectional ones included), at most 255 bytes of UTF-8, ``file`` when nothing is left."""
    text = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    text = "".join(c for c in text if unicodedata.category(c) not in ("Cc", "Cs") and c not in BIDI_CONTROLS)
    raw = text.encode("utf-8", "replace")[:MAX_NAME_BYTES]
    text = raw.decode("utf-8", "ignore").strip()
    return text or "file"


def _io_error(exc: OSError, what: str) -> Exception:
    """A full disk is the client's 507; any other failure to write is the server's 503."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"the disk filled up while {what}; nothing was kept")
    return Unavailable(f"the file store cannot be written ({exc.strerror or exc}); try again later",
                              retry_after_s=5)


def file_too_large(param: str, limit: int) -> TooLarge:
    """The 413 of a file param over ``files.max_upload_bytes``, wherever that is found out."""
    return TooLarge(f"{param}: the file is larger than the limit of {limit} bytes")


class Upload:
    """One file arriving from a client: streamed into ``tmp/``, hashed and counted on the way."""

    def __init__(self, files: FileStore, *, param: str, name: str | None, content_type: str,
                 may_repeat: bool = False) -> None:
        self.files = files
        self.may_repeat = may_repeat  # the submit may repeat a job: past max_total_bytes, see ``no_room``
        self.param = param
        self.name = sanitize_name(name)
        self.content_type = content_type
        self.path = files.root / "tmp" / f"{secrets.token_hex(12)}.part"
        self.size = 0
        self._hash = hashlib.sha256()
        self._chunks: list[bytes] = []  # received, not yet written: handed to a thread as they are (no copy)
        self._buffered = 0
        self._fd: int | None = None
        self._reserved = 0
        self.stored: StoredFile | None = None
        # Past ``max_total_bytes``: the 507 to answer unless the submit repeats a job (a replay, a reuse),
        # which needs no new file. The bytes are then only hashed, for that comparison, not kept.
        self.no_room: StorageFull | None = None

    async def write(self, chunk: bytes) -> None:
        """Take the next bytes; 413 past ``max_upload_bytes``; past ``max_total_bytes`` see ``no_room``."""
        self.size += len(chunk)
        if self.size > self.files.max_upload_bytes:
            raise file_too_large(self.param, self.files.max_upload_bytes)
        if self.no_room is None:
            try:
                self.files.reserve(self, len(chunk))
            except StorageFull as exc:
                if not self.may_repeat:
                    raise
                self.no_room = exc
                self.discard()  # what was written goes, and its room with it; the rest is hashed only
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered >= FLUSH_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        chunks, self._chunks, self._buffered = self._chunks, [], 0
        await asyncio.get_running_loop().run_in_executor(None, self._write_chunks, chunks)

    def _write_chunks(self, chunks: list[bytes]) -> None:
        """One writev for the batch (resumed after a short write), and the hash over each chunk (only the
        hash once there is ``no_room``)."""
        try:
            views = [] if self.no_room is not None else [memoryview(c) for c in chunks if c]
            if views and self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            fd = self._fd
            while views and fd is not None:
                written = os.writev(fd, views[:IOV_MAX])
                while views and written >= len(views[0]):
                    written -= len(views[0])
                    views.pop(0)
                if written:
                    views[0] = views[0][written:]
        except OSError as exc:
            raise _io_error(exc, f"receiving {self.param}") from exc
        for chunk in chunks:
            self._hash.update(chunk)

    async def finish(self) -> StoredFile:
        """All bytes arrived: write the rest and fsync, so that a rename can put it in place."""
        await self._flush()
        await asyncio.get_running_loop().run_in_executor(None, self._sync_and_close)
        self.stored = StoredFile(self.name, self.size, self.content_type, self._hash.hexdigest())
        return self.stored

    def _sync_and_close(self) -> None:
        if self.no_room is not None:
            return  # nothing kept
        try:
            if self._fd is None:  # an empty file
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.fsync(self._fd)
        except OSError as exc:
            raise _io_error(exc, f"receiving {self.param}") from exc
        finally:
            self._close()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Remove the partial or unplaced file and give its room back (safe to call twice)."""
        self._close()
        self.files.release(self)
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:  # a read-only disk: the start-up sweep removes it later
            log.warning("cannot remove the partial upload %s: %s", self.path.name, exc)


class FileStore:
    """Files of jobs in one folder; tracks their bytes for ``max_total_bytes`` and the metrics."""

    def __init__(self, root: str | Path, *, max_upload_bytes: int, max_total_bytes: int = 0,
                 shared: bool = False) -> None:
        self.root = Path(root)
        # shared: other nodes use the folder at the same time, so what one did not write is left alone
        # unless it is stale (SHARED_STALE_S) or its job is known to be done with it.
        self.shared = shared
        self.careful = shared  # other nodes may be writing here right now (open() knows better)
        self.max_upload_bytes = max_upload_bytes
        self.max_total_bytes = max_total_bytes  # 0: no limit
        self.bytes = 0  # committed files on disk
        self.count = 0
        self._reserved: dict[int, int] = {}  # bytes of uploads still arriving, by Upload id
        self._lock = threading.Lock()  # the counts change on the loop and in file threads

    def _count(self, size: int, files: int) -> None:
        with self._lock:
            self.bytes += size
            self.count += files

    # -- lifecycle ------------------------------------------------------------------
    async def open(self, *, alone: bool = True) -> None:
        """Make the folders and sweep what a dead process left. In a shared folder with other nodes
        running (not ``alone``), only what is stale: they may be writing the rest."""
        self.careful = self.shared and not alone
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._open)
        except OSError as exc:
            raise StoreError(f"files.dir {self.root}: cannot use it: {exc}") from exc

    def _open(self) -> None:
        for folder in ("jobs", "tmp", "work"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        # Whatever is here was left by a process that died; in a shared folder, only what nobody has
        # touched for a long while (an upload in flight writes its part at least every read timeout;
        # work folders of jobs that ended are swept by sweep_orphans).
        for folder in ("tmp",) if self.careful else ("tmp", "work"):
            for entry in (self.root / folder).iterdir():
                if not self.careful or _stale(entry):
                    _remove(entry)
        self.bytes, self.count = 0, 0
        for path in (self.root / "jobs").glob("*/*"):
            self.bytes += path.stat().st_size
            self.count += 1

    async def sweep_orphans(self, jobs: Callable[[list[str]], Awaitable[Mapping[str, tuple[bool, bool]]]]) -> int:
        """Remove what no committed job owns: folders of unknown jobs, inputs of finished jobs,
        result files a job never recorded. ``jobs`` tells, for ids, (terminal, has a file result)."""
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(None, lambda: [p.name for p in (self.root / "jobs").iterdir()])
        work = await loop.run_in_executor(None, lambda: [p.name for p in (self.root / "work").iterdir()])
        asked = sorted({*ids, *(w.rpartition(".")[0] for w in work)})
        known = await jobs(asked) if asked else {}
        return await loop.run_in_executor(None, self._sweep, ids, work, known)

    def _sweep(self, ids: list[str], work: list[str], known: Mapping[str, tuple[bool, bool]]) -> int:
        # In a shared folder another node may be between writing a file and committing its job (an upload
        # placed, a result stored): what is recent is left for a later start to judge.
        removed = 0
        for job_id in ids:
            folder = self.root / "jobs" / job_id
            if job_id not in known:
                if not self.careful or _stale(folder):
                    removed += self._forget(folder)
                continue
            terminal, has_result = known[job_id]
            for path in list(folder.iterdir()):
                if (terminal and path.name.startswith("in.")) or (
                        path.name.partition(".")[0] == RESULT and not has_result
                        and (not self.careful or _stale(path))):
                    removed += self._unlink(path)
        for name in work:  # a job's work folder outlives no attempt: its job is done, or unknown
            job = known.get(name.rpartition(".")[0])
            if job is None or job[0]:
                _remove(self.root / "work" / name)
        if removed:
            log.warning("removed %d files that no committed job owned", removed)
        return removed

    # -- uploads --------------------------------------------------------------------
    def upload(self, *, param: str, name: str | None, content_type: str, may_repeat: bool = False) -> Upload:
        return Upload(self, param=param, name=name, content_type=content_type, may_repeat=may_repeat)

    def reserve(self, upload: Upload, size: int) -> None:
        if not self._take_room(id(upload), size):
            raise StorageFull(f"{upload.param}: the files would exceed the store's limit of"
                                      f" {self.max_total_bytes} bytes; nothing was kept")

    def release(self, upload: Upload) -> None:
        self._release(id(upload))

    def _take_room(self, key: int, size: int) -> bool:
        """Reserve ``size`` more bytes under ``key`` if they fit ``max_total_bytes``: checked and taken at once,
        so files stored together (results finish in threads side by side) cannot all pass one check."""
        with self._lock:
            if self.max_total_bytes and self.bytes + sum(self._reserved.values()) + size > self.max_total_bytes:
                return False
            self._reserved[key] = self._reserved.get(key, 0) + size
            return True

    async def place(self, job_id: str, uploads: list[Upload]) -> None:
        """Rename finished uploads into the job's folder and fsync it: after this, a commit may name them."""
        await asyncio.get_running_loop().run_in_executor(None, self._place, job_id, uploads)

    def _place(self, job_id: str, uploads: list[Upload]) -> None:
        folder = self.job_dir(job_id)
        try:
            folder.mkdir(exist_ok=True)
            for upload in uploads:
                os.replace(upload.path, folder / f"in.{upload.param}")
            _fsync_dir(folder)
            _fsync_dir(folder.parent)
        except OSError as exc:
            raise _io_error(exc, "storing the upload") from exc
        for upload in uploads:
            self.release(upload)
            self._count(upload.size, 1)

    # -- results --------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def input_path(self, job_id: str, param: str) -> Path:
        return self.job_dir(job_id) / f"in.{param}"

    def result_path(self, job_id: str, attempt: int) -> Path:
        """Where the attempt's file result goes. One file an attempt: an attempt whose outcome is discarded (its
        node's lease ended, another node ran the job again) cannot replace the file the job recorded."""
        return self.job_dir(job_id) / f"{RESULT}.{attempt}"

    def open_result(self, job_id: str, attempt: int) -> IO[bytes]:
        """Open the file result of a job that succeeded at ``attempt`` (or, stored before results were kept per
        attempt, its one ``result`` file); blocking: call it from a thread. FileNotFoundError if neither is."""
        try:
            return open(self.result_path(job_id, attempt), "rb")
        except FileNotFoundError:
            return open(self.job_dir(job_id) / RESULT, "rb")

    async def remove_result(self, job_id: str, attempt: int) -> None:
        """Remove an attempt's file result whose outcome was not stored."""
        await asyncio.get_running_loop().run_in_executor(None, self._unlink, self.result_path(job_id, attempt))

    def work_dir(self, job_id: str, attempt: int) -> Path:
        return self.root / "work" / f"{job_id}.{attempt}"

    def store_result(self, job_id: str, attempt: int, source: Path | bytes, *, owned: bool, content_type: str,
                     name: str) -> StoredFile:
        """Put a result in place (blocking: call it from a thread). ``owned``: ``source`` is the
        handler's work file and may be moved; otherwise it is copied. Raises 507 when it cannot fit."""
        size = len(source) if isinstance(source, bytes) else source.stat().st_size
        tmp = self.root / "tmp" / f"{secrets.token_hex(12)}.result"
        key = id(tmp)  # its room is reserved under this key until the file is counted
        if not self._take_room(key, size):
            raise StorageFull(f"the result ({size} bytes) would exceed the store's limit of"
                                      f" {self.max_total_bytes} bytes")
        try:
            if owned and isinstance(source, Path):
                digest = _hash_and_sync(source)
                os.replace(source, tmp)
            else:
                digest = _copy(source, tmp)
            folder = self.job_dir(job_id)
            folder.mkdir(exist_ok=True)
            os.replace(tmp, self.result_path(job_id, attempt))
            _fsync_dir(folder)
            _fsync_dir(folder.parent)
        except BaseException as exc:
            self._release(key)
            if isinstance(exc, OSError):
                tmp.unlink(missing_ok=True)
                raise _io_error(exc, "storing the result") from exc
            raise
        with self._lock:  # counted and unreserved at once
            del self._reserved[key]
            self.bytes += size
            self.count += 1
        return StoredFile(sanitize_name(name), size, content_type, digest)

    def _release(self, key: int) -> None:
        with self._lock:
            self._reserved.pop(key, None)

    # -- removal --------------------------------------------------------------------
    async def remove_inputs(self, job_id: str) -> None:
        """A finished job's inputs can never be read again."""
        folder = self.job_dir(job_id)

        def remove() -> None:
            for path in folder.glob("in.*"):
                self._unlink(path)
            with contextlib.suppress(OSError):  # left in place while it holds a result
                folder.rmdir()

        await asyncio.get_running_loop().run_in_executor(None, remove)

    async def remove_job(self, job_id: str) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._forget, self.job_dir(job_id))

    async def remove_jobs(self, job_ids: list[str]) -> None:
        def forget_all() -> None:
            for job_id in job_ids:
                self._forget(self.job_dir(job_id))

        await asyncio.get_running_loop().run_in_executor(None, forget_all)

    def remove_work(self, job_id: str, attempt: int) -> None:
        _remove(self.work_dir(job_id, attempt))

    def _unlink(self, path: Path) -> int:
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        except OSError as exc:  # a read-only disk: the start-up sweep removes it later
            log.warning("cannot remove %s: %s", path, exc)
            return 0
        self._count(-size, -1)
        return 1

    def _forget(self, folder: Path) -> int:
        try:
            paths = [p for p in folder.iterdir() if p.is_file()]
        except OSError:  # no such folder: the job had no files left
            return 0
        removed = sum(self._unlink(p) for p in paths)
        shutil.rmtree(folder, ignore_errors=True)
        return removed


SHARED_STALE_S = 3600.0  # in a shared folder, what nobody touched for this long was left by a dead node


def _stale(path: Path) -> bool:
    """Whether ``path`` (and, for a folder, each entry in it) was last modified SHARED_STALE_S ago or more."""
    try:
        times = [path.stat().st_mtime]
        if path.is_dir():
            times += [p.stat().st_mtime for p in path.iterdir()]
    except OSError:
        return False
    return time.time() - max(times) >= SHARED_STALE_S


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_and_sync(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb+") as file:
        while chunk := file.read(COPY_BYTES):
            digest.update(chunk)
        os.fsync(file.fileno())
    return digest.hexdigest()


def _copy(source: Path | bytes, target: Path) -> str:
    digest = hashlib.sha256()
    with open(target, "xb") as out:
        if isinstance(source, bytes):
            digest.update(source)
            out.write(source)
        else:
            with open(source, "rb") as src:
                while chunk := src.read(COPY_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def default_dir(store_path: str) -> Path:
    """Beside the SQLite file: ``jobs.db`` keeps its files in ``jobs.files/``."""
    path = Path(store_path)
    return path.with_name(f"{path.stem}.files")
