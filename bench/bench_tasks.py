"""Tasks for the benchmarks: `stamp` (its result is the moment the handler finished), `blob` (an upload
target), `ticker` (progress reports that carry the moment they were made) and `pause` (a fixed short job that
reports when its handler started)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from asyncjobs import InputFile, task


@task()
async def stamp(delay: float = 0.0) -> float:
    """Waits ``delay`` seconds and returns the wall-clock time it finished (full precision)."""
    if delay:
        await asyncio.sleep(delay)
    return time.time()


@task()
async def ticker(ctx: Any, reports: int = 50, every: float = 0.1) -> int:
    """Reports progress ``reports`` times, ``every`` seconds apart, each report's message the wall-clock time
    it was made (full precision): the cross-node progress benchmark's job (bench/pg_wake.py)."""
    for i in range(reports):
        await asyncio.sleep(every)
        await ctx.progress((i + 1) / reports, repr(time.time()))
    return reports


@task()
async def pause(ms: float = 10.0) -> dict:
    """Sleeps ``ms`` milliseconds; returns ``{"started": t}``, the wall-clock time the handler began (full
    precision, unlike the job's millisecond ``started_at``): the fairness benchmark's job (bench/fairness.py)."""
    started = time.time()
    await asyncio.sleep(ms / 1000)
    return {"started": started}


@task(route="PUT /blobs/{name}")
async def blob(name: str, file: InputFile) -> dict:
    """Takes one file (raw body on its route, or multipart on `POST /jobs`) and returns its size:
    the upload benchmark's task (bench/files.py), which does nothing with the bytes."""
    return {"name": name, "size": file.size}
