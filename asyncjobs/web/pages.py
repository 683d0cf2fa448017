"""HTML views for browsers: the job page and the dashboard.

The pages are plain HTML shells filled with a few escaped values; ``static/app.js`` does the rest
(live updates through Server-Sent Events on a job page and the WebSocket on the dashboard) with the
same JSON endpoints every other client uses. No build step, nothing from a CDN: every file is in
``static/`` and ships with the package.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import re
import statistics
import time
from collections.abc import AsyncIterator
from functools import cache
from pathlib import Path
from typing import Any

from aiohttp import web

from .. import codec, protocol
from ..errors import JobGone, JobNotFound
from ..models import Job
from .common import (
    METRICS_KEY,
    QUEUE_KEY,
    SETTINGS_KEY,
    Session,
    is_admin,
    json_response,
    list_header,
    principal_of,
    session_of,
    visible_owner,
)

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}
_STATIC_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*\.(?:css|js|svg)$")
RECENT_FOR_RUN_TIMES = 200  # jobs the dashboard's run-time figures are computed from
HISTORY_SAMPLE_S = 5.0  # how often the queue depth is sampled for the dashboard's chart

# Every page: only this origin's files, no inline script, not framed.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Vary": "Accept",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
}


# -- content negotiation ----------------------------------------------------------

def _accept_ranges(header: str) -> list[tuple[str, str, float]]:
    """``Accept`` as (type, subtype, q); malformed entries are skipped."""
    ranges = []
    for part in header.split(","):
        media, *params = part.strip().split(";")
        kind, _, sub = media.strip().lower().partition("/")
        if not kind or not sub:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(1.0, max(0.0, float(value.strip())))
                except ValueError:
                    q = 0.0
        ranges.append((kind, sub, q))
    return ranges


def _quality(ranges: list[tuple[str, str, float]], kind: str, sub: str) -> tuple[float, int]:
    """The q of ``kind/sub`` from the most specific matching range (RFC 9110 12.5.1), and that specificity."""
    best: tuple[int, float] = (-1, 0.0)
    for r_kind, r_sub, q in ranges:
        if r_kind == kind and r_sub == sub:
            specificity = 2
        elif r_kind == kind and r_sub == "*":
            specificity = 1
        elif r_kind == "*" and r_sub == "*":
            specificity = 0
        else:
            continue
        if specificity > best[0]:
            best = (specificity, q)
    return best[1], best[0]


def wants_html(request: web.Request) -> bool:
    """A browser asking for a page rather than JSON.

    True only when ``text/html`` is named (not just matched by ``*/*``) and ranks above
    ``application/json``: a browser's ``text/html,…,*/*;q=0.8`` gets the page; ``*/*`` alone
    (curl, most HTTP libraries), no ``Accept`` at all, or anything naming JSON first gets JSON.
    ``?format=json`` asks for JSON whatever the ``Accept`` (a link cannot set that header).
    """
    if request.query.get("format") == "json":
        return False
    header = list_header(request, "Accept")
    if not header:
        return False
    ranges = _accept_ranges(header)
    html_q, html_specificity = _quality(ranges, "text", "html")
    json_q, _ = _quality(ranges, "application", "json")
    return html_specificity >= 1 and html_q > 0 and html_q > json_q


# -- rendering --------------------------------------------------------------------

@cache
def _template(name: str) -> str:
    return (STATIC_DIR / name).read_text(encoding="utf-8")


def _render(name: str, request: web.Request | None = None, **values: str) -> str:
    """Fill ``{{key}}`` slots with HTML-escaped values (``raw_`` keys go in as they are).

    With ``request``, also the slots every page has: ``csrf_token`` (the sign-in session's, for the
    ``<meta name="csrf-token">`` that app.js sends back; empty without a session) and ``raw_account``
    (who is signed in, and the sign-out form).
    """
    session = None if request is None else session_of(request)
    values = {"csrf_token": session.csrf if session else "", "raw_account": _account(session), **values}
    text = _template(name)
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value if key.startswith("raw_") else html.escape(value))
    return text


def _account(session: Session | None) -> str:
    """The header's "signed in as … / Sign out" (a plain form: it works without JavaScript)."""
    if session is None:
        return ""
    return ('<span class="account">Signed in as <strong id="principal">' + html.escape(session.principal) +
            '</strong></span><form class="signout" method="post" action="/logout">'
            '<input type="hidden" name="csrf_token" value="' + html.escape(session.csrf) + '">'
            '<button type="submit" id="sign-out" class="link-button">Sign out</button></form>')


def _script_json(value: Any) -> str:
    """JSON safe inside a ``<script type="application/json">`` element (no ``</script>`` breakout)."""
    return (codec.dumps(value).decode().replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def _page(text: str, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8",
                        headers={**PAGE_HEADERS, **(headers or {})})


def _message_page(request: web.Request, status: int, title: str, message: str) -> web.Response:
    return _page(_render("message.html", request, title=title, message=message, status=str(status)), status=status)


def login_page(next_path: str, *, status: int = 200, error: str = "",
               headers: dict[str, str] | None = None) -> web.Response:
    """The sign-in page: one field for the token, ``next_path`` (already checked to be local) kept hidden."""
    error_block = (f'<p id="login-error" class="field-error" role="alert">{html.escape(error)}</p>' if error else "")
    text = _render("login.html", next=next_path, raw_error=error_block,
                   raw_invalid=' aria-invalid="true"' if error else "",
                   described_by="login-error token-help" if error else "token-help")
    return _page(text, status=status, headers=headers)


# -- the job page -------------------------------------------------------------------

async def job_page(request: web.Request) -> web.StreamResponse:
    """The job as a page: the same status code as the monitor would give, but never a redirect.

    A succeeded job answers ``200`` with the page rather than the JSON monitor's ``303`` to
    ``/result``: a browser would follow the redirect silently and show a bare result document,
    losing the task, the timings and the way back. The page shows the result itself (pretty JSON,
    or a download link for bytes) and links to ``/jobs/{id}/result`` for the raw resource. A job with
    files carries them in its ``files`` member: app.js lists the inputs and, for a file result, its
    name, size and type with a download link (client file names only ever as text, never as markup).
    """
    queue = request.app[QUEUE_KEY]
    job_id = request.match_info["job_id"]
    try:
        job = await queue.find(job_id, owner=visible_owner(request))
    except JobGone:
        return _message_page(request, 410, "Job expired",
                             "This job existed, but it has expired: its record is no longer kept.")
    except JobNotFound:
        return _message_page(request, 404, "No such job",
                             "There is no job with this id: it never existed, it was deleted, or it is not yours.")
    etag = protocol.page_etag(job)
    if protocol.etag_matches(list_header(request, "If-None-Match"), etag):
        return web.Response(status=304, headers={**PAGE_HEADERS, "ETag": etag})
    view = await queue.view(job)
    body = protocol.job_body(job, eta=view.eta, queue_position=view.queue_position)
    answer = protocol.monitor_answer(job, eta=view.eta, now=queue.clock(),
                                     style=request.app[SETTINGS_KEY].monitor_style, redirect=False)
    text = _render("job.html", request, id=job.id, task=job.task, status=job.status.value,
                   raw_job_json=_script_json({**body, "rerun": _rerun(request, job)}))
    # The embedded job carries one member the API's does not: "rerun", what "Run again" submits.
    # Keep the protocol's status (200, or 202 while pending in "flow" style); an ETag of the page's own
    # (the JSON representation's names that one), not Retry-After/Location, which the page's script replaces.
    return _page(text, status=answer.status, headers={"ETag": etag})


def _rerun(request: web.Request, job: Job) -> dict[str, Any] | None:
    """What "Run again" submits: the task, params and priority, for the job's own viewer only (its
    params are not in the API's representation: an admin looking at another's job does not get them),
    and only for a job without files (its input files are gone once it is terminal)."""
    principal = principal_of(request)
    if job.files is not None or (principal is not None and principal != job.owner):
        return None
    try:
        params = codec.loads(job.params)
    except codec.JSONDecodeError:
        return None
    return {"task": job.task, "params": params, "priority": job.priority}


# -- the dashboard ------------------------------------------------------------------

def _run_time_figures(jobs: list[Job], estimates: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Per task, from recent jobs: runs, failures, and mean / median / max run time of the successes."""
    durations: dict[str, list[float]] = {}
    failed: dict[str, int] = {}
    for job in jobs:
        if job.status.value == "succeeded" and job.started_at is not None and job.finished_at is not None:
            durations.setdefault(job.task, []).append(max(0.0, job.finished_at - job.started_at))
        elif job.status.value == "failed":
            failed[job.task] = failed.get(job.task, 0) + 1
    figures = {}
    for task in sorted(set(durations) | set(failed) | set(estimates)):
        runs = durations.get(task, [])
        figures[task] = {
            "succeeded": len(runs),
            "failed": failed.get(task, 0),
            "mean_s": round(statistics.fmean(runs), 3) if runs else None,
            "median_s": round(statistics.median(runs), 3) if runs else None,
            "max_s": round(max(runs), 3) if runs else None,
            "estimate_s": round(estimates[task], 3) if task in estimates else None,
        }
    return figures


def _links(app: web.Application) -> dict[str, str]:
    paths = {resource.canonical for resource in app.router.resources()}
    links = {"self": "/", "jobs": "/jobs", "tasks": "/tasks", "websocket": "/ws", "healthz": "/healthz"}
    for name, path in (("metrics", "/metrics"), ("openapi", "/openapi.json")):
        if path in paths:
            links[name] = path
    return links


async def summary(request: web.Request) -> dict[str, Any]:
    """What the dashboard shows besides the job list: counts by status and run-time figures."""
    queue = request.app[QUEUE_KEY]
    principal = visible_owner(request)
    recent, _ = await queue.list_jobs(owner=principal, limit=RECENT_FOR_RUN_TIMES)
    counts = await queue.counts(principal)  # with auth on, a principal's own jobs (an admin's: everyone's)
    return {
        "service": "asyncjobs",
        "links": _links(request.app),
        "counts": counts,
        "workers": queue.workers,
        "tasks": queue.registry.names(),
        "run_times": _run_time_figures(recent, queue.run_times.snapshot()),
        "run_times_from": len(recent),
        "history": _history(request) if principal is None else None,
    }


def _history(request: web.Request) -> list[dict[str, Any]] | None:
    """The last hour, a minute a row (jobs finished, of them failed or canceled, peak queue depth).

    Service-wide figures of this process: shown with auth off and to admins only; other principals get
    None, as their counts are of their own jobs only (a service's load is the operators' business).
    """
    metrics = request.app.get(METRICS_KEY)
    if metrics is None:
        return None
    metrics.history.sample_queued(request.app[QUEUE_KEY].queued)
    return metrics.history.snapshot()


async def index(request: web.Request) -> web.StreamResponse:
    """``GET /``: the dashboard for a browser; for other clients a JSON index of links and figures."""
    if wants_html(request):
        admin = principal_of(request) is None or is_admin(request)  # sees every job (auth off: everyone)
        return _page(_render("dashboard.html", request, admin="true" if admin else "false",
                             owners="true" if principal_of(request) is not None and admin else "false"))
    return json_response(await summary(request), headers={**protocol.NO_STORE, "Vary": "Accept"})


async def static_file(request: web.Request) -> web.StreamResponse:
    """A file of ``static/``: only stylesheets, scripts and icons (the HTML templates are not served raw)."""
    name = request.match_info["name"]
    path = STATIC_DIR / name
    if not _STATIC_NAME.match(name) or not path.is_file():
        raise JobNotFound(f"no static file {name!r}")
    return web.FileResponse(path, headers={
        "Content-Type": STATIC_TYPES[path.suffix], "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


async def _sample_history(app: web.Application) -> AsyncIterator[None]:
    """While the app runs: sample the queue depth every few seconds for the dashboard's chart."""

    async def sample() -> None:
        while True:
            metrics = app.get(METRICS_KEY)
            if metrics is not None:
                metrics.history.sample_queued(app[QUEUE_KEY].queued, time.time())
            await asyncio.sleep(HISTORY_SAMPLE_S)

    task = asyncio.create_task(sample(), name="asyncjobs-history")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def add_routes(app: web.Application) -> None:
    """Add the page routes to ``app``: ``GET /`` and ``GET /static/{name}`` (HEAD too)."""
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static_file)
    app.cleanup_ctx.append(_sample_history)
