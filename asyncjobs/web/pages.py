"""HTML views for browsers: the job page and the dashboard (filled in by the browser work)."""

from __future__ import annotations

from aiohttp import web


def wants_html(request: web.Request) -> bool:
    """A browser asking for a page rather than JSON."""
    return False


async def job_page(request: web.Request) -> web.StreamResponse:
    raise web.HTTPNotAcceptable()


def add_routes(app: web.Application) -> None:
    """Add the page routes to ``app``."""
