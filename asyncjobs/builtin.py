"""The built-in tasks, enabled by the default ``config.toml``."""

from __future__ import annotations

import asyncio
import gzip as gzip_module
import hashlib
from typing import Any

from .tasks import FileResult, InputFile, TaskFailure, task

CHUNK_BYTES = 1 << 20


@task()
async def noop() -> None:
    """Returns null at once."""
    return None


@task()
async def echo(**params: Any) -> dict[str, Any]:
    """Returns its params."""
    return params


@task(schema={
    "type": "object",
    "properties": {
        "seconds": {"type": "number", "minimum": 0, "maximum": 86400},
        "steps": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 10},
    },
    "required": ["seconds"],
    "additionalProperties": False,
})
async def sleep(ctx: Any, seconds: float, steps: int = 10) -> dict[str, float]:
    """Sleeps, reporting progress ``steps`` times; returns ``{"slept": seconds}``."""
    for step in range(1, steps + 1):
        await asyncio.sleep(seconds / steps)
        await ctx.progress(step / steps, f"step {step} of {steps}")
    return {"slept": seconds}


@task()
async def fail(message: str = "failed on purpose") -> None:
    """Raises; the job fails with error type "exception"."""
    raise TaskFailure(message)


@task(schema={
    "type": "object",
    "properties": {
        "data": {"type": "string", "maxLength": 1_000_000},
        "rounds": {"type": "integer", "minimum": 1, "maximum": 100_000_000},
    },
    "required": ["data", "rounds"],
    "additionalProperties": False,
})
def hash(ctx: Any, data: str, rounds: int) -> str:
    """CPU-bound: iterated SHA-256, run in a worker thread; returns the hex digest."""
    digest = data.encode()
    report_every = max(1, rounds // 20)
    for i in range(rounds):
        digest = hashlib.sha256(digest).digest()
        if (i + 1) % report_every == 0:
            ctx.progress((i + 1) / rounds, f"{i + 1} of {rounds} rounds")  # also the cancel check
    return digest.hex()


@task()
def digest(file: InputFile) -> dict[str, Any]:
    """Returns the SHA-256 (hex) and size of the uploaded file, read back from disk."""
    sha, size = hashlib.sha256(), 0
    with open(file.path, "rb") as data:
        while chunk := data.read(CHUNK_BYTES):
            sha.update(chunk)
            size += len(chunk)
    return {"sha256": sha.hexdigest(), "size": size}


@task(schema={
    "type": "object",
    "properties": {"level": {"type": "integer", "minimum": 0, "maximum": 9, "default": 6}},
    "additionalProperties": False,
})
def gzip(ctx: Any, file: InputFile, level: int = 6) -> FileResult:
    """Returns the file gzip-compressed, named after the input with ``.gz``; progress by bytes read."""
    out = ctx.output_path("out.gz")
    done = 0
    with open(file.path, "rb") as data, gzip_module.open(out, "wb", compresslevel=level) as packed:
        while chunk := data.read(CHUNK_BYTES):
            packed.write(chunk)
            done += len(chunk)
            ctx.progress(done / file.size if file.size else 1.0, f"{done} of {file.size} bytes")
    return FileResult(out, "application/gzip", f"{file.name}.gz")


@task(schema={
    "type": "object",
    "properties": {
        "size": {"type": "integer", "minimum": 0, "maximum": 1 << 40},
        "seed": {"type": "string", "maxLength": 1000, "default": ""},
    },
    "required": ["size"],
    "additionalProperties": False,
})
def bytes(ctx: Any, size: int, seed: str = "") -> FileResult:
    """Returns a file of ``size`` bytes: block i is SHA-256 of ``f"{seed}:{i}"``, concatenated and cut."""
    out = ctx.output_path(f"bytes-{size}.bin")
    with open(out, "wb") as data:
        written, block, batch = 0, 0, bytearray()
        while written < size:
            batch += hashlib.sha256(f"{seed}:{block}".encode()).digest()
            block += 1
            if len(batch) >= CHUNK_BYTES or written + len(batch) >= size:
                piece = batch[:size - written]
                data.write(piece)
                written += len(piece)
                batch.clear()
                ctx.progress(written / size, f"{written} of {size} bytes")
    return FileResult(out, "application/octet-stream", f"bytes-{size}.bin")
