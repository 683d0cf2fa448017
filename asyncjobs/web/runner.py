"""A runner whose low-level HTTP errors are problem details too."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from .common import problem_response
from .problems import problem_body

log = logging.getLogger("asyncjobs.web")


class _ProblemRequestHandler(RequestHandler):
    """Answers requests the HTTP parser rejects with problem details, not text/html."""

    __slots__ = ()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:
            super().handle_error(request, status, exc, message)  # logs the traceback of a real failure
        else:
            log.info("rejected a malformed request from %s: %s", request.remote, exc or message)
            if request.writer.output_size > 0:
                raise ConnectionError("the answer had started; the connection is closed")
        detail = "the request could not be parsed as HTTP" if status == 400 else "the server failed to answer"
        if status == 400 and exc is not None and getattr(exc, "message", None):
            detail = f"malformed request: {exc.message}"  # type: ignore[attr-defined]
        if isinstance(exc, LineTooLong):
            status, detail = 431, f"a request line or header is too long: {exc.message}"
        problem = problem_response(problem_body(status, detail))
        problem.force_close()
        return problem


class _ProblemServer(Server):
    def __call__(self) -> RequestHandler:
        handler = super().__call__()
        handler.__class__ = _ProblemRequestHandler
        return handler


class ProblemRunner(web.AppRunner):
    """An ``AppRunner`` whose low-level errors (bad request lines, huge headers) are problem details too."""

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _ProblemServer
        return server
