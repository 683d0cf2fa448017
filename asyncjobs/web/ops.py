"""Operations endpoints: ``/metrics`` and ``/openapi.json``; and the access log the runner may write."""

from __future__ import annotations

import logging
import sys
import time
from importlib import metadata
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from .. import codec, protocol
from .common import METRICS_KEY, QUEUE_KEY, SETTINGS_KEY, WAITERS_KEY, expect_handler
from .openapi import build_document

OPENAPI_KEY = web.AppKey("asyncjobs_openapi", bytes)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format; the jobs-by-status and waiting-clients gauges are read now."""
    queue = request.app[QUEUE_KEY]
    counts = await queue.counts()
    waiters = request.app[WAITERS_KEY]
    body = request.app[METRICS_KEY].exposition(counts, {
        "long_poll": waiters.long_polls, "event_stream": waiters.event_streams, "websocket": waiters.websockets},
        (queue.files.bytes, queue.files.count))
    return web.Response(body=body, headers={**protocol.NO_STORE, "Content-Type": CONTENT_TYPE_PLAIN_0_0_4})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI_KEY], content_type="application/json")


def _version() -> str:
    try:
        return metadata.version("asyncjobs")
    except metadata.PackageNotFoundError:
        return "0"


def add_routes(app: web.Application) -> None:
    """Add the operations routes to ``app`` (``/healthz`` and ``/tasks`` live with the REST handlers)."""
    app[OPENAPI_KEY] = codec.dumps(build_document(app[QUEUE_KEY].registry, version=_version(),
                                                  sign_in=bool(app[SETTINGS_KEY].tokens)))
    for path, handler in (("/metrics", metrics), ("/openapi.json", openapi)):
        app.router.add_route("GET", path, handler, expect_handler=expect_handler)
        app.router.add_route("HEAD", path, handler, expect_handler=expect_handler)


# -- the access log --------------------------------------------------------------

class JsonAccessLogger(AbstractAccessLogger):
    """One JSON object a line: time, method, path, status, duration_s, remote, bytes."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, duration_s: float) -> None:
        self.logger.info(codec.dumps({
            "time": codec.isotime(time.time()),
            "method": request.method,
            "path": request.path,
            "status": response.status,
            "duration_s": round(duration_s, 6),
            "remote": request.remote,
            "bytes": response.body_length,
        }).decode())

    @property
    def enabled(self) -> bool:
        return True


class TextAccessLogger(AbstractAccessLogger):
    """aiohttp's line (remote, time, request line, status, bytes, referer, user agent), with the value of an
    ``access_token`` in the query left out: a browser's event stream and socket carry the bearer token there."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, duration_s: float) -> None:
        target = request.rel_url
        if "access_token" in target.query:
            target = target.update_query(access_token="redacted")
        version = f"{request.version.major}.{request.version.minor}"
        when = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime())
        headers = request.headers
        self.logger.info(f'{request.remote} [{when}] "{request.method} {target} HTTP/{version}" {response.status}'
                         f' {response.body_length} "{headers.get("Referer", "-")}"'
                         f' "{headers.get("User-Agent", "-")}"')

    @property
    def enabled(self) -> bool:
        return True


def access_log_options(mode: str) -> dict[str, Any]:
    """The runner's access-log arguments for ``server.access_log``: "off", "text" (aiohttp's) or "json"."""
    if mode == "off":
        return {"access_log": None}
    logger = logging.getLogger("asyncjobs.access")
    if not logger.handlers:  # its own stream, without the service log's prefix: a line is a record
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    if mode == "json":
        return {"access_log": logger, "access_log_class": JsonAccessLogger}
    return {"access_log": logger, "access_log_class": TextAccessLogger}
