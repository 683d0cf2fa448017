"""Tasks used by the tests beside the built-in ones (loaded through ``tasks.modules``)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Literal

from asyncjobs import Blob, TaskFailure, task

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
