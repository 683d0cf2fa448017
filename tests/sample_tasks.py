"""Tasks used by the tests beside the built-in ones (loaded through ``tasks.modules``)."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from typing import Any, Literal

from pathlib import Path

from asyncjobs import Blob, FileResult, InputFile, TaskFailure, task

# Per-process counters the tests read through the tasks themselves.
_attempts: dict[str, int] = {}
_lock = threading.Lock()


@task(route="POST /thumbnails")
async def thumbnail(url: str, width: int = 128) -> dict[str, Any]:
    """A task mounted on its own route."""
    return {"url": url, "width": width}


@task(route="DELETE /items/{item_id}")
async def delete_item(item_id: str) -> dict[str, str]:
    return {"deleted": item_id}


@task()
async def typed(name: str, count: int, ratio: float = 1.0, mode: Literal["a", "b"] = "a",
                tags: list[str] | None = None) -> dict[str, Any]:
    """Params validated from the signature."""
    return {"name": name, "count": count, "ratio": ratio, "mode": mode, "tags": tags}


@task()
async def block(ctx: Any, seconds: float = 60.0) -> str:
    """An async handler that waits until canceled (or ``seconds`` pass)."""
    await asyncio.sleep(seconds)
    return "done"


@task()
def spin(ctx: Any, seconds: float = 60.0) -> str:
    """A sync handler that checks for cancellation through progress reports."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ctx.progress(None, "spinning")
        time.sleep(0.01)
    return "spun"


@task()
def stubborn(seconds: float = 3.0) -> str:
    """A sync handler that never checks for cancellation."""
    time.sleep(seconds)
    return "finished anyway"


@task(timeout=0.3)
async def slow(seconds: float = 5.0) -> str:
    await asyncio.sleep(seconds)
    return "too late"


@task(retries=2, retry_delay=0.05)
async def flaky(key: str, fail_times: int = 1) -> dict[str, int]:
    """Fails ``fail_times`` times per key, then succeeds."""
    with _lock:
        _attempts[key] = _attempts.get(key, 0) + 1
        n = _attempts[key]
    if n <= fail_times:
        raise RuntimeError(f"flaky failure {n}")
    return {"attempt": n}


@task()
async def custom_error() -> None:
    raise TaskFailure("the input was rejected upstream", type="upstream_rejected")


@task()
async def binary() -> Blob:
    return Blob(b"\x89PNG fake image", "image/png")


@task(retries=3)
async def hold(ctx: Any, seconds: float = 30.0) -> str:
    """Long enough to be interrupted by a kill; allows retries."""
    await asyncio.sleep(seconds)
    return "held"


@task(concurrency=1)
async def one_at_a_time(seconds: float = 0.2) -> float:
    await asyncio.sleep(seconds)
    return time.time()


@task(unique=True)
async def dedupe(key: str, seconds: float = 1.0) -> str:
    """A task declared unique: equal params share one live job."""
    await asyncio.sleep(seconds)
    return key


@task(retries=2, retry_delay=0.05)
async def ask_retry(key: str, delay_s: float = 0.3, times: int = 1) -> int:
    """Asks for a retry explicitly (``times`` times per key), after ``delay_s``."""
    from asyncjobs import Retry

    with _lock:
        _attempts[key] = _attempts.get(key, 0) + 1
        n = _attempts[key]
    if n <= times:
        raise Retry(f"not yet ({n})", delay_s=delay_s)
    return n


# -- files --------------------------------------------------------------------------

@task(route="PUT /uploads/{name}")
async def store_upload(name: str, file: InputFile, tag: str = "", copies: int = 1) -> dict[str, Any]:
    """One file param on a raw-body route: path and query give the other params."""
    return {"name": name, "tag": tag, "copies": copies, "file_name": file.name, "size": file.size,
            "content_type": file.content_type, "sha256": file.sha256, "on_disk": file.path.stat().st_size}


@task(route="POST /pairs", accept={"left": ["text/*"]})
async def pair(left: InputFile, right: InputFile | None = None, label: str = "") -> dict[str, Any]:
    """Two file params, one optional; the first takes text only."""
    return {"label": label, "left": left.sha256, "right": right.sha256 if right else None}


@task()
async def hold_file(ctx: Any, file: InputFile, seconds: float = 30.0) -> str:
    """Holds its upload while it runs, so the tests can look at the folder meanwhile."""
    await asyncio.sleep(seconds)
    return file.sha256


@task()
def write_output(ctx: Any, size: int, name: str = "report.txt", return_it: bool = True) -> FileResult | None:
    """Writes ``size`` bytes to a path the context gives; returns it, or leaves it as the only output."""
    path = ctx.output_path(name)
    path.write_bytes(b"r" * size)
    return FileResult(path, "text/plain; charset=utf-8", name) if return_it else None


@task(retries=1)
def late_file(ctx: Any, first_s: float = 4.0) -> FileResult:
    """A file result that names the attempt that made it; the first attempt takes ``first_s`` (ignoring
    cancels), later ones a moment."""
    time.sleep(first_s if ctx.attempt == 1 else 0.2)
    path = ctx.output_path("attempt.txt")
    path.write_text(f"made by attempt {ctx.attempt}")
    return FileResult(path, "text/plain; charset=utf-8", "attempt.txt")


@task()
async def big_blob(size: int) -> Blob:
    """A bytes result large enough to be stored as a file."""
    return Blob(b"b" * size, "application/x-test")


@task()
async def gc_settings() -> dict[str, Any]:
    """The serving process's garbage collection settings (``asyncjobs serve`` tunes them)."""
    return {"threshold": list(gc.get_threshold()), "frozen": gc.get_freeze_count()}


@task()
async def missing_file() -> FileResult:
    return FileResult(Path("/nonexistent/asyncjobs-test-file"), "text/plain")


@task()
def fill(ctx: Any, size: int) -> FileResult:
    """A file result of ``size`` bytes, written quickly (1 MiB at a time)."""
    path = ctx.output_path("fill.bin")
    block = bytes(range(256)) * 4096
    with open(path, "wb") as out:
        left = size
        while left > 0:
            left -= out.write(block[:min(left, len(block))])
    return FileResult(path)


@task(route="PUT /texts/{name}", accept={"text": ["text/*"]}, unique=True)
async def text_upload(ctx: Any, name: str, text: InputFile, seconds: float = 0.0) -> int:
    """A raw-body route that takes text only; unique, so equal uploads share one live job."""
    await asyncio.sleep(seconds)
    return text.size


@task(retries=1)
async def whoami(ctx: Any, seconds: float = 0.5, steps: int = 2) -> dict[str, int]:
    """Reports progress ``steps`` times over ``seconds``; returns which process ran which attempt."""
    for step in range(steps):
        await asyncio.sleep(seconds / max(1, steps))
        await ctx.progress((step + 1) / max(1, steps), f"step {step + 1}")
    return {"pid": os.getpid(), "attempt": ctx.attempt}


# Runs of ``nap`` and ``work`` in this process: (tag, monotonic start, monotonic end).
runs: list[tuple[str, float, float]] = []


def _record(tag: str, seconds: float) -> str:
    began = time.monotonic()
    time.sleep(seconds)
    with _lock:
        runs.append((tag, began, time.monotonic()))
    return tag


@task(timeout=0.5)
def nap(tag: str, seconds: float) -> str:
    """A sync handler with a 0.5 s timeout that never checks for cancellation; each run is recorded."""
    return _record(tag, seconds)


@task()
def work(tag: str, seconds: float) -> str:
    """A sync handler (no retries: it has side effects) that never checks for cancellation; runs recorded."""
    return _record(tag, seconds)


@task()
def exits(code: int = 3) -> None:
    """A sync handler that ends as a wrapped command-line program would: ``sys.exit``."""
    raise SystemExit(code)


@task()
async def two_reports(ctx: Any, hold: float = 5.0) -> str:
    """Two progress reports 0.1 s apart, then quiet work: the second falls inside the store's half second."""
    await ctx.progress(0.1, "first")
    await asyncio.sleep(0.1)
    await ctx.progress(0.2, "second")
    await asyncio.sleep(hold)
    return "done"


@task()
async def odd_name_progress(ctx: Any, hold: float = 1.0) -> str:
    """Reports a file name as the file system gives it: bytes that are not UTF-8 kept as lone surrogates."""
    await ctx.progress(0.5, "file " + os.fsdecode(b"\xff.bin"))
    await asyncio.sleep(hold)
    return "done"


@task()
async def markup(text: str = "hello") -> Blob:
    """Returns markup a user gave: an SVG picture that carries a script."""
    return Blob(f'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script><text>{text}</text></svg>'
                .encode(), "image/svg+xml")
