"""What the start gate costs a request on a shared store: aiohttp's middleware chain with and without it.

    python bench/middleware.py [--rounds 7] [--calls 200000]

On PostgreSQL a node may start before its database, so its web app has one more middleware
(``starting_middleware``: 503 until the node has started). This times the chain aiohttp builds for a
route (aiohttp's own, ``problems_middleware`` and the handler, with and without the gate behind
``problems_middleware``), called with a stand-in request (``app`` and ``path``, which is all either middleware reads), in one process, the two
taking turns. It prints the median nanoseconds a call and the difference: what every request to a
PostgreSQL node pays once the node has started. No server, no network: a request's own cost is
hundreds of microseconds (bench/cost.py), far above what this measures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

from aiohttp import web
from aiohttp.web_app import _build_middlewares

from asyncjobs.web.common import QUEUE_KEY, problems_middleware, starting_middleware


class _Started:
    started = True


class _Request:
    """What the middlewares read of a request (aiohttp's own sets the route's app on ``match_info``)."""

    path = "/jobs/abc"

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.match_info = SimpleNamespace(current_app=app)


async def _handler(_request: Any) -> None:
    return None


def _chain(gate: bool) -> tuple[Callable[[Any], Awaitable[Any]], _Request]:
    app = web.Application(middlewares=[problems_middleware, starting_middleware] if gate else [problems_middleware])
    app[QUEUE_KEY] = _Started()  # type: ignore[assignment]
    app.freeze()  # (aiohttp lists the middlewares it calls when the app is frozen)
    return _build_middlewares(_handler, (app,)), _Request(app)  # type: ignore[arg-type]


async def _time(call: Callable[[Any], Awaitable[Any]], request: _Request, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        await call(request)
    return (time.perf_counter() - started) / calls * 1e9


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200_000)
    args = parser.parse_args()
    chains = {gate: _chain(gate) for gate in (False, True)}
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for gate, (call, request) in chains.items():
            times[gate].append(await _time(call, request, args.calls))
    without, with_gate = statistics.median(times[False]), statistics.median(times[True])
    print(f"{os.cpu_count()} cores, Python {platform.python_version()}, {args.rounds} rounds of {args.calls:,} calls")
    print(f"  the chain without the gate: {without:,.0f} ns a request")
    print(f"  with the gate:              {with_gate:,.0f} ns a request")
    print(f"  the gate costs:             {with_gate - without:,.0f} ns a request")


if __name__ == "__main__":
    asyncio.run(main())
