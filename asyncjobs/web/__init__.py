"""The web layer: routes, wired to the handlers of ``jobs`` (REST) and ``push`` (SSE, WebSocket)."""

from __future__ import annotations

import weakref

from aiohttp import web

from ..queue import JobQueue
from . import jobs, push
from .common import QUEUE_KEY, SETTINGS_KEY, WAITERS_KEY, Waiters, WebSettings, auth_middleware, problems_middleware
from .runner import ProblemRunner

__all__ = ["ProblemRunner", "WebSettings", "make_web_app"]


def make_web_app(queue: JobQueue, settings: WebSettings) -> web.Application:
    app = web.Application(middlewares=[problems_middleware, auth_middleware], client_max_size=settings.max_body_bytes)
    app[QUEUE_KEY] = queue
    app[SETTINGS_KEY] = settings
    app[WAITERS_KEY] = Waiters()
    app[push.SOCKETS_KEY] = weakref.WeakSet()
    app[push.CLOSING_KEY] = set()
    app.on_shutdown.append(push.close_sockets)
    router = app.router
    router.add_post("/jobs", jobs.submit)
    router.add_get("/jobs", jobs.list_jobs)
    router.add_get("/jobs/{job_id}", jobs.monitor)
    router.add_delete("/jobs/{job_id}", jobs.delete)
    router.add_get("/jobs/{job_id}/result", jobs.result)
    router.add_post("/jobs/{job_id}/cancel", jobs.cancel)
    router.add_get("/jobs/{job_id}/events", push.events)
    router.add_get("/ws", push.websocket)
    router.add_get("/tasks", jobs.list_tasks)
    router.add_get("/healthz", jobs.healthz)
    for spec in queue.registry:
        if spec.route is not None:
            method, path = spec.route
            router.add_route(method, path, jobs.task_route_handler(spec))
    return app
