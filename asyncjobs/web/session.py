"""Browser sign-in: ``/login`` and ``/logout``, the session cookie, and the CSRF rules (PROTOCOL "Browser sign-in").

- **The session lives on the server.** ``POST /login`` with a valid bearer token stores a session (a random
  id, a random CSRF token, an expiry ``auth.session_ttl`` from now) and sets a cookie naming it. The cookie
  never holds the token; the store keeps only a SHA-256 of the id, so a copy of the database names no
  usable cookie.
- **The cookie is signed** (``itsdangerous``: HMAC-SHA256, timestamped, verified in constant time). Its
  value is ``<principal, base64>.<session id>.<timestamp>.<signature>``, signed with a key derived from that
  principal's own token: HMAC-SHA256(token, label + principal). So the key needs no storage and is the same
  after a restart and on every node sharing the config; a changed or removed token voids every cookie of
  that principal (and only of that principal); and a forged, truncated or re-signed cookie is refused
  before the store is asked.
- **A cookie is honoured** while its signature is valid and not older than the TTL (give or take a minute
  of clock skew between nodes), its session is in the store and unexpired (the exact bound), the
  session's principal is the cookie's, and that principal still has a token. An event stream or
  WebSocket opened with the cookie ends with its session: at once on a ``/logout`` on the same node,
  else within ``RECHECK_S`` (the store is asked while any are open).
- **CSRF.** A request authenticated by the cookie that may change state (any method but GET, HEAD,
  OPTIONS, TRACE) must carry the session's CSRF token in ``X-CSRF-Token``, compared in constant time;
  the ``csrf_token`` form field is accepted instead only on the routes a plain HTML form posts to
  (``/logout``, ``/jobs/{id}/cancel``) and only in an ``application/x-www-form-urlencoded`` body, so a
  task's body (JSON, multipart, raw bytes) is never read here. Also, a cookie request whose ``Origin``
  names another origin is refused (``403``): that closes cross-site WebSocket hijacking from a sibling
  sub-domain (same-site, so ``SameSite=Strict`` still sends the cookie), which no token can, as a
  WebSocket's messages need none. ``POST /login`` refuses another origin too (login CSRF).
- **HTTPS**, for the cookie's ``Secure``: the connection itself (``request.secure``), or a proxy's
  ``X-Forwarded-Proto: https`` / ``Forwarded: proto=https``. Those headers are trusted only to *add*
  ``Secure``, never to drop it: a client that fakes one only gets a cookie its own plain-HTTP requests
  will not carry.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import secrets
import string
import time
from collections.abc import Callable, Iterator
from typing import TypedDict
from urllib.parse import urlencode, urlsplit

from aiohttp import web
from itsdangerous import BadSignature, TimestampSigner
from multidict import CIMultiDict, CIMultiDictProxy, MultiDictProxy

from ..errors import Forbidden, InvalidRequest, UnsupportedType
from ..queue import JobQueue
from . import pages
from .common import (
    BEARER_CHALLENGE,
    QUEUE_KEY,
    SESSIONS_KEY,
    SETTINGS_KEY,
    SUBMIT_ROUTES_KEY,
    Session,
    WebSettings,
    find_principal,
    refuse_undecodable,
)

log = logging.getLogger("asyncjobs.web")

COOKIE_NAME = "asyncjobs_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
FORM_ROUTES = frozenset({"/jobs/{job_id}/cancel"})  # where a plain HTML form may post with the cookie
KEY_LABEL = b"asyncjobs session cookie v1\x00"
SIGNER_SALT = "asyncjobs.session"
MAX_COOKIE_CHARS = 1024
CLOCK_SKEW_S = 60.0  # nodes' clocks may differ this much; the store's expiry is the exact bound
RECHECK_S = 5.0  # an event stream or socket outlives its session (ended elsewhere, or expired) at most this long
MAX_NEXT_CHARS = 2048
URL_CHARS = frozenset(string.ascii_letters + string.digits + "-._~:/?#[]@!$&'()*+,;=%")  # RFC 3986, unencoded
FORM_TYPE = "application/x-www-form-urlencoded"


# -- pure decisions -------------------------------------------------------------------

def safe_next(value: object) -> str:
    """``value`` when it is a path on this site, else ``/``.

    Local: exactly one leading ``/`` (not ``//`` nor ``/\\``, which browsers read as another host), no
    scheme, and only the characters a URL may hold unencoded (RFC 3986): so no backslash anywhere, no
    space, and no control character (browsers drop tabs and newlines: ``/\\t/evil`` would be ``//evil``).
    """
    if not isinstance(value, str) or not value.startswith("/") or len(value) > MAX_NEXT_CHARS:
        return "/"
    if value.startswith("//") or not URL_CHARS.issuperset(value):
        return "/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return "/"
    return value


def login_url(next_path: str) -> str:
    return "/login?" + urlencode({"next": next_path})


def is_https(secure: bool, headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> bool:
    """Whether the browser reached us over HTTPS: the connection, or a proxy saying so (see the module doc)."""
    if secure:
        return True
    for value in headers.getall("X-Forwarded-Proto", []):
        if any(proto.strip().lower() == "https" for proto in value.split(",")):
            return True
    for value in headers.getall("Forwarded", []):  # RFC 7239: for=...;proto=https, ...
        for element in value.split(","):
            for pair in element.split(";"):
                name, _, proto = pair.strip().partition("=")
                if name.strip().lower() == "proto" and proto.strip().strip('"').lower() == "https":
                    return True
    return False


class CookieAttributes(TypedDict):
    max_age: int
    path: str
    httponly: bool
    samesite: str
    secure: bool


def cookie_attributes(*, max_age_s: float, secure: bool) -> CookieAttributes:
    """The session cookie's attributes (``Set-Cookie``), as ``set_cookie`` takes them."""
    return {"max_age": max(1, int(-(-max_age_s // 1))), "path": "/", "httponly": True, "samesite": "Strict",
            "secure": secure}


def cookie_key(principal: str, token: bytes) -> bytes:
    """The key that signs ``principal``'s cookies: derived from its token, so it changes with it."""
    return hmac.new(token, KEY_LABEL + principal.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()


def same_origin(origin: str, hosts: list[str]) -> bool:
    """Whether an ``Origin`` header names one of ``hosts`` (``Host`` and, behind a proxy, ``X-Forwarded-Host``)."""
    try:
        parts = urlsplit(origin.strip())
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False  # "null" (sandboxed or privacy-restricted contexts), or garbage
    default = ":443" if parts.scheme == "https" else ":80"

    def norm(host: str) -> str:
        return host.strip().lower().removesuffix(default)

    own = norm(parts.netloc)
    return any(norm(h) == own for h in hosts if h)


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode("utf-8", "surrogateescape")).decode().rstrip("=")


def _unb64(text: str) -> str | None:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("utf-8", "surrogateescape")
    except (binascii.Error, ValueError):
        return None


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def _equal(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())


# -- sessions -------------------------------------------------------------------------

class Sessions:
    """Sign-in sessions of one web app: cookies signed per principal, sessions kept in the job store."""

    def __init__(self, app: web.Application, settings: WebSettings) -> None:
        self.app = app
        self.settings = settings
        self.ttl_s = settings.session_ttl_s
        self._signers = {principal: TimestampSigner(cookie_key(principal, token), salt=SIGNER_SALT,
                                                    key_derivation="hmac", digest_method=hashlib.sha256)
                         for principal, token in settings.tokens}
        # The event streams and sockets open on a session (its id: how to end each), and how often the store
        # is asked whether those sessions still stand (a /logout on another node, or their time ran out).
        self._held: dict[str, set[Callable[[], None]]] = {}
        self.recheck_s = RECHECK_S
        self._rechecking: asyncio.Task[None] | None = None

    @property
    def _queue(self) -> JobQueue:
        return self.app[QUEUE_KEY]

    def sign(self, principal: str, session_id: str) -> str:
        return self._signers[principal].sign(f"{_b64(principal)}.{session_id}").decode()

    def unsign(self, value: str) -> tuple[str, str] | None:
        """(principal, session id) of a cookie value signed for a principal that still has a token, and
        not older than the TTL; None for anything else."""
        if not value or len(value) > MAX_COOKIE_CHARS:
            return None
        encoded, _, _ = value.partition(".")
        principal = _unb64(encoded)
        signer = None if principal is None else self._signers.get(principal)
        if principal is None or signer is None:  # no such principal, or its token is gone from the config
            return None
        try:  # the age is checked here, not by itsdangerous, which refuses a timestamp 1 s ahead of this clock
            signed, signed_at = signer.unsign(value, return_timestamp=True)
            payload = signed.decode()
        except (BadSignature, UnicodeError):
            return None
        age_s = time.time() - signed_at.timestamp()
        if not -CLOCK_SKEW_S <= age_s <= self.ttl_s + CLOCK_SKEW_S:
            return None
        prefix, _, session_id = payload.partition(".")
        if prefix != encoded or not session_id:
            return None
        return principal, session_id

    async def create(self, principal: str) -> tuple[Session, str]:
        """A new session of ``principal`` and its cookie value."""
        session = Session(id=secrets.token_urlsafe(32), principal=principal, csrf=secrets.token_urlsafe(32))
        queue = self._queue
        await queue.store.create_session(_digest(session.id), principal=principal, csrf=session.csrf,
                                         expires_at=queue.clock() + self.ttl_s)
        return session, self.sign(principal, session.id)

    async def end(self, session: Session) -> None:
        """End ``session``, and with it the streams and sockets it opened on this node (the others' end
        within ``recheck_s``)."""
        await self._queue.store.delete_session(_digest(session.id))
        self._end_streams(session.id)

    @contextlib.contextmanager
    def hold(self, session: Session, end: Callable[[], None]) -> Iterator[None]:
        enders = self._held.setdefault(session.id, set())
        enders.add(end)
        if self._rechecking is None or self._rechecking.done():
            self._rechecking = asyncio.create_task(self._recheck_loop(), name="asyncjobs-session-recheck")
        try:
            yield
        finally:
            enders.discard(end)
            if not enders and self._held.get(session.id) is enders:
                del self._held[session.id]

    def _end_streams(self, session_id: str) -> None:
        for end in self._held.pop(session_id, set()):
            end()

    async def _recheck_loop(self) -> None:
        """While streams are open on sessions: ask the store every ``recheck_s`` which of them still stand."""
        while self._held:
            await asyncio.sleep(self.recheck_s)
            queue = self._queue
            for session_id in list(self._held):
                try:
                    stored = await queue.store.session(_digest(session_id), now=queue.clock())
                except Exception as exc:  # (the store away, or closing): ask again next time
                    log.debug("sessions: cannot recheck the open streams' sessions (%s)", exc)
                    break
                if stored is None:
                    log.info("ending the event streams and sockets of a session that ended")
                    self._end_streams(session_id)

    async def close(self, _app: web.Application) -> None:
        if self._rechecking is not None:
            self._rechecking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rechecking

    async def resolve(self, request: web.Request) -> Session | None:
        """The request's session, if its cookie is valid in every way (see the module doc); no CSRF check."""
        value = request.cookies.get(COOKIE_NAME)
        unsigned = None if value is None else self.unsign(value)
        if unsigned is None:
            return None
        principal, session_id = unsigned
        queue = self._queue
        stored = await queue.store.session(_digest(session_id), now=queue.clock())
        if stored is None:  # expired, ended by /logout, or never existed
            return None
        stored_principal, csrf = stored
        if not hmac.compare_digest(stored_principal.encode(), principal.encode()):
            return None
        if principal not in self._signers:
            return None
        return Session(id=session_id, principal=principal, csrf=csrf)

    async def authenticate(self, request: web.Request) -> Session | None:
        session = await self.resolve(request)
        if session is None:
            return None
        check_origin(request)
        # A task mounted on GET still submits: it changes state as a POST does.
        if request.method not in SAFE_METHODS or request.match_info.route in request.app[SUBMIT_ROUTES_KEY]:
            await check_csrf(request, session, form=_form_route(request))
        return session

    def sign_in_redirect(self, request: web.Request) -> web.StreamResponse | None:
        if request.method not in ("GET", "HEAD") or not pages.wants_html(request):
            return None
        return web.Response(status=303, headers={
            "Location": login_url(safe_next(str(request.rel_url))), "Cache-Control": "no-store", "Vary": "Accept"})


def _form_route(request: web.Request) -> bool:
    route = request.match_info.route
    resource = getattr(route, "resource", None)
    return resource is not None and resource.canonical in FORM_ROUTES


def _hosts(request: web.Request) -> list[str]:
    hosts = [request.headers.get("Host", "")]
    for value in request.headers.getall("X-Forwarded-Host", []):
        hosts += [h.strip() for h in value.split(",")]
    return hosts


def check_origin(request: web.Request) -> None:
    """A request from another origin may not use the cookie (403). Browsers send ``Origin`` on every
    WebSocket handshake and every POST; same-origin GETs often carry none, which is fine."""
    origin = request.headers.get("Origin")
    if origin is not None and not same_origin(origin, _hosts(request)):
        raise Forbidden("a request from another origin cannot use this site's sign-in session")


async def check_csrf(request: web.Request, session: Session, *, form: bool) -> None:
    """403 unless the request carries the session's CSRF token (header, or with ``form`` the form field)."""
    given = request.headers.get(CSRF_HEADER)
    if given is None and form and request.content_type == FORM_TYPE:
        value = (await _form(request)).get(CSRF_FIELD)
        given = value if isinstance(value, str) else None
    if not given:
        raise Forbidden(f"a request made with the sign-in cookie must carry the page's CSRF token in {CSRF_HEADER}")
    if not _equal(given, session.csrf):
        raise Forbidden("the CSRF token does not match this sign-in session")


async def _form(request: web.Request) -> MultiDictProxy[str | bytes | bytearray | web.FileField]:
    """The request's form fields; 400 for a body that is not text in its charset, 415 for an unknown charset."""
    refuse_undecodable(request)
    try:
        return await request.post()
    except LookupError:
        raise UnsupportedType(f"the form's charset {request.charset!r} is not known; send it as UTF-8") from None
    except ValueError:  # UnicodeDecodeError included
        raise InvalidRequest(f"the form is not valid {request.charset or 'UTF-8'} text") from None


# -- handlers -------------------------------------------------------------------------

async def login_page(request: web.Request) -> web.StreamResponse:
    """``GET /login``: the sign-in form, ``next`` carried in a hidden field."""
    return pages.login_page(safe_next(request.query.get("next", "/")))


async def login(request: web.Request) -> web.StreamResponse:
    """``POST /login``: a valid token starts a session (303 to ``next``); a wrong one gets the page and 401."""
    sessions: Sessions = request.app[SESSIONS_KEY]  # type: ignore[assignment]
    origin = request.headers.get("Origin")
    site = request.headers.get("Sec-Fetch-Site", "").lower()
    if (origin is not None and not same_origin(origin, _hosts(request))) or site in ("cross-site", "same-site"):
        raise Forbidden("sign in from this site's own page")  # login CSRF: a foreign form cannot sign you in
    if request.content_type != FORM_TYPE:
        raise UnsupportedType(f"send the sign-in form as {FORM_TYPE}")
    form = await _form(request)
    token, next_value = form.get("token"), form.get("next")
    next_path = safe_next(next_value)
    token = token.strip() if isinstance(token, str) else ""
    principal = find_principal(request.app[SETTINGS_KEY].tokens, token) if token else None
    if principal is None:
        log.info("sign-in refused from %s: the token is not valid", request.remote)
        return pages.login_page(next_path, status=401, error="That token is not valid. Check it and try again.",
                                headers=BEARER_CHALLENGE)
    previous = await sessions.resolve(request)
    if previous is not None:  # signing in again: the old session ends, never to be reused
        await sessions.end(previous)
    _session, value = await sessions.create(principal)
    log.info("sign-in: %s from %s", principal, request.remote)
    response = web.Response(status=303, headers={"Location": next_path, "Cache-Control": "no-store"})
    response.set_cookie(COOKIE_NAME, value, **cookie_attributes(
        max_age_s=sessions.ttl_s, secure=is_https(request.secure, request.headers)))
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    """``POST /logout``: end the session (its CSRF token required), clear the cookie, 303 to ``/login``."""
    sessions: Sessions = request.app[SESSIONS_KEY]  # type: ignore[assignment]
    session = await sessions.resolve(request)
    if session is not None:
        await check_csrf(request, session, form=True)
        await sessions.end(session)
    response = web.Response(status=303, headers={"Location": "/login", "Cache-Control": "no-store"})
    attributes = cookie_attributes(max_age_s=1, secure=is_https(request.secure, request.headers))
    response.del_cookie(COOKIE_NAME, path="/", secure=attributes["secure"], httponly=True, samesite="Strict")
    return response


def add_routes(app: web.Application, settings: WebSettings) -> None:
    """With auth on: the sign-in routes, and the cookie side of the auth middleware."""
    if not settings.tokens:
        return
    sessions = app[SESSIONS_KEY] = Sessions(app, settings)
    app.on_cleanup.append(sessions.close)
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
