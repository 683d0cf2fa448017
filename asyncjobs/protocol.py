"""Pure HTTP decisions of the protocol: status codes, headers and the job representation.

Nothing here does I/O, so every rule can be tested without a server.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from email.utils import formatdate, parsedate_to_datetime
from enum import StrEnum
from typing import Any
from urllib.parse import quote, urlencode

from . import codec
from .errors import InvalidRequest
from .models import Job, Status

JOBS_PATH = "/jobs"
MAX_LIST_LIMIT = 500
DEFAULT_LIST_LIMIT = 50
MAX_RETRY_AFTER_S = 60
NO_STORE = {"Cache-Control": "no-store"}


@dataclass(frozen=True)
class Answer:
    """A status code and the headers that go with it (the body is the caller's)."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)


# -- the representation ----------------------------------------------------

def job_url(job_id: str) -> str:
    return f"{JOBS_PATH}/{job_id}"


def job_links(job_id: str) -> dict[str, Any]:
    url = job_url(job_id)
    return {
        "self": url,
        "result": f"{url}/result",
        "events": f"{url}/events",
        "cancel": {"href": f"{url}/cancel", "method": "POST"},
        "delete": {"href": url, "method": "DELETE"},
    }


def job_body(job: Job, *, eta: float | None = None, queue_position: int | None = None) -> dict[str, Any]:
    """The job representation of the protocol, ready for ``codec.dumps``."""
    result: Any = None
    if job.status is Status.SUCCEEDED and job.result is not None:
        if job.result_type is None:
            result = codec.Fragment(job.result)
        else:
            result = {"content_type": job.result_type, "size": len(job.result),
                      "href": f"{job_url(job.id)}/result"}
    pending = job.status in (Status.QUEUED, Status.RUNNING)
    return {
        "id": job.id,
        "task": job.task,
        "status": job.status.value,
        "created_at": codec.isotime(job.created_at),
        "started_at": codec.isotime(job.started_at),
        "finished_at": codec.isotime(job.finished_at),
        "expires_at": codec.isotime(job.expires_at),
        "attempts": job.attempts,
        "priority": job.priority,
        "version": job.version,
        "progress": job.progress if job.status is Status.RUNNING or job.terminal else None,
        "eta": codec.isotime(eta) if pending else None,
        "queue_position": queue_position if job.status is Status.QUEUED else None,
        "run_at": codec.isotime(job.run_at) if job.status is Status.QUEUED else None,
        "result": result,
        "error": job.error if job.status in (Status.FAILED, Status.CANCELED) else None,
        "owner": job.owner or None,
        "files": None if job.files is None else {"inputs": job.files.get("inputs") or {},
                                                 "result": job.files.get("result")},
        "links": job_links(job.id),
    }


# -- caching ---------------------------------------------------------------

def etag(job: Job) -> str:
    """Weak: ``eta`` and ``queue_position`` may move between versions."""
    return version_etag(job.version)


def version_etag(version: int) -> str:
    return f'W/"{version}"'


def page_etag(job: Job) -> str:
    """The HTML job page's: another representation of the job than the JSON one, so another tag."""
    return f'W/"{job.version}-html"'


def etag_matches(if_none_match: str | None, current: str) -> bool:
    """Weak comparison (RFC 9110 13.1.2) of an ``If-None-Match`` list against ``current``."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    wanted = current.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == wanted for tag in if_none_match.split(","))


def job_headers(job: Job) -> dict[str, str]:
    return {"ETag": etag(job), **NO_STORE}


def retry_after_s(eta: float | None, now: float) -> int:
    """Seconds until the next poll is worth it: from the ETA, at least 1, at most a minute."""
    if eta is None:
        return 1
    return int(min(MAX_RETRY_AFTER_S, max(1, math.ceil(eta - now))))


# -- answers -----------------------------------------------------------------

def submit_answer(job: Job, *, eta: float | None, now: float) -> Answer:
    url = job_url(job.id)
    return Answer(202, {"Location": url, "Content-Location": url,
                        "Retry-After": str(retry_after_s(eta, now)), **job_headers(job)})


class MonitorStyle(StrEnum):
    """How the status monitor answers (``protocol.monitor``); the values are the config's words."""

    REST = "rest"  # 200 while pending, 303 to the result when succeeded
    FLOW = "flow"  # 202 + Location while pending, 200 when done (Logic Apps, Azure pollers)


def monitor_answer(job: Job, *, eta: float | None, now: float, style: MonitorStyle = MonitorStyle.REST,
                   redirect: bool = True) -> Answer:
    """The status monitor: rest (200 / 303 / 200) or flow (202 while pending, 200 when done)."""
    headers = job_headers(job)
    pending = job.status in (Status.QUEUED, Status.RUNNING)
    if pending:
        headers["Retry-After"] = str(retry_after_s(eta, now))
        if style == MonitorStyle.FLOW:
            return Answer(202, {**headers, "Location": job_url(job.id)})
        return Answer(200, headers)
    if job.status is Status.SUCCEEDED and style == MonitorStyle.REST and redirect:
        return Answer(303, {**headers, "Location": f"{job_url(job.id)}/result"})
    return Answer(200, headers)


# A result's bytes are served as their task typed them (a Blob): a browser must neither guess another type
# nor run what they hold (an SVG or HTML result with a script) in this site's origin, where it could act
# with the viewer's sign-in session. A sandboxed document has an origin of its own and runs no script.
RESULT_SAFETY = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"}


def result_answer(job: Job, *, eta: float | None, now: float, if_none_match: str | None = None) -> Answer:
    """200 with the result (304 when ``If-None-Match`` names its ETag: RFC 9110 13.1.2); 404 while it does
    not exist yet; 409 when it never will. A file result has validators of its own (``file_answer``)."""
    headers = job_headers(job)
    if job.status is Status.SUCCEEDED:
        if etag_matches(if_none_match, headers["ETag"]):
            return Answer(304, headers)
        return Answer(200, {**headers, **RESULT_SAFETY})
    if job.status in (Status.QUEUED, Status.RUNNING):
        return Answer(404, {**headers, "Retry-After": str(retry_after_s(eta, now))})
    return Answer(409, headers)


def cancel_answer(job: Job, *, stopped: bool) -> Answer:
    return Answer(200 if stopped else 202, job_headers(job))


# -- request parsing -----------------------------------------------------------

_JSON_TYPE = re.compile(r"^application/(?:[\w.+-]+\+)?json$", re.IGNORECASE)


MAX_JSON_DEPTH = 64


def json_depth(value: Any) -> int:
    """How deeply arrays and objects nest (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_JSON_DEPTH:
            stack.extend((child, depth + 1) for child in children)
    return deepest


def too_deep(raw: bytes, value: Any) -> bool:
    """Whether the JSON ``value`` decoded from ``raw`` nests deeper than ``MAX_JSON_DEPTH``. A text with
    no more brackets than that cannot (a typical submit has two or three), so the walk is skipped for it."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return False
    return json_depth(value) > MAX_JSON_DEPTH


def undecodable_coding(content_encoding: str | None, decodable: Collection[str]) -> bool:
    """Whether a request body's ``Content-Encoding`` is one the server cannot undo (RFC 9110, section 8.4.1:
    ``415``): anything but none, ``identity``, or exactly one of the ``decodable`` codings (the HTTP stack undoes
    one coding, not a list of them). Such a body is refused, never read as if it were plain."""
    value = (content_encoding or "").strip().lower()
    return bool(value) and value not in decodable and any(c.strip() != "identity" for c in value.split(","))


def is_json_content_type(content_type: str | None) -> bool:
    if not content_type:
        return False
    return bool(_JSON_TYPE.match(content_type.split(";", 1)[0].strip()))


@dataclass(frozen=True)
class Submit:
    task: Any
    params: Any
    priority: int = 0
    delay_s: float = 0.0
    callback_url: str | None = None

    def fingerprint(self) -> str:
        """What makes two submits "the same request" for an Idempotency-Key."""
        return codec.fingerprint([self.task, self.params, self.priority, self.delay_s, self.callback_url])


def parse_submit(body: Any) -> Submit:
    """Check a submit body's shape (the task and params are checked against the registry later)."""
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object", errors=[{"field": "", "message": "expected object"}])
    errors = []
    unknown = sorted(set(body) - {"task", "params", "priority", "delay", "callback_url"})
    for name in unknown:
        errors.append({"field": name, "message": "is not a field of a submit"})
    params = body.get("params", {})
    if params is None:
        params = {}
    priority = body.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool) or not -2**31 <= priority < 2**31:
        errors.append({"field": "priority", "message": "expected an integer"})
    delay = body.get("delay", 0)
    if delay is None:
        delay = 0
    if not isinstance(delay, (int, float)) or isinstance(delay, bool) or not 0 <= delay <= 10**9:
        errors.append({"field": "delay", "message": "expected a number of seconds, 0 or more"})
    callback_url = body.get("callback_url")
    if callback_url is not None and (not isinstance(callback_url, str) or len(callback_url) > 2000):
        errors.append({"field": "callback_url", "message": "expected a URL"})
    if errors:
        raise InvalidRequest("invalid submit: " + "; ".join(f"{e['field']} {e['message']}" for e in errors),
                         errors=errors)
    return Submit(body.get("task"), params, priority, float(delay), callback_url)


MAX_IDEMPOTENCY_KEY = 255


def parse_idempotency_key(value: str | None) -> str | None:
    if value is None:
        return None
    key = value.strip()
    if not 0 < len(key) <= MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise InvalidRequest(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters",
                         errors=[{"field": "Idempotency-Key", "message": "malformed"}])
    return key


def see_other_answer(job: Job) -> Answer:
    """A unique task's live job already does this work: go there."""
    return Answer(303, {"Location": job_url(job.id), **job_headers(job)})


@dataclass(frozen=True)
class ListQuery:
    status: str | None
    task: str | None
    limit: int
    before: int | None  # the cursor: jobs submitted before this one
    owner: str | None = None  # an admin's filter by principal


def parse_list_query(query: Mapping[str, str]) -> ListQuery:
    """``GET /jobs``'s filters, limit and cursor; InvalidRequest if off."""
    errors = []
    status = query.get("status")
    if status is not None and status not in {s.value for s in Status}:
        errors.append({"field": "status", "message": f"expected one of {', '.join(s.value for s in Status)}"})
    task = query.get("task")
    limit = DEFAULT_LIST_LIMIT
    if "limit" in query:
        try:
            limit = int(query["limit"])
            if not 1 <= limit <= MAX_LIST_LIMIT:
                raise ValueError
        except ValueError:
            errors.append({"field": "limit", "message": f"expected an integer from 1 to {MAX_LIST_LIMIT}"})
    before = None
    if "cursor" in query:
        try:
            before = int(query["cursor"])
            if not 1 <= before < 2**63:  # a SQLite integer
                raise ValueError
        except ValueError:
            errors.append({"field": "cursor", "message": "not a cursor this server gave out"})
    if errors:
        raise InvalidRequest("invalid list query", errors=errors)
    return ListQuery(status, task, limit, before, query.get("owner"))


def next_page_url(*, status: str | None, task: str | None, limit: int, cursor: int | None,
                  owner: str | None = None) -> str | None:
    """The next page's URL, or None when this page is the last."""
    if cursor is None:
        return None
    params = [("status", status), ("task", task), ("owner", owner), ("limit", str(limit)), ("cursor", str(cursor))]
    return f"{JOBS_PATH}?{urlencode([(k, v) for k, v in params if v is not None])}"


def parse_bool(value: str | None, default: bool) -> bool:
    if value is None:
        return default
    return value.strip().lower() not in ("false", "0", "no", "off")


# -- waiting: Prefer, long polls, submit-and-wait ----------------------------------

def parse_prefer(header: str | None) -> dict[str, str]:
    """Preferences of an RFC 7240 ``Prefer`` header, names lower-cased; malformed parts are ignored."""
    prefs: dict[str, str] = {}
    for item in (header or "").split(","):
        token = item.split(";", 1)[0].strip()
        if not token:
            continue
        name, _, value = token.partition("=")
        name = name.strip().lower()
        if name and name not in prefs:
            prefs[name] = value.strip().strip('"')
    return prefs


def _seconds(value: str) -> float | None:
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def requested_wait(query: Mapping[str, str], prefer: str | None) -> float | None:
    """Seconds a request asks to be held: ``?wait=N`` (a 400 if malformed) or ``Prefer: wait=N`` (ignored
    if malformed)."""
    if "wait" in query:
        seconds = _seconds(query["wait"])
        if seconds is None:
            raise InvalidRequest("wait must be a number of seconds, 0 or more",
                             errors=[{"field": "wait", "message": "expected a non-negative number"}])
        return seconds
    value = parse_prefer(prefer).get("wait")
    return None if value is None else _seconds(value)


def applied_wait(requested: float, max_wait_s: float) -> float:
    return min(requested, max_wait_s)


def applied_seconds(applied: float) -> str:
    """The wait as it was asked for (``wait=N``, clamped): whole seconds as RFC 7240's delta-seconds, a
    fraction (which only a client that sent one gets) in plain decimals, never in exponent notation."""
    if applied == int(applied):
        return str(int(applied))
    return f"{Decimal(repr(applied)):f}"


def wait_headers(applied: float | None) -> dict[str, str]:
    """``Preference-Applied`` says how long the server actually waited (clamped); ``Vary`` always."""
    headers = {"Vary": "Prefer"}
    if applied is not None:
        headers["Preference-Applied"] = f"wait={applied_seconds(applied)}"
    return headers


def submit_wait_answer(job: Job, *, eta: float | None, now: float) -> Answer:
    """After ``Prefer: wait``: 201 if it succeeded, 200 if it failed or was canceled, else the usual 202."""
    if job.status is Status.SUCCEEDED:
        return Answer(201, {"Location": f"{job_url(job.id)}/result", "Content-Location": job_url(job.id),
                            **job_headers(job)})
    if job.terminal:
        return Answer(200, {"Content-Location": job_url(job.id), **job_headers(job)})
    return submit_answer(job, eta=eta, now=now)


def long_poll_done(job: Job, if_none_match: str | None) -> bool:
    """A long poll answers once the job is terminal, or (with If-None-Match) once it changed at all."""
    if if_none_match and not job.terminal:
        return not etag_matches(if_none_match, etag(job))
    return job.terminal


# -- Server-Sent Events ------------------------------------------------------------

def parse_last_event_id(value: str | None) -> int | None:
    """Event ids are job versions; anything else is treated as absent."""
    if value is None:
        return None
    try:
        version = int(value.strip())
    except ValueError:
        return None
    return version if version >= 0 else None


def sse_event_name(job: Job, last_status: Status | None) -> str:
    return "status" if job.status is not last_status else "progress"


def sse_event(job: Job, name: str, body: dict[str, Any]) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (job.version, name.encode(), codec.dumps(body))


SSE_KEEPALIVE = b": keep-alive\n\n"


# -- the WebSocket channel ------------------------------------------------------------

MAX_IDS_PER_SOCKET = 10_000


class WsOp(StrEnum):
    """What a client frame on the WebSocket asks (the values are the wire strings)."""

    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"


@dataclass(frozen=True)
class WsCommand:
    op: WsOp
    jobs: list[str] | None  # None: every job the caller may see ("*")
    progress: bool = False


def parse_ws_frame(data: Any) -> WsCommand:
    """A client frame (already JSON-decoded) as a command; ``InvalidRequest`` saying what is wrong."""
    if not isinstance(data, dict):
        raise InvalidRequest("a frame must be a JSON object")
    op = data.get("op")
    if op not in ("subscribe", "unsubscribe"):
        raise InvalidRequest("op must be 'subscribe' or 'unsubscribe'")
    op = WsOp(op)
    jobs = data.get("jobs")
    if jobs == "*":
        ids = None
    elif isinstance(jobs, list) and all(isinstance(j, str) and 0 < len(j) <= 200 for j in jobs):
        ids = list(dict.fromkeys(jobs))
        if len(ids) > MAX_IDS_PER_SOCKET:
            raise InvalidRequest(f"at most {MAX_IDS_PER_SOCKET} ids per frame")
    else:
        raise InvalidRequest('jobs must be a list of job ids or "*"')
    progress = data.get("progress", False)
    if not isinstance(progress, bool):
        raise InvalidRequest("progress must be true or false")
    return WsCommand(op=op, jobs=ids, progress=progress)


def ws_error(status: int, detail: str, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "status": status, "detail": detail, **extra}


# -- file results: validators, ranges, download headers ---------------------------

@dataclass(frozen=True)
class FileAnswer:
    """How to answer a request for a file result: the status, headers, and which bytes to send."""

    status: int  # 200, 206, 304, 412 or 416
    headers: dict[str, str]
    start: int = 0
    length: int = 0


def file_etag(sha256: str) -> str:
    """Strong: the bytes of a file result never change, and its digest names them."""
    return f'"{sha256}"'


def repr_digest(sha256: str) -> str:
    """RFC 9530 ``Repr-Digest`` of the whole file."""
    return f"sha-256=:{base64.b64encode(bytes.fromhex(sha256)).decode()}:"


def content_disposition(name: str) -> str:
    """RFC 6266: an ASCII ``filename`` for old clients and the exact name as ``filename*``."""
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\%' else "_" for c in name) or "file"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One ``bytes`` range as (first, last) inclusive, clamped to the file; None when it is malformed,
    multiple, reversed or cannot be satisfied (all answered 416)."""
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_s, dash, last_s = spec.strip().partition("-")
    first_s, last_s = first_s.strip(), last_s.strip()
    if not dash or not (first_s or last_s) or not all(p.isascii() and p.isdigit() for p in (first_s, last_s) if p):
        return None
    if not first_s:  # the last n bytes
        n = int(last_s)
        return (max(0, size - n), size - 1) if n > 0 and size > 0 else None
    first = int(first_s)
    last = min(int(last_s), size - 1) if last_s else size - 1
    if first >= size or (last_s and int(last_s) < first):
        return None
    return first, last


_OTHER_UNIT = re.compile(r"\s*[!#$%&'*+.^_`|~0-9A-Za-z-]+\s*=")


def ignores_range(header: str) -> bool:
    """A well-formed Range of a unit other than ``bytes``: RFC 9110 (14.2) says to ignore it (the whole
    file), not to refuse it."""
    return _OTHER_UNIT.match(header) is not None and header.partition("=")[0].strip().lower() != "bytes"


def _strong_match(if_match: str, etag: str) -> bool:
    """``If-Match`` (RFC 9110, 13.1.1): ``*``, or a listed entity-tag strongly equal to ``etag``."""
    return if_match.strip() == "*" or any(tag.strip() == etag for tag in if_match.split(","))


def _http_date(value: str | None) -> float | None:
    """An HTTP-date as a timestamp; None when absent or not a valid date (such a condition is ignored)."""
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def _if_range_holds(if_range: str, etag: str, last_modified: str) -> bool:
    """An entity-tag must match strongly (a weak one never does); a date must equal Last-Modified."""
    value = if_range.strip()
    if value.startswith(('"', "W/")):
        return value == etag
    return value == last_modified


def file_answer(*, sha256: str, size: int, name: str, content_type: str, stored_at: float, method: str,
                range_header: str | None, if_range: str | None, if_none_match: str | None,
                if_match: str | None = None, if_unmodified_since: str | None = None,
                if_modified_since: str | None = None) -> FileAnswer:
    """The answer to GET or HEAD of a stored file result: RFC 9110 ranges, and its preconditions in their
    order (13.2.2): If-Match, else If-Unmodified-Since (412); If-None-Match, else If-Modified-Since (304);
    then If-Range."""
    etag = file_etag(sha256)
    last_modified = formatdate(stored_at, usegmt=True)
    modified = math.floor(stored_at)  # Last-Modified's precision
    validators = {"ETag": etag, "Last-Modified": last_modified, "Cache-Control": "private",
                  "Accept-Ranges": "bytes"}
    if if_match is not None:
        if not _strong_match(if_match, etag):
            return FileAnswer(412, validators)
    elif (unmodified_since := _http_date(if_unmodified_since)) is not None and modified > unmodified_since:
        return FileAnswer(412, validators)
    if if_none_match:
        if etag_matches(if_none_match, etag):
            return FileAnswer(304, validators)
    elif (modified_since := _http_date(if_modified_since)) is not None and modified <= modified_since:
        return FileAnswer(304, validators)
    headers = {**validators, "Content-Type": content_type, "Content-Disposition": content_disposition(name),
               "Repr-Digest": repr_digest(sha256), **RESULT_SAFETY}
    if range_header is None or method != "GET" or ignores_range(range_header) or (
            if_range is not None and not _if_range_holds(if_range, etag, last_modified)):
        return FileAnswer(200, headers, 0, size)
    span = parse_range(range_header, size)
    if span is None:
        return FileAnswer(416, {**validators, "Content-Range": f"bytes */{size}"})
    first, last = span
    return FileAnswer(206, {**headers, "Content-Range": f"bytes {first}-{last}/{size}"}, first, last - first + 1)


# -- quotas --------------------------------------------------------------------------

def ratelimit_headers(*, burst: int, window_s: int, left: int, next_s: int) -> dict[str, str]:
    """The RateLimit header fields (draft-ietf-httpapi-ratelimit-headers, structured form) of a submit."""
    return {"RateLimit-Policy": f'"submit";q={burst};w={window_s}', "RateLimit": f'"submit";r={left};t={next_s}'}


def rate_retry_after_s(wait_s: float) -> int:
    """Seconds until a token is free, rounded up, at least 1."""
    return max(1, math.ceil(wait_s))


def wants_fresh(cache_control: str | None) -> bool:
    """``Cache-Control: no-cache`` on a submit: make a new job even when an equal one could answer."""
    return any(d.split("=", 1)[0].strip().lower() == "no-cache" for d in (cache_control or "").split(","))


def reuse_answer(job: Job, *, eta: float | None, now: float, waited: bool) -> Answer:
    """An equal job answers a submit: 303 to it; after ``Prefer: wait``, 201/200 as for a new one if it
    ended in time."""
    if waited and job.terminal:
        return submit_wait_answer(job, eta=eta, now=now)
    return see_other_answer(job)
