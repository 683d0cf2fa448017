"""Tasks for the benchmarks: `stamp` (its result is the moment the handler finished) and `blob` (an upload target)."""

from __future__ import annotations

import asyncio
import time

from asyncjobs import InputFile, task


@task()
async def stamp(delay: float = 0.0) -> float:
    """Waits ``delay`` seconds and returns the wall-clock time it finished (full precision)."""
    if delay:
        await asyncio.sleep(delay)
    return time.time()


@task(route="PUT /blobs/{name}")
async def blob(name: str, file: InputFile) -> dict:
    """Takes one file (raw body on its route, or multipart on `POST /jobs`) and returns its size:
    the upload benchmark's task (bench/files.py), which does nothing with the bytes."""
    return {"name": name, "size": file.size}
