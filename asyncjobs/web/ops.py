"""Operations endpoints: metrics and the OpenAPI description (filled in by the operations work)."""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application) -> None:
    """Add the operations routes to ``app``."""
