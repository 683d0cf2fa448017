"""A task mounted on a GET route (loaded through ``tasks.modules`` by the tests that want it)."""

from __future__ import annotations

from asyncjobs import task


@task(route="GET /lookups/{key}")
async def lookup(key: str) -> dict[str, str]:
    return {"key": key}
