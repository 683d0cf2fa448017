"""Pure decisions of the client side of the protocol: what an answer means and where to go next.

Nothing here does I/O, so every rule is tested without a server; ``aio`` does the I/O around them.
"""

from __future__ import annotations

import base64
import math
import mimetypes
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, unquote

from yarl import URL

from .. import codec
from .errors import (
    ClientError,
    JobCanceled,
    JobError,
    JobFailed,
    ProtocolError,
    error_for_answer,
)

STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})
CHANNELS = ("websocket", "long_poll", "poll")  # how to wait, best first
MAX_RETRY_AFTER_S = 60.0


# -- the job representation ----------------------------------------------------------

@dataclass(frozen=True)
class JobState:
    """One job as the server described it at one moment (its ``version``)."""

    id: str
    status: str
    task: str | None = None
    version: int | None = None
    fraction: float | None = None  # progress, 0..1, when the handler reports it
    message: str | None = None  # the handler's progress message
    eta: datetime | None = None
    queue_position: int | None = None
    result: Any = None  # the JSON result; for a bytes result, a {"content_type", "size", "href"} description
    error: dict[str, Any] | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    expires_at: datetime | None = None
    attempts: int | None = None
    priority: int | None = None
    url: str = ""  # the status monitor (absolute)
    result_url: str = ""  # the result resource (absolute)
    files: dict[str, Any] | None = None  # {"inputs": {param: file}, "result": file or None}; None without files
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # as received
    # a submit was answered with this earlier, equal job (303 See Other) instead of a new one
    reused: bool = field(default=False, compare=False)

    @property
    def terminal(self) -> bool:
        """Whether the job is finished: succeeded, failed or canceled."""
        return self.status in TERMINAL_STATUSES

    @property
    def result_file(self) -> dict[str, Any] | None:
        """The file result's ``{"name", "size", "content_type", "sha256"}``, or None (no file result, or not yet)."""
        result = (self.files or {}).get("result")
        return result if isinstance(result, dict) else None


def parse_time(value: Any) -> datetime | None:
    """An RFC 3339 time as an aware datetime; anything else is None (these fields are informative)."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)  # Python 3.11 reads the "Z" of RFC 3339
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _link(links: Any, name: str) -> str | None:
    link = links.get(name) if isinstance(links, dict) else None
    if isinstance(link, dict):
        link = link.get("href")
    return link if isinstance(link, str) and link else None


def parse_job(body: Any, *, base: str, monitor_url: str | None = None, result_url: str | None = None) -> JobState:
    """The job representation as a ``JobState``; ``ProtocolError`` if ``body`` is not one.

    URLs come from the answer's headers when given, else from the job's ``links``, else the
    protocol's paths, resolved against ``base``.
    """
    if not isinstance(body, dict) or not isinstance(body.get("id"), str) or not body["id"]:
        raise ProtocolError("the answer is not a job (no id): is this an asyncjobs server?")
    if body.get("status") not in STATUSES:
        raise ProtocolError(f"the answer is not a job (status {body.get('status')!r}): is this an asyncjobs server?")
    job_id, links = body["id"], body.get("links")
    progress: dict[str, Any] = body["progress"] if isinstance(body.get("progress"), dict) else {}
    fraction = progress.get("fraction")
    message = progress.get("message")
    self_url = monitor_url or resolve(base, _link(links, "self") or job_path(job_id))
    return JobState(
        id=job_id, status=body["status"], task=body.get("task") if isinstance(body.get("task"), str) else None,
        version=_int_or_none(body.get("version")),
        fraction=float(fraction) if isinstance(fraction, (int, float)) and not isinstance(fraction, bool) else None,
        message=message if isinstance(message, str) else None,
        eta=parse_time(body.get("eta")), queue_position=_int_or_none(body.get("queue_position")),
        result=body.get("result"), error=body.get("error") if isinstance(body.get("error"), dict) else None,
        created_at=parse_time(body.get("created_at")), started_at=parse_time(body.get("started_at")),
        finished_at=parse_time(body.get("finished_at")), expires_at=parse_time(body.get("expires_at")),
        attempts=_int_or_none(body.get("attempts")), priority=_int_or_none(body.get("priority")),
        url=self_url,
        result_url=result_url or resolve(base, _link(links, "result") or f"{job_path(job_id)}/result"),
        files=body.get("files") if isinstance(body.get("files"), dict) else None,
        raw=body,
    )


def job_error(state: JobState) -> JobError | None:
    """``JobFailed`` / ``JobCanceled`` for a job that ended without a result, else None."""
    if state.status not in ("failed", "canceled"):
        return None
    error = state.error or {}
    reason = ": ".join(str(error[k]) for k in ("type", "message") if error.get(k))
    message = f"job {state.id} {state.status}" + (f" ({reason})" if reason else "")
    kind = JobFailed if state.status == "failed" else JobCanceled
    return kind(message, job=state, url=state.url or None)


def is_newer(state: JobState, last: JobState | None) -> bool:
    """Whether ``state`` is news after ``last``: by ``version``, or by content if there is none."""
    if last is None:
        return True
    if state.version is not None and last.version is not None:
        return state.version > last.version
    return state.raw != last.raw


# -- URLs -------------------------------------------------------------------------------

def base_url(url: str) -> str:
    """The service's root URL, ending in ``/``; ``ValueError`` unless it is an http(s) URL with a host."""
    parsed = URL(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"not an http(s) URL: {url!r}")
    path = parsed.path if parsed.path.endswith("/") else parsed.path + "/"
    return str(parsed.with_path(path).with_query(None).with_fragment(None))


def resolve(base: str, ref: str) -> str:
    """``ref`` (absolute, or relative like ``Location: /jobs/1``) made absolute against ``base``."""
    return str(URL(base).join(URL(ref)))


def job_path(job_id: str) -> str:
    """The protocol's monitor path, relative to the service root (ids are opaque: quoted, never parsed)."""
    return f"jobs/{quote(job_id, safe='')}"


ACTION_PATHS = {"cancel": "/cancel", "delete": ""}


def action_url(job: str | JobState, action: str, *, base: str) -> str:
    """Where to send ``cancel`` or ``delete``: the job's own link when it has one, else the protocol's path."""
    if isinstance(job, JobState):
        href = _link(job.raw.get("links"), action)
        if href:
            return resolve(job.url or base, href)
        job = job.id
    return resolve(base, job_path(job) + ACTION_PATHS[action])


def websocket_url(base: str) -> str:
    """The WebSocket channel's URL (``ws``/``wss``) under the service root."""
    url = URL(resolve(base, "ws"))
    return str(url.with_scheme("wss" if url.scheme == "https" else "ws"))


def with_query(url: str, query: Mapping[str, str]) -> str:
    """``url`` with these query parameters set (the others kept)."""
    return str(URL(url).update_query(dict(query))) if query else url


def with_wait(url: str, wait_s: float) -> str:
    """The monitor URL as a long poll of ``wait_s`` seconds."""
    return str(URL(url).update_query(wait=f"{wait_s:g}"))


# -- answers ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Answer:
    """An HTTP answer as read by the client: header names lower-cased, a JSON body decoded."""

    method: str
    url: str
    status: int
    headers: Mapping[str, str]
    content_type: str
    body: Any  # decoded JSON, or bytes when the answer is not JSON

    def header(self, name: str) -> str | None:
        """A header's value (names are case-insensitive), or None."""
        return self.headers.get(name.lower())


_JSON_TYPE = re.compile(r"^application/(?:[\w.+-]+\+)?json$", re.IGNORECASE)


def is_json(content_type: str) -> bool:
    """Whether a Content-Type is JSON (``application/json`` or ``application/*+json``)."""
    return bool(_JSON_TYPE.match(content_type.split(";", 1)[0].strip()))


def decode_body(content_type: str, raw: bytes) -> Any:
    """JSON bodies decoded (``ProtocolError`` if malformed); any other body stays bytes."""
    if not is_json(content_type):
        return raw
    try:
        return codec.loads(raw) if raw else None
    except codec.JSONDecodeError:
        raise ProtocolError(f"the answer claims {content_type or 'JSON'} but is not valid JSON") from None


def retry_after_s(value: str | None, *, now: float) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), at most a minute."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, IndexError):
            return None
    if not math.isfinite(seconds):
        return None
    return min(MAX_RETRY_AFTER_S, max(0.0, seconds))


def answer_error(answer: Answer, *, now: float) -> ClientError | None:
    """The exception a 4xx/5xx answer stands for, or None for any other answer.

    Problem details become typed errors; a 4xx without them (an HTML page, say) means the
    server does not speak the protocol, except the statuses a proxy may add in front of it.
    """
    if answer.status < 400:
        return None
    retry_after = retry_after_s(answer.header("Retry-After"), now=now)
    problem = answer.body if isinstance(answer.body, dict) else None
    if problem is None and answer.status < 500 and answer.status not in (401, 403, 429):
        return not_asyncjobs(answer)
    rate_limit = read_rate_limit(answer.header("RateLimit"), answer.header("RateLimit-Policy"))
    return error_for_answer(answer.status, problem or {}, answer.headers, retry_after=retry_after,
                            rate_limit=rate_limit, method=answer.method, url=answer.url)


def not_asyncjobs(answer: Answer) -> ProtocolError:
    """The error for an answer that does not follow the protocol at all."""
    kind = answer.content_type or "no content type"
    return ProtocolError(f"the server answered {answer.status} with {kind}, not the asyncjobs protocol: "
                         "is this an asyncjobs server?", method=answer.method, url=answer.url)


# -- rate limits --------------------------------------------------------------------------

@dataclass(frozen=True)
class RateLimit:
    """The ``RateLimit`` and ``RateLimit-Policy`` fields of an answer (draft-ietf-httpapi-ratelimit-headers,
    structured form: ``RateLimit: "submit";r=0;t=3``, ``RateLimit-Policy: "submit";q=5;w=10``).

    Every number is None where the server did not send it (or sent something unreadable).
    """

    policy: str | None  # the policy's name, e.g. "submit"
    remaining: int | None  # r: quota units left now
    reset: int | None  # t: seconds until quota is available again
    quota: int | None  # q: the policy's quota (a submit rate's burst)
    window: int | None  # w: the policy's window, seconds (to refill the bucket)


def _sf_split(text: str, sep: str) -> list[str]:
    """``text`` split at each ``sep`` that is outside a string and outside an inner list, each part stripped."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    depth = 0
    for char in text:
        if quoted:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == "(":
            depth += 1
        elif char == ")":
            depth = max(0, depth - 1)
        elif char == sep and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    parts.append("".join(current).strip())
    return parts


_SF_INTEGER = re.compile(r"-?\d{1,15}")
_SF_DECIMAL = re.compile(r"-?\d{1,12}\.\d{1,3}")
_SF_TOKEN = re.compile(r"[A-Za-z*][A-Za-z0-9!#$%&'*+.^_`|~:/-]*")


def _sf_value(text: str) -> Any:
    """A structured-field bare item (RFC 9651): a string, integer, decimal, boolean or token (as a str),
    an inner list as a list of its items; None for what is not read here (empty, malformed, bytes, dates)."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    if len(text) >= 2 and text[0] == "(" and text[-1] == ")":
        return [_sf_value(_sf_split(item, ";")[0]) for item in _sf_split(text[1:-1], " ") if item]
    if text in ("?0", "?1"):
        return text == "?1"
    if _SF_INTEGER.fullmatch(text):
        return int(text)
    if _SF_DECIMAL.fullmatch(text):
        return float(text)
    return text if _SF_TOKEN.fullmatch(text) else None


def structured_list(value: str | None) -> list[tuple[Any, dict[str, Any]]]:
    """A structured-field list (RFC 9651) as ``(item, {param: value})`` pairs, read leniently: what does
    not parse is None and never fails the rest (several field lines are one list)."""
    members: list[tuple[Any, dict[str, Any]]] = []
    for member in _sf_split(value or "", ","):
        if not member:
            continue
        item, *params = _sf_split(member, ";")
        parsed: dict[str, Any] = {}
        for param in params:
            key, sep, raw = param.partition("=")
            key = key.strip().lower()
            if key:
                parsed[key] = _sf_value(raw) if sep else True  # a repeated key: the last one counts
        members.append((_sf_value(item), parsed))
    return members


def _count(value: Any, *, up: bool) -> int | None:
    """A non-negative whole number from a parameter (a decimal rounded ``up`` or down); None if not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return max(0, math.ceil(value) if up else math.floor(value))


def read_rate_limit(ratelimit: str | None, policy: str | None, *, name: str | None = None) -> RateLimit | None:
    """The rate limit an answer states: the ``RateLimit`` and ``RateLimit-Policy`` members named ``name``
    (by default the first one's name, as a policy names itself); None when neither field has one."""
    limits = [(item, params) for item, params in structured_list(ratelimit) if isinstance(item, str) and item]
    policies = [(item, params) for item, params in structured_list(policy) if isinstance(item, str) and item]
    if name is None and (limits or policies):
        name = (limits or policies)[0][0]
    limit = next((params for item, params in limits if item == name), None)
    rule = next((params for item, params in policies if item == name), None)
    if limit is None and rule is None:
        return None
    limit, rule = limit or {}, rule or {}
    return RateLimit(policy=name, remaining=_count(limit.get("r"), up=False), reset=_count(limit.get("t"), up=True),
                     quota=_count(rule.get("q"), up=False), window=_count(rule.get("w"), up=True))


# -- submit ------------------------------------------------------------------------------

def submit_body(task: str, params: Mapping[str, Any] | None, *, priority: int = 0,
                delay_s: float | None = None) -> dict[str, Any]:
    """The body of ``POST /jobs``."""
    body: dict[str, Any] = {"task": task, "params": dict(params or {}), "priority": priority}
    if delay_s:
        body["delay"] = delay_s
    return body


def submit_headers(idempotency_key: str, wait_s: float | None, *, fresh: bool = False) -> dict[str, str]:
    """A submit's headers: its Idempotency-Key, ``Prefer: wait=N`` to hold the answer, and with ``fresh``
    ``Cache-Control: no-cache`` (a new job even where the task would reuse an equal earlier one)."""
    headers = {"Idempotency-Key": idempotency_key}
    if wait_s is not None:
        headers["Prefer"] = f"wait={max(0, math.ceil(wait_s))}"
    if fresh:
        headers["Cache-Control"] = "no-cache"
    return headers


def read_submit(answer: Answer, *, base: str) -> JobState:
    """The job a submit answer describes: 202 (``Location`` is the monitor), 201/200 after
    ``Prefer: wait`` (``Content-Location`` is the monitor), or 303 to an equal earlier job that the
    server reused (``Location`` is its monitor; the state has ``reused`` set). A 303 is never followed
    as a new request: its body is the reused job (see ``reused_location`` for one without it)."""
    location = answer.header("Location")
    if answer.status not in (200, 201, 202, 303):
        raise not_asyncjobs(answer)
    if answer.status in (202, 303) and not location:
        raise ProtocolError(f"a {answer.status} answer to a submit has no Location", method=answer.method,
                            url=answer.url)
    content_location = answer.header("Content-Location")
    monitor = location if answer.status in (202, 303) else content_location
    result = location if answer.status == 201 else None
    state = parse_job(answer.body, base=answer.url, monitor_url=resolve(answer.url, monitor) if monitor else None,
                      result_url=resolve(answer.url, result) if result else None)
    return replace(state, reused=True) if answer.status == 303 else state


def reused_location(answer: Answer) -> str | None:
    """The absolute monitor URL of a submit's ``303`` that does not carry the reused job (so the client
    reads it there with a GET); None for any other answer, which ``read_submit`` reads as it is."""
    location = answer.header("Location")
    if answer.status != 303 or not location or isinstance(answer.body, dict):
        return None
    return resolve(answer.url, location)


RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
# a submit is not repeated on 429: the caller is over its quota or rate, and waiting is its own choice
SUBMIT_RETRYABLE_STATUSES = RETRYABLE_STATUSES - {429}


def retry_delay_s(attempt: int, attempts: int, *, status: int | None, retry_after: float | None,
                  first_s: float = 0.2, cap_s: float = 5.0,
                  statuses: frozenset[int] = RETRYABLE_STATUSES) -> float | None:
    """Seconds before another try of a request that is safe to repeat, or None to give up.

    ``status`` None means no answer came (the connection failed or dropped). ``attempt`` counts from 1.
    Only answers with one of ``statuses`` are repeated.
    """
    if attempt >= attempts:
        return None
    if status is not None and status not in statuses:
        return None
    if retry_after is not None:
        return min(retry_after, MAX_RETRY_AFTER_S)
    return min(cap_s, first_s * 2 ** (attempt - 1))


# -- the status monitor -----------------------------------------------------------------

@dataclass(frozen=True)
class MonitorReading:
    """What one answer of the status monitor says."""

    job: JobState | None  # None: 304, nothing changed
    next_url: str  # where to poll next (flow style: the 202's Location)
    retry_after: float | None
    etag: str | None
    long_poll_honoured: bool  # the server held the request (``Preference-Applied: wait``)
    redirect_without_job: bool = False  # a 303 without the job: read it again with ?redirect=false


def read_monitor(answer: Answer, *, now: float) -> MonitorReading:
    """Read a monitor answer of either style.

    rest: 200 pending, 303 to the result when succeeded, 200 failed/canceled.
    flow: 202 with ``Location`` and ``Retry-After`` while pending, 200 when terminal.
    Raises the typed error for 4xx/5xx (``JobGone`` for 410, ``NotFound`` for 404).
    """
    error = answer_error(answer, now=now)
    if error is not None:
        raise error
    etag = answer.header("ETag")
    retry_after = retry_after_s(answer.header("Retry-After"), now=now)
    honoured = "wait" in preferences(answer.header("Preference-Applied"))
    location = answer.header("Location")
    if answer.status == 304:
        return MonitorReading(None, answer.url, retry_after, etag, True)
    if answer.status not in (200, 202, 303):
        raise not_asyncjobs(answer)
    if answer.status == 303 and not isinstance(answer.body, dict):
        return MonitorReading(None, answer.url, retry_after, etag, honoured, redirect_without_job=True)
    next_url = resolve(answer.url, location) if answer.status == 202 and location else answer.url
    result_url = resolve(answer.url, location) if answer.status == 303 and location else None
    job = parse_job(answer.body, base=answer.url, monitor_url=_without_query(next_url), result_url=result_url)
    return MonitorReading(job, _without_query(next_url), retry_after, etag, honoured)


def _without_query(url: str) -> str:
    """Our own ``wait`` and ``redirect`` parameters removed (a flow Location's own query is kept)."""
    parsed = URL(url)
    query = {k: v for k, v in parsed.query.items() if k not in ("wait", "redirect")}
    return str(parsed.with_query(query or None))


def preferences(header: str | None) -> dict[str, str]:
    """The preferences of a ``Prefer`` or ``Preference-Applied`` header (RFC 7240), names lower-cased."""
    prefs: dict[str, str] = {}
    for item in (header or "").split(","):
        name, _, value = item.split(";", 1)[0].strip().partition("=")
        if name.strip():
            prefs.setdefault(name.strip().lower(), value.strip().strip('"'))
    return prefs


def next_channel(channels: tuple[str, ...], current: str) -> str | None:
    """The next way of waiting after ``current`` turned out to be unavailable."""
    index = channels.index(current) if current in channels else len(channels)
    return channels[index + 1] if index + 1 < len(channels) else None


def remaining_s(deadline: float | None, now: float) -> float | None:
    """Seconds left before ``deadline`` (None: no deadline); 0 once it has passed."""
    return None if deadline is None else max(0.0, deadline - now)


def poll_delay_s(retry_after: float | None, remaining: float | None, *, default_s: float = 1.0,
                 floor_s: float = 0.05) -> float:
    """How long to sleep before the next plain poll: ``Retry-After``, never past the deadline."""
    delay = default_s if retry_after is None else max(floor_s, retry_after)
    return delay if remaining is None else min(delay, remaining)


def long_poll_s(remaining: float | None, max_s: float) -> float:
    """How long to ask the server to hold the next long poll."""
    return max_s if remaining is None else max(0.0, min(max_s, remaining))


# -- the WebSocket channel -------------------------------------------------------------------

def subscribe_frame(job_id: str, *, progress: bool) -> bytes:
    """The WebSocket frame that subscribes to one job (and its progress, if asked)."""
    return codec.dumps({"op": "subscribe", "jobs": [job_id], "progress": progress})


@dataclass(frozen=True)
class WsEvent:
    """A server frame that concerns the watched job: ``kind`` is ``subscribed``, ``job`` or ``error``."""

    kind: str
    job: JobState | None = None
    error: ClientError | None = None


def read_ws_frame(text: str, job_id: str, *, base: str, url: str) -> WsEvent | None:
    """A WebSocket frame about ``job_id``, or None for frames about other jobs or other matters."""
    try:
        frame = codec.loads(text)
    except codec.JSONDecodeError:
        raise ProtocolError("a WebSocket frame is not JSON", url=url) from None
    if not isinstance(frame, dict):
        raise ProtocolError("a WebSocket frame is not a JSON object", url=url)
    kind = frame.get("type")
    if kind == "subscribed" and isinstance(frame.get("jobs"), list) and job_id in frame["jobs"]:
        return WsEvent("subscribed")
    if kind == "job" and isinstance(frame.get("job"), dict) and frame["job"].get("id") == job_id:
        return WsEvent("job", job=parse_job(frame["job"], base=base))
    if kind == "error" and frame.get("id") == job_id and isinstance(frame.get("status"), int):
        return WsEvent("error", error=error_for_answer(frame["status"], frame, url=url))
    return None


# -- the list -----------------------------------------------------------------------------------

_LINK_NEXT = re.compile(r'<([^>]*)>\s*;[^,]*rel="?next"?', re.IGNORECASE)


def read_page(answer: Answer, *, now: float) -> tuple[list[JobState], str | None]:
    """One page of ``GET /jobs``: its jobs and the absolute URL of the next page (None: the last)."""
    error = answer_error(answer, now=now)
    if error is not None:
        raise error
    body = answer.body
    if answer.status != 200 or not isinstance(body, dict) or not isinstance(body.get("jobs"), list):
        raise not_asyncjobs(answer)
    jobs = [parse_job(item, base=answer.url) for item in body["jobs"]]
    next_ref = body.get("next")
    if not isinstance(next_ref, str) or not next_ref:
        match = _LINK_NEXT.search(answer.header("Link") or "")
        next_ref = match.group(1) if match else None
    return jobs, resolve(answer.url, next_ref) if next_ref else None


def list_query(*, status: str | None, task: str | None, limit: int | None) -> dict[str, str]:
    """The query of ``GET /jobs`` for these filters."""
    pairs = {"status": status, "task": task, "limit": None if limit is None else str(limit)}
    return {k: v for k, v in pairs.items() if v is not None}


# -- the result --------------------------------------------------------------------------------

def read_result(answer: Answer, *, now: float) -> Any:
    """The result resource: the JSON value, or the bytes of a result of another content type.

    404 with a pending ``job_status`` raises ``ResultNotReady``; 409 raises ``JobFailed`` / ``JobCanceled``.
    """
    error = answer_error(answer, now=now)
    if error is not None:
        raise error
    if answer.status != 200:
        raise not_asyncjobs(answer)
    return answer.body


# -- files: upload ------------------------------------------------------------------------------

def guess_content_type(name: str) -> str:
    """The media type of a file from its name, ``application/octet-stream`` when unknown."""
    guessed, _ = mimetypes.guess_type(name, strict=False)
    return guessed or "application/octet-stream"


def _form_quote(value: str) -> str:
    """A form-data parameter value, escaped as browsers do (WHATWG HTML): UTF-8, with ``"``, CR, LF encoded."""
    return value.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def _file_name_quote(name: str) -> str:
    """A part's file name: as a form value, and ``%`` and ``\\`` encoded too, since the server percent-decodes
    file names and reads ``\\`` in a quoted string as an escape (the name then arrives as it is)."""
    return _form_quote(name.replace("%", "%25").replace("\\", "%5C"))


def form_part_head(boundary: str, name: str, content_type: str, *, filename: str | None = None) -> bytes:
    """The delimiter and headers that open one part of a ``multipart/form-data`` body (RFC 7578)."""
    disposition = f'form-data; name="{_form_quote(name)}"'
    if filename is not None:
        disposition += f'; filename="{_file_name_quote(filename)}"'
    return (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode()


PART_END = b"\r\n"  # follows each part's content (the line break belongs to the next delimiter)


def form_end(boundary: str) -> bytes:
    """The final delimiter of a ``multipart/form-data`` body."""
    return f"--{boundary}--\r\n".encode()


# -- files: download ----------------------------------------------------------------------------

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


def content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """``Content-Range: bytes a-b/size`` as (first, last, size or None for ``*``); None if absent or malformed."""
    match = _CONTENT_RANGE.match(value or "")
    if match is None:
        return None
    first, last, size = match.groups()
    return int(first), int(last), None if size == "*" else int(size)


def range_headers(offset: int, validator: str | None) -> dict[str, str]:
    """Headers asking for the rest of a representation from ``offset``, only if it is still ``validator``."""
    if offset <= 0 or not validator:
        return {}
    return {"Range": f"bytes={offset}-", "If-Range": validator}


def is_strong_etag(etag: str | None) -> bool:
    """Whether an ``ETag`` is strong (only a strong one may validate a range, RFC 9110 13.1.5)."""
    return etag is not None and len(etag) >= 2 and etag.startswith('"') and etag.endswith('"')


_DIGEST_MEMBER = re.compile(r"([a-z0-9_.*-]+)\s*=\s*:([A-Za-z0-9+/=]*):", re.IGNORECASE)


def repr_digest_sha256(value: str | None) -> bytes | None:
    """The SHA-256 in a ``Repr-Digest`` (RFC 9530: ``sha-256=:<base64>:``, maybe among others), or None."""
    for algorithm, encoded in _DIGEST_MEMBER.findall(value or ""):
        if algorithm.lower() == "sha-256":
            try:
                digest = base64.b64decode(encoded, validate=True)
            except ValueError:
                return None
            return digest if len(digest) == 32 else None
    return None


_DISPOSITION_EXT = re.compile(r"""(?:^|;)\s*filename\*\s*=\s*([\w!#$%&+.^`|~-]+)'[^']*'([^;\s]*)""", re.IGNORECASE)
_DISPOSITION = re.compile(r"""(?:^|;)\s*filename\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))""", re.IGNORECASE)


def disposition_filename(value: str | None) -> str | None:
    """The file name of a ``Content-Disposition`` (RFC 6266: ``filename*`` preferred over ``filename``)."""
    extended = _DISPOSITION_EXT.search(value or "")
    if extended is not None:
        try:
            return unquote(extended.group(2), encoding=extended.group(1), errors="strict")
        except (LookupError, UnicodeDecodeError):
            pass
    plain = _DISPOSITION.search(value or "")
    if plain is None:
        return None
    quoted, token = plain.groups()
    return re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else token or None


def safe_filename(name: str | None) -> str | None:
    """A server-given file name made safe to create in the current folder: its last path segment, without
    control characters or a leading dot; None when nothing usable is left."""
    if not name:
        return None
    last = re.split(r"[/\\]", name)[-1]
    cleaned = "".join(c for c in last if unicodedata.category(c)[0] != "C").strip().lstrip(".")
    return cleaned[:255] or None


@dataclass(frozen=True)
class DownloadStart:
    """What the first answer of a download says about the bytes that follow."""

    offset: int  # where in the file the body's first byte goes (0: the whole file follows)
    total: int | None  # the whole file's size, when the server said
    etag: str | None
    sha256: bytes | None  # from ``Repr-Digest``: of the whole file, whatever range was sent
    content_type: str
    name: str | None  # from ``Content-Disposition``


def read_download(answer: Answer, *, asked_from: int) -> DownloadStart:
    """Read the head of a download's answer (``200`` whole, ``206`` the rest from ``asked_from``).

    A ``206`` for another range than the one asked for is a ``ProtocolError``: its bytes cannot be
    placed. Error answers are raised as for any result (``ResultNotReady``, ``JobFailed`` ...).
    """
    if answer.status == 200:
        length = answer.header("Content-Length")
        offset, total = 0, int(length) if length and length.strip().isdigit() else None
    elif answer.status == 206:
        found = content_range(answer.header("Content-Range"))
        if found is None or found[0] != asked_from or (found[2] is not None and found[1] != found[2] - 1):
            raise ProtocolError(f"asked for bytes {asked_from}- but got {answer.header('Content-Range')!r}",
                                method=answer.method, url=answer.url)
        offset, total = asked_from, found[2]
    else:
        raise not_asyncjobs(answer)
    return DownloadStart(offset, total, answer.header("ETag"), repr_digest_sha256(answer.header("Repr-Digest")),
                         answer.content_type, disposition_filename(answer.header("Content-Disposition")))
