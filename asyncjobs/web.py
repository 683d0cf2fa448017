"""The web layer: aiohttp handlers that do I/O around the pure decisions of ``protocol``."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from . import codec, protocol
from .errors import BadRequest, PayloadTooLarge, ProblemError, UnsupportedMediaType
from .models import Job
from .queue import JobQueue
from .tasks import TaskSpec

log = logging.getLogger("asyncjobs.web")

PROBLEM_TYPE = "application/problem+json"


@dataclass(frozen=True)
class WebSettings:
    monitor_style: str = "rest"
    max_body_bytes: int = 1_048_576
    max_wait_s: float = 60.0


QUEUE_KEY = web.AppKey("asyncjobs_queue", JobQueue)
SETTINGS_KEY = web.AppKey("asyncjobs_settings", WebSettings)


# -- responses -----------------------------------------------------------------

def json_response(body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=codec.dumps(body), status=status, headers=headers,
                        content_type="application/json")


def problem_body(status: int, detail: str, title: str | None = None) -> dict[str, Any]:
    return {"type": "about:blank", "title": title or HTTPStatus(status).phrase, "status": status, "detail": detail}


def problem_response(problem: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    response = web.Response(body=codec.dumps(problem), status=problem["status"],
                            headers={**protocol.NO_STORE, **(headers or {})})
    response.content_type = PROBLEM_TYPE
    return response


_KEPT_HEADERS = ("Allow", "Retry-After", "WWW-Authenticate")


@web.middleware
async def problems_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    """Every error becomes problem details (RFC 9457); a bug becomes a bare 500, never a traceback."""
    try:
        return await handler(request)
    except ProblemError as exc:
        return problem_response(exc.problem(), exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        detail = _http_exception_detail(request, exc)
        headers = {k: exc.headers[k] for k in _KEPT_HEADERS if k in exc.headers}
        return problem_response(problem_body(exc.status, detail), headers)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return problem_response(problem_body(500, "the server failed to answer this request; it has been logged"))


def _http_exception_detail(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"no resource at {request.path}"
    if exc.status == 405:
        return f"{request.method} is not allowed on {request.path}; allowed: {exc.headers.get('Allow', '')}"
    if exc.status == 413:
        return f"the body is larger than the limit of {request.app[SETTINGS_KEY].max_body_bytes} bytes"
    text = (exc.text or "").strip()
    return text if text and not text.startswith(f"{exc.status}:") else exc.reason


class _ProblemRequestHandler(RequestHandler):
    """Answers requests the HTTP parser rejects with problem details, not text/html."""

    __slots__ = ()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        response = super().handle_error(request, status, exc, message)  # logs, checks nothing was sent
        detail = "the request could not be parsed as HTTP" if status == 400 else "the server failed to answer"
        if status == 400 and exc is not None and getattr(exc, "message", None):
            detail = f"malformed request: {exc.message}"
        if isinstance(exc, LineTooLong):
            status, detail = 431, f"a request line or header is too long: {exc.message}"
        problem = problem_response(problem_body(status, detail))
        problem.force_close()
        del response
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


# -- reading requests ----------------------------------------------------------

async def read_json(request: web.Request, *, required: bool = True) -> Any:
    """The body as JSON: 415 if not JSON, 413 if too large, 400 if malformed."""
    settings = request.app[SETTINGS_KEY]
    if not request.body_exists:
        if required:
            raise BadRequest("the body is empty; send a JSON object")
        return None
    if not protocol.is_json_content_type(request.headers.get("Content-Type")):
        raise UnsupportedMediaType(
            f"the body must be application/json, not {request.headers.get('Content-Type') or 'untyped'}")
    if request.content_length is not None and request.content_length > settings.max_body_bytes:
        raise PayloadTooLarge(f"the body is larger than the limit of {settings.max_body_bytes} bytes")
    raw = await request.read()
    try:
        return codec.loads(raw)
    except codec.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None


def _job_id(request: web.Request) -> str:
    return request.match_info["job_id"]


# -- handlers ------------------------------------------------------------------

async def _accepted(queue: JobQueue, job: Job) -> web.Response:
    view = await queue.view(job)
    answer = protocol.submit_answer(job, eta=view.eta, now=queue.clock())
    return json_response(protocol.job_body(job, eta=view.eta, queue_position=view.queue_position),
                         status=answer.status, headers=answer.headers)


async def submit(request: web.Request) -> web.Response:
    queue = request.app[QUEUE_KEY]
    task, params, priority, delay_s = protocol.parse_submit(await read_json(request))
    job = await queue.submit(task, params, priority=priority, delay_s=delay_s)
    return await _accepted(queue, job)


def task_route_handler(spec: TaskSpec) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A task on its own route: path parameters and the JSON body become its params."""

    async def handle(request: web.Request) -> web.Response:
        queue = request.app[QUEUE_KEY]
        body = await read_json(request, required=False)
        if body is not None and not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object", errors=[{"field": "", "message": "expected object"}])
        params = dict(body or {})
        for name, value in request.match_info.items():
            if name in params and params[name] != value:
                raise BadRequest(f"{name!r} is given in the path and, differently, in the body",
                                 errors=[{"field": name, "message": "differs from the path"}])
            params[name] = value
        job = await queue.submit(spec.name, params)
        return await _accepted(queue, job)

    return handle


async def monitor(request: web.Request) -> web.StreamResponse:
    queue = request.app[QUEUE_KEY]
    settings = request.app[SETTINGS_KEY]
    job = await queue.find(_job_id(request))
    if protocol.etag_matches(request.headers.get("If-None-Match"), protocol.etag(job)):
        return web.Response(status=304, headers=protocol.job_headers(job))
    view = await queue.view(job)
    answer = protocol.monitor_answer(job, eta=view.eta, now=queue.clock(), style=settings.monitor_style,
                                     redirect=protocol.parse_bool(request.query.get("redirect"), True))
    return json_response(protocol.job_body(job, eta=view.eta, queue_position=view.queue_position),
                         status=answer.status, headers=answer.headers)


async def result(request: web.Request) -> web.Response:
    queue = request.app[QUEUE_KEY]
    job = await queue.find(_job_id(request))
    view = await queue.view(job) if not job.terminal else None
    answer = protocol.result_answer(job, eta=view.eta if view else None, now=queue.clock())
    if answer.status == 200:
        response = web.Response(body=job.result or b"null", headers=answer.headers)
        response.content_type = job.result_type or "application/json"
        return response
    if answer.status == 404:
        problem = problem_body(404, f"job {job.id} is {job.status.value}; its result does not exist yet")
        return problem_response({**problem, "job_status": job.status.value}, answer.headers)
    problem = problem_body(409, f"job {job.id} {job.status.value}; it has no result and never will")
    return problem_response({**problem, "job_status": job.status.value, "error": job.error}, answer.headers)


async def cancel(request: web.Request) -> web.Response:
    queue = request.app[QUEUE_KEY]
    job, stopped = await queue.cancel(_job_id(request))
    answer = protocol.cancel_answer(job, stopped=stopped)
    return json_response(protocol.job_body(job), status=answer.status, headers=answer.headers)


async def delete(request: web.Request) -> web.Response:
    queue = request.app[QUEUE_KEY]
    job_id = _job_id(request)
    if await queue.delete(job_id):
        return web.Response(status=204, headers=protocol.NO_STORE)
    job = await queue.find(job_id)
    return json_response(protocol.job_body(job), status=202, headers=protocol.job_headers(job))


async def list_jobs(request: web.Request) -> web.Response:
    queue = request.app[QUEUE_KEY]
    status, task, limit, before = protocol.parse_list_query(request.query, queue.registry.names())
    jobs, cursor = await queue.list(status=status, task=task, before_seq=before, limit=limit)
    next_url = protocol.next_page_url(status=status, task=task, limit=limit, cursor=cursor)
    headers = dict(protocol.NO_STORE)
    if next_url:
        headers["Link"] = f'<{next_url}>; rel="next"'
    bodies = []
    for job in jobs:
        view = await queue.view(job)
        bodies.append(protocol.job_body(job, eta=view.eta, queue_position=view.queue_position))
    return json_response({"jobs": bodies, "next": next_url}, headers=headers)


async def list_tasks(request: web.Request) -> web.Response:
    registry = request.app[QUEUE_KEY].registry
    return json_response({"tasks": [registry.get(name).describe() for name in registry.names()]})


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"}, headers=protocol.NO_STORE)


def make_web_app(queue: JobQueue, settings: WebSettings) -> web.Application:
    app = web.Application(middlewares=[problems_middleware], client_max_size=settings.max_body_bytes)
    app[QUEUE_KEY] = queue
    app[SETTINGS_KEY] = settings
    app.router.add_post("/jobs", submit)
    app.router.add_get("/jobs", list_jobs)
    app.router.add_get("/jobs/{job_id}", monitor)
    app.router.add_delete("/jobs/{job_id}", delete)
    app.router.add_get("/jobs/{job_id}/result", result)
    app.router.add_post("/jobs/{job_id}/cancel", cancel)
    app.router.add_get("/tasks", list_tasks)
    app.router.add_get("/healthz", healthz)
    for spec in queue.registry:
        if spec.route is not None:
            method, path = spec.route
            app.router.add_route(method, path, task_route_handler(spec))
    return app
