"""The built-in tasks, enabled by the default ``config.toml``."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from .tasks import TaskFailure, task


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
def hash(ctx: Any, data: str, rounds: int) -> str:  # noqa: A001 - the task's wire name
    """CPU-bound: iterated SHA-256, run in a worker thread; returns the hex digest."""
    digest = data.encode()
    report_every = max(1, rounds // 20)
    for i in range(rounds):
        digest = hashlib.sha256(digest).digest()
        if (i + 1) % report_every == 0:
            ctx.progress((i + 1) / rounds, f"{i + 1} of {rounds} rounds")  # also the cancel check
    return digest.hex()
