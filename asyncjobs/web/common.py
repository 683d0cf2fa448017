"""What every web handler shares: settings, app keys, JSON and problem answers, the error middleware."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from .. import codec, protocol
from ..errors import (
    InvalidRequest,
    RequestError,
    StoreError,
    StoreUnreachable,
    TooLarge,
    Unauthorized,
    UnsupportedType,
)
from ..limits import Rates
from ..queue import JobQueue
from . import problems
from .metrics import Metrics
from .problems import problem_body

log = logging.getLogger("asyncjobs.web")

PROBLEM_TYPE = "application/problem+json"


@dataclass(frozen=True)
class WebSettings:
    monitor_style: protocol.MonitorStyle = protocol.MonitorStyle.REST
    max_body_bytes: int = 1_048_576
    max_upload_bytes: int = 1_073_741_824  # one uploaded file
    upload_read_timeout_s: float = 60.0  # an upload that stalls this long is given up (408)
    max_wait_s: float = 60.0
    sse_keepalive_s: float = 15.0  # comment lines on idle event streams, so proxies keep them open
    ws_heartbeat_s: float = 30.0  # WebSocket pings; a peer that does not answer is closed
    ws_buffer: int = 1024  # events waiting for a slow socket before it is closed
    tokens: tuple[tuple[str, bytes], ...] = ()  # (principal, bearer token); empty: auth off
    admins: frozenset[str] = frozenset()  # principals that see and manage every job
    session_ttl_s: float = 43_200.0  # a browser session's lifetime
    callback_hosts: tuple[str, ...] = ()  # hosts a callback_url may name; empty: callbacks off
    submit_rate: float = 0.0  # submits per second per principal; 0: no limit
    submit_burst: int = 0


@dataclass
class Waiters:
    """How many clients are waiting right now, by channel (shown by /healthz)."""

    long_polls: int = 0
    event_streams: int = 0
    websockets: int = 0


PRINCIPAL_KEY = web.RequestKey("asyncjobs_principal", str)
QUEUE_KEY = web.AppKey("asyncjobs_queue", JobQueue)
SETTINGS_KEY = web.AppKey("asyncjobs_settings", WebSettings)
WAITERS_KEY = web.AppKey("asyncjobs_waiters", Waiters)
METRICS_KEY = web.AppKey("asyncjobs_metrics", Metrics)
RATES_KEY: web.AppKey[Rates | None] = web.AppKey("asyncjobs_rates")  # None: no submit rate limit
# The routes that submit (POST /jobs and the task routes): every answer of theirs carries the rate's fields.
SUBMIT_ROUTES_KEY: web.AppKey[frozenset[web.AbstractRoute]] = web.AppKey("asyncjobs_submit_routes")


# -- responses -----------------------------------------------------------------

def json_response(body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=codec.dumps(body), status=status, headers=headers,
                        content_type="application/json")


def problem_response(problem: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    try:
        body = codec.dumps(problem)
    except TypeError:  # it echoes a client's bytes that were not UTF-8
        body = codec.dumps(codec.scrubbed(problem))
    response = web.Response(body=body, status=problem["status"],
                            headers={**protocol.NO_STORE, **(headers or {})})
    response.content_type = PROBLEM_TYPE
    return response


_KEPT_HEADERS = ("Allow", "Retry-After", "WWW-Authenticate")


@web.middleware
async def problems_middleware(request: web.Request,
                              handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every error becomes problem details (RFC 9457); a bug becomes a bare 500, never a traceback."""
    try:
        return await handler(request)
    except RequestError as exc:
        return problem_response(*problems.answer(exc))
    except problems.WebProblem as exc:
        body, headers = problems.answer(exc.error)
        return problem_response(body, {**headers, **exc.headers})
    except StoreError as exc:
        log.error("store unavailable during %s %s: %s", request.method, request.path, exc)
        return problem_response(problem_body(503, "the job store is unavailable; try again shortly"),
                                {"Retry-After": "5"})
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


# -- reading requests ----------------------------------------------------------

def _decodable_codings() -> tuple[str, ...]:
    """The content codings aiohttp undoes in a request body: gzip and deflate, br and zstd where their
    libraries are installed."""
    try:
        from aiohttp.compression_utils import HAS_BROTLI, HAS_ZSTD
    except ImportError:  # an aiohttp that moved them: the two it always has
        return ("gzip", "deflate")
    return ("gzip", "deflate") + ("br",) * HAS_BROTLI + ("zstd",) * HAS_ZSTD


DECODABLE_CODINGS = _decodable_codings()


def refuse_undecodable(request: web.Request) -> None:
    """A body in a content coding this server cannot undo: ``415`` naming the ones it can (``Accept-Encoding``,
    RFC 9110, section 12.5.3), before any of it is read."""
    if "Content-Encoding" not in request.headers:  # the usual case, known at one look
        return
    coding = list_header(request, "Content-Encoding")
    if request.body_exists and protocol.undecodable_coding(coding, DECODABLE_CODINGS):
        raise problems.WebProblem(
            UnsupportedType(f"the body's Content-Encoding {coding!r} is not one this server decodes; send it as"
                            f" it is, or in one of: {', '.join(DECODABLE_CODINGS)}"),
            {"Accept-Encoding": ", ".join(DECODABLE_CODINGS)})


async def read_json(request: web.Request, *, required: bool = True) -> Any:
    """The body as JSON: 415 if not JSON, 413 if too large, 400 if malformed."""
    settings = request.app[SETTINGS_KEY]
    if not request.body_exists:
        if required:
            raise InvalidRequest("the body is empty; send a JSON object")
        return None
    refuse_undecodable(request)
    if not protocol.is_json_content_type(request.headers.get("Content-Type")):
        raise UnsupportedType(
            f"the body must be application/json, not {request.headers.get('Content-Type') or 'untyped'}")
    if request.content_length is not None and request.content_length > settings.max_body_bytes:
        raise TooLarge(f"the body is larger than the limit of {settings.max_body_bytes} bytes")
    try:
        raw = await request.read()
    except (HttpProcessingError, RequestPayloadError) as exc:  # e.g. a Content-Encoding the body does not match
        request.content.feed_eof()  # nothing more can be read: aiohttp must not try to drain it after the answer
        raise InvalidRequest(f"the body could not be read: {getattr(exc, 'message', '') or exc}") from None
    try:
        value = codec.loads(raw)
    except codec.JSONDecodeError as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
    if protocol.too_deep(raw, value):
        raise InvalidRequest(f"the body nests deeper than {protocol.MAX_JSON_DEPTH} levels")
    return value


def job_id_of(request: web.Request) -> str:
    return request.match_info["job_id"]


def list_header(request: web.Request, name: str) -> str | None:
    """A list-valued header (``Prefer``, ``If-None-Match``, ``Cache-Control``, ``Accept``) as one value: several
    field lines of one name mean the same as their values joined by commas (RFC 9110, section 5.3)."""
    values = request.headers.getall(name, ())
    if not values:
        return None
    return values[0] if len(values) == 1 else ", ".join(values)


# -- auth ----------------------------------------------------------------------

OPEN_PATHS = frozenset({"/healthz", "/login", "/logout"})  # /login and /logout check what they need themselves
OPEN_PREFIXES = ("/static/",)  # the package's stylesheet, script and icon: the sign-in page needs them
# Browsers cannot set headers on EventSource and WebSocket: these two routes take ?access_token= (no other).
QUERY_TOKEN_ROUTES = frozenset({"/jobs/{job_id}/events", "/ws"})
BEARER_CHALLENGE = problems.BEARER_CHALLENGE


@dataclass(frozen=True)
class Session:
    """A browser's sign-in session (see ``session.py``): who it is, and the CSRF token its pages carry."""

    id: str
    principal: str
    csrf: str


class BrowserSessions(Protocol):
    """The cookie side of auth, implemented in ``session.py`` and installed only when auth is on."""

    async def authenticate(self, request: web.Request) -> Session | None:
        """The request's valid session, or None; a 403 problem when a session's request fails the CSRF rules."""

    async def resolve(self, request: web.Request) -> Session | None:
        """The request's session if its cookie is valid, with no CSRF check."""

    def sign_in_redirect(self, request: web.Request) -> web.StreamResponse | None:
        """``303`` to the sign-in page for a browser asking for a page, else None."""

    def hold(self, session: Session, end: Callable[[], None]) -> contextlib.AbstractContextManager[None]:
        """While inside, ``end()`` is called once if ``session`` ends (``/logout`` here or on any node, or its
        time runs out): an event stream or socket it opened must not outlive it."""


SESSION_KEY = web.RequestKey("asyncjobs_session", Session)  # set when the cookie, not a token, authenticated
SESSIONS_KEY = web.AppKey("asyncjobs_sessions", BrowserSessions)


def is_open_path(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def find_principal(tokens: tuple[tuple[str, bytes], ...], presented: str) -> str | None:
    """Compare against every token in constant time, so timing tells nothing about which matched."""
    given = presented.encode("utf-8", "surrogateescape")
    found = None
    for principal, token in tokens:
        if hmac.compare_digest(given, token):
            found = principal
    return found


def presented_token(request: web.Request) -> str | None:
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    resource = getattr(request.match_info.route, "resource", None)
    if resource is not None and resource.canonical in QUERY_TOKEN_ROUTES:
        return request.query.get("access_token")
    return None


@web.middleware
async def starting_middleware(request: web.Request,
                              handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """On a shared store, until the node has reached its database (it may start first): every request but
    ``/healthz`` (which says the store is down) is answered as when the store goes away later (503)."""
    if request.app[QUEUE_KEY].started or request.path == "/healthz":
        return await handler(request)
    raise StoreUnreachable("this node has not reached its job store yet")


@web.middleware
async def auth_middleware(request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """With tokens configured, every endpoint but the open ones needs a bearer token or a sign-in session.

    A bearer token (or ``?access_token=`` on the push channels), when presented, decides alone: valid, or 401,
    whatever cookie comes with it. Without one, the session cookie is tried; a browser asking for a page
    without either is sent to sign in (303), and any other client gets the 401 problem, as before.
    """
    tokens = request.app[SETTINGS_KEY].tokens
    if not tokens or is_open_path(request.path):
        return await handler(request)
    token = presented_token(request)
    if token is not None:
        principal = find_principal(tokens, token)
        if principal is None:
            raise problems.WebProblem(Unauthorized("the bearer token is not valid"), problems.INVALID_TOKEN_CHALLENGE)
        request[PRINCIPAL_KEY] = principal
        return await handler(request)
    sessions = request.app.get(SESSIONS_KEY)
    session = None if sessions is None else await sessions.authenticate(request)
    if session is not None:
        request[PRINCIPAL_KEY] = session.principal
        request[SESSION_KEY] = session
        return await handler(request)
    redirect = None if sessions is None else sessions.sign_in_redirect(request)
    if redirect is not None:
        return redirect
    raise problems.WebProblem(Unauthorized("a valid bearer token (or sign-in session) is required"),
                              {"Vary": "Accept"})  # browsers asking for a page are sent to sign in instead


async def caller_of(request: web.Request) -> str | None:
    """Who makes this request, even where it was refused before auth decided (an ``Expect`` answer, a
    missing CSRF token): the principal, "" with auth off, None when no valid credentials came with it."""
    principal = principal_of(request)
    tokens = request.app[SETTINGS_KEY].tokens
    if principal is not None or not tokens:
        return principal or ""
    token = presented_token(request)
    if token is not None:
        return find_principal(tokens, token)
    sessions = request.app.get(SESSIONS_KEY)
    session = None if sessions is None else await sessions.resolve(request)
    return None if session is None else session.principal


def session_of(request: web.Request) -> Session | None:
    """The sign-in session that authenticated this request; None for a bearer token and with auth off."""
    return request.get(SESSION_KEY)


def principal_of(request: web.Request) -> str | None:
    """The caller's principal, or None with auth off (every job is visible to everyone)."""
    return request.get(PRINCIPAL_KEY)


def is_admin(request: web.Request) -> bool:
    return principal_of(request) in request.app[SETTINGS_KEY].admins


def visible_owner(request: web.Request) -> str | None:
    """Whose jobs the caller may see and manage: its own, or (None) every job for admins and with auth off."""
    principal = principal_of(request)
    return None if principal is None or is_admin(request) else principal


def make_expect_handler(limit: Callable[[web.Request], int | None]
                        ) -> Callable[[web.Request], Awaitable[web.StreamResponse | None]]:
    """``Expect: 100-continue`` is honoured, unless ``Content-Length`` is over the route's ``limit``
    (then 413 before the body is sent); any other expectation is a 417 problem."""

    async def handle(request: web.Request) -> web.StreamResponse | None:
        expect = request.headers.get("Expect", "")
        if expect.lower() != "100-continue":
            return problem_response(problem_body(417, f"this server cannot meet 'Expect: {expect}'"))
        most = limit(request)
        if most is not None and request.content_length is not None and request.content_length > most:
            response = problem_response(problem_body(
                413, f"the body of {request.content_length} bytes is larger than the limit of {most} bytes"))
            response.force_close()  # the body never comes: this connection cannot carry another request
            return response
        if request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the answer's own headers are still to come
        return None

    return handle


expect_handler = make_expect_handler(lambda request: None)
