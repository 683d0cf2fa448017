"""The web layer: routes, wired to the handlers of ``jobs`` (REST) and ``push`` (SSE, WebSocket)."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..limits import Rates, SubmitRates
from ..queue import JobQueue
from ..tasks import TaskSpec
from . import jobs, ops, pages, push, session, uploads
from .common import (
    QUEUE_KEY,
    RATES_KEY,
    SETTINGS_KEY,
    SUBMIT_ROUTES_KEY,
    WAITERS_KEY,
    Waiters,
    WebSettings,
    auth_middleware,
    expect_handler,
    make_expect_handler,
    problems_middleware,
    starting_middleware,
)
from .runner import ProblemRunner

__all__ = ["ProblemRunner", "WebSettings", "make_web_app"]


def _body_limit(request: web.Request, *, spec: TaskSpec | None) -> int | None:
    return uploads.body_limit(request, spec)


def make_web_app(queue: JobQueue, settings: WebSettings, *, rates: Rates | None = None) -> web.Application:
    """The aiohttp application. ``rates``: where the submit rate's buckets are kept (by default, with a
    ``submit_rate`` set, in this process)."""
    # Without tokens the auth middleware would only pass every request on: it is left out. Only a node of a
    # shared store may listen before its store is open (it starts before its database): its 503 until then is
    # the problems middleware's answer to a store that is away.
    middlewares = [problems_middleware, auth_middleware] if settings.tokens else [problems_middleware]
    if queue.store.shared:
        middlewares.insert(1, starting_middleware)
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_body_bytes)
    app[QUEUE_KEY] = queue
    app[SETTINGS_KEY] = settings
    if rates is None and settings.submit_rate:
        rates = SubmitRates(settings.submit_rate, settings.submit_burst)
    app[RATES_KEY] = rates
    app[WAITERS_KEY] = Waiters()
    app[push.SOCKETS_KEY] = weakref.WeakSet()
    app[push.CLOSING_KEY] = set()
    app.on_shutdown.append(push.end_waits)
    routes: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
        ("POST", "/jobs", jobs.submit),
        ("GET", "/jobs", jobs.list_jobs),
        ("GET", "/jobs/{job_id}", jobs.monitor),
        ("DELETE", "/jobs/{job_id}", jobs.delete),
        ("GET", "/jobs/{job_id}/result", jobs.result),
        ("POST", "/jobs/{job_id}/cancel", jobs.cancel),
        ("GET", "/jobs/{job_id}/events", push.events),
        ("GET", "/ws", push.websocket),
        ("GET", "/tasks", jobs.list_tasks),
        ("GET", "/healthz", jobs.healthz),
    ]
    routes += [(*spec.route, jobs.task_route_handler(spec)) for spec in queue.registry if spec.route is not None]
    limits = {("POST", "/jobs"): None, **{spec.route: spec for spec in queue.registry if spec.route is not None}}
    submitting = set()
    for method, path, handler in routes:
        expect = expect_handler
        if (method, path) in limits:  # routes that take bodies refuse one over their limit before it is sent
            spec = limits[(method, path)]
            expect = make_expect_handler(functools.partial(_body_limit, spec=spec))
        route = app.router.add_route(method, path, handler, expect_handler=expect)
        if (method, path) in limits:
            submitting.add(route)
        if method == "GET" and (method, path) not in limits:  # a task on GET submits: HEAD must stay safe (405)
            app.router.add_route("HEAD", path, handler, expect_handler=expect)
    app[SUBMIT_ROUTES_KEY] = frozenset(submitting)
    if rates is not None:
        app.on_response_prepare.append(jobs.rate_fields_on_refusals)
    ops.add_routes(app)
    pages.add_routes(app)
    session.add_routes(app, settings)  # with auth on: /login, /logout and the session cookie
    return app
