"""Upload buffering alone: `asyncjobs.files.Upload` against two ways of batching without its copies.

    python bench/upload_buffer.py [--size-mib 1024] [--rounds 5]

No HTTP and no fsync: one event loop in this process, pinned to core 0 with its
executor threads (as bench/files.py pins the server), feeds `--size-mib` MiB
to an upload in 256 KiB chunks, each a fresh bytes object (as aiohttp's reads
are), into a temp folder on the same disk as bench/files.py's stores; the
upload's batches are written and hashed in the default executor; the file is
then discarded. Variants:
- `asyncjobs`: `Upload` as it is (a bytearray grown by each chunk, copied to
  bytes at 1 MiB, then `os.write` + SHA-256 in a thread);
- `join`: the chunks kept in a list, `b"".join` at 1 MiB (the ceiling's way,
  bench/bare_files.py);
- `writev`: the chunks kept in a list and handed to the thread as they are:
  `os.writev` + SHA-256 of each chunk, no copy at all;
- `chunks only`: the same fresh chunks, dropped (what feeding costs by itself).
`join` and `writev` are subclasses that replace `write`, `_flush` and
`_write_data` (they follow `Upload`'s private parts; adjust them if it changes).
Rounds interleave the variants. Per variant, medians: MiB/s, the event-loop
thread's CPU seconds per GiB (`time.thread_time`) and its minor page faults
per GiB (`getrusage(RUSAGE_THREAD)`), and the process's page faults per GiB.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from asyncjobs.files import FLUSH_BYTES, FileStore, Upload, _io_error

CHUNK = 256 * 1024
MIB = 1 << 20


class JoinUpload(Upload):
    """The ceiling's batching: a list of chunks, joined once per 1 MiB."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._chunks: list[bytes] = []
        self._pending = 0

    async def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self.files.reserve(self, len(chunk))
        self._chunks.append(chunk)
        self._pending += len(chunk)
        if self._pending >= FLUSH_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        chunks, self._chunks, self._pending = self._chunks, [], 0
        if chunks:
            await asyncio.get_running_loop().run_in_executor(None, self._write_data, b"".join(chunks))


class WritevUpload(JoinUpload):
    """No copy: the chunks go to the thread as they are, written with one writev and hashed one by one."""

    async def _flush(self) -> None:
        chunks, self._chunks, self._pending = self._chunks, [], 0
        if chunks:
            await asyncio.get_running_loop().run_in_executor(None, self._write_chunks, chunks)

    def _write_chunks(self, chunks: list[bytes]) -> None:
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            views = [memoryview(c) for c in chunks]
            while views:  # one writev, resumed after a short write
                n = os.writev(self._fd, views)
                while views and n >= len(views[0]):
                    n -= len(views[0])
                    views.pop(0)
                if views and n:
                    views[0] = views[0][n:]
        except OSError as exc:
            raise _io_error(exc, f"receiving {self.param}") from exc
        for chunk in chunks:
            self._hash.update(chunk)


VARIANTS = {"asyncjobs": Upload, "join": JoinUpload, "writev": WritevUpload, "chunks only": None}


async def feed(store: FileStore, kind: type[Upload] | None, source: bytes, size: int) -> dict:
    """One upload of ``size`` bytes; the loop thread's CPU and page faults, the process's page faults."""
    upload = kind(store, param="file", name="bench.bin", content_type="application/octet-stream") if kind else None
    faults0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    proc0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cpu0, t0 = time.thread_time(), time.perf_counter()
    offset = 0
    for _ in range(size // CHUNK):
        chunk = source[offset:offset + CHUNK]  # a fresh bytes object, as a socket read gives
        offset = (offset + CHUNK) % len(source)
        if upload is not None:
            await upload.write(chunk)
    if upload is not None:
        await upload._flush()  # the last batch; no fsync (finish() would add the disk)
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "loop_cpu": time.thread_time() - cpu0,
           "loop_faults": resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults0,
           "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - proc0}
    if upload is not None:
        upload.discard()
    return out


async def run(size: int, rounds: int, root: Path) -> dict[str, list[dict]]:
    store = FileStore(root, max_upload_bytes=size)
    await store.open()
    source = os.urandom(8 * MIB)
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for r in range(-1, rounds):  # round -1 warms up (threads, heap), not counted
        for name in (names if r % 2 == 0 else names[::-1]):
            os.sync()
            await asyncio.sleep(0.5)
            result = await feed(store, VARIANTS[name], source, size)
            if r >= 0:
                results[name].append(result)
                print(f"  round {r + 1} {name:<12} {size / MIB / result['seconds']:6.0f} MiB/s, loop CPU"
                      f" {result['loop_cpu']:.2f} s, loop page faults {result['loop_faults']},"
                      f" process page faults {result['faults']}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not 1 <= args.size_mib <= 16384 or not 1 <= args.rounds <= 20:
        raise SystemExit("--size-mib 1..16384, --rounds 1..20")
    size = args.size_mib * MIB // CHUNK * CHUNK
    os.sched_setaffinity(0, {0})
    root = Path(tempfile.mkdtemp(prefix="asyncjobs-upload-buffer-"))
    try:
        print(f"{args.size_mib} MiB per upload in 256 KiB chunks, {args.rounds} rounds, pinned to core 0,"
              f" files in {root}")
        results = asyncio.run(run(size, args.rounds, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    gib = size / (1 << 30)
    print()
    print(f"{'variant':<14}{'MiB/s':>8}{'loop CPU s/GiB':>16}{'loop faults/GiB':>17}{'process faults/GiB':>20}")
    for name, recs in results.items():
        med = {k: statistics.median(r[k] for r in recs) for k in recs[0]}
        print(f"{name:<14}{size / MIB / med['seconds']:>8.0f}{med['loop_cpu'] / gib:>16.2f}"
              f"{med['loop_faults'] / gib:>17.0f}{med['faults'] / gib:>20.0f}")


if __name__ == "__main__":
    main()
