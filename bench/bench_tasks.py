"""Tasks for the benchmarks: their results carry the moment the handler finished."""

from __future__ import annotations

import asyncio
import time

from asyncjobs import task


@task()
async def stamp(delay: float = 0.0) -> float:
    """Waits ``delay`` seconds and returns the wall-clock time it finished (full precision)."""
    if delay:
        await asyncio.sleep(delay)
    return time.time()
