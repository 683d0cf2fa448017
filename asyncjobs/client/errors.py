"""Exceptions of the asyncjobs client, and the one place where an HTTP answer becomes one.

::

    ClientError                  every error the client raises on purpose
    ├── TransportError           no answer: refused, reset, DNS, TLS, connection dropped
    │   └── ConnectError         the connection could not be opened at all
    ├── Timeout                  also a builtin ``TimeoutError``
    │   ├── RequestTimeout       one HTTP exchange took longer than its limit
    │   └── WaitTimeout          the job was not finished by the deadline (carries ``job``)
    ├── ProtocolError            the answer does not follow the protocol (HTML, wrong JSON, no Location)
    ├── ProblemError             a 4xx/5xx answer, with its problem details (RFC 9457)
    │   ├── BadRequest           400, 413, 415, 422, other 4xx: the request was refused as it is
    │   │   └── IdempotencyConflict  422: the Idempotency-Key was used with another request
    │   ├── Unauthorized         401, 403: the bearer token is missing or wrong
    │   ├── NotFound             404: no such job (or not visible to this caller)
    │   │   └── ResultNotReady   404 from a result whose job is still queued or running
    │   ├── Conflict             409: e.g. canceling a job that already finished
    │   ├── JobGone              410: the job existed but has expired
    │   ├── ServerBusy           503: the queue is full or the server is stopping (``retry_after``)
    │   │   └── TooManyRequests  429: this caller is over its quota or submit rate (``retry_after``, ``rate_limit``)
    │   └── ServerError          any other 5xx
    └── JobError                 the job ended without a result (carries ``job`` and/or ``problem``)
        ├── JobFailed            status ``failed``
        └── JobCanceled          status ``canceled``

Every error carries the ``method`` and ``url`` of the request it concerns (``None`` when it
concerns no single request); a ``ProblemError`` also the ``status``, ``headers`` and ``problem``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .rules import JobState, RateLimit


class ClientError(Exception):
    """Base of every error the asyncjobs client raises on purpose."""

    def __init__(self, message: str, *, method: str | None = None, url: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.method = method
        self.url = url


class TransportError(ClientError):
    """The server gave no answer: the connection was refused, reset or dropped."""


class ConnectError(TransportError):
    """The connection could not be opened (refused, unknown host, unreachable)."""


class Timeout(ClientError, TimeoutError):
    """Something took longer than allowed."""


class RequestTimeout(Timeout):
    """One HTTP exchange took longer than its limit."""


class WaitTimeout(Timeout):
    """The job was not finished by the deadline; ``job`` is its last known state (it keeps running)."""

    def __init__(self, message: str, *, job: JobState | None = None, method: str | None = None,
                 url: str | None = None) -> None:
        super().__init__(message, method=method, url=url)
        self.job = job


class ProtocolError(ClientError):
    """The answer does not follow the asyncjobs protocol: probably not an asyncjobs server."""


class ProblemError(ClientError):
    """The server answered 4xx/5xx; ``problem`` holds its problem details (RFC 9457)."""

    def __init__(self, message: str, *, status: int, problem: Mapping[str, Any] | None = None,
                 headers: Mapping[str, str] | None = None, retry_after: float | None = None,
                 method: str | None = None, url: str | None = None) -> None:
        super().__init__(message, method=method, url=url)
        self.status = status
        self.problem: dict[str, Any] = dict(problem or {})
        self.headers: dict[str, str] = dict(headers or {})
        self.retry_after = retry_after

    @property
    def detail(self) -> str | None:
        """The problem's ``detail``: what went wrong, in words."""
        return self.problem.get("detail")

    @property
    def errors(self) -> list[dict[str, str]]:
        """The per-field errors of an invalid request (``[]`` when there are none)."""
        errors = self.problem.get("errors")
        return list(errors) if isinstance(errors, list) else []

    @property
    def job_status(self) -> str | None:
        """The job's status, when the problem concerns a job that exists."""
        return self.problem.get("job_status")


class BadRequest(ProblemError):
    """400, 413, 415 or 422: the request was refused as it is (see ``errors``)."""


class IdempotencyConflict(BadRequest):
    """422: this Idempotency-Key was used before with a different request."""


class Unauthorized(ProblemError):
    """401: the bearer token is missing or not valid."""


class NotFound(ProblemError):
    """404: no such job, deleted, or not visible to this caller."""


class ResultNotReady(NotFound):
    """404 from a result resource whose job is still queued or running (see ``retry_after``)."""


class Conflict(ProblemError):
    """409: the job is in a state that does not allow this (e.g. cancel after it finished)."""


class JobGone(ProblemError):
    """410: the job existed but has expired."""


class ServerBusy(ProblemError):
    """503: the queue is full or the server is shutting down; try again after ``retry_after``."""


class TooManyRequests(ServerBusy):
    """429: this caller is over its quota (queued jobs) or its submit rate; nothing was stored.

    ``retry_after`` is the whole seconds the server asks to wait (its ``Retry-After``, None if it sent
    none); ``rate_limit`` the ``RateLimit`` / ``RateLimit-Policy`` fields of the answer, None without them.
    A submit is not repeated on a 429: waiting is the caller's choice. A ``ServerBusy`` too (the class
    a 429 had before), so code that catches that still does.
    """

    def __init__(self, message: str, *, status: int = 429, problem: Mapping[str, Any] | None = None,
                 headers: Mapping[str, str] | None = None, retry_after: float | None = None,
                 rate_limit: RateLimit | None = None, method: str | None = None, url: str | None = None) -> None:
        whole = None if retry_after is None else max(0, math.ceil(retry_after))
        super().__init__(message, status=status, problem=problem, headers=headers, retry_after=whole,
                         method=method, url=url)
        self.retry_after: int | None = whole
        self.rate_limit = rate_limit


class ServerError(ProblemError):
    """A 5xx answer other than 503."""


class JobError(ClientError):
    """The job ended without a result; ``job`` is its final state when known, ``problem`` the answer's."""

    def __init__(self, message: str, *, job: JobState | None = None, problem: Mapping[str, Any] | None = None,
                 method: str | None = None, url: str | None = None) -> None:
        super().__init__(message, method=method, url=url)
        self.job = job
        self.problem: dict[str, Any] = dict(problem or {})

    @property
    def error(self) -> dict[str, Any] | None:
        """The job's ``error`` object (``{"type", "message"}``), from the job or the problem."""
        if self.job is not None and self.job.error is not None:
            return self.job.error
        error = self.problem.get("error")
        return error if isinstance(error, dict) else None


class JobFailed(JobError):
    """The job failed (``error.type``: ``exception``, ``timeout``, ``interrupted`` or the handler's own)."""


class JobCanceled(JobError):
    """The job was canceled (by a caller, or by expiry)."""


_BY_STATUS: dict[int, type[ProblemError]] = {
    400: BadRequest, 401: Unauthorized, 403: Unauthorized, 404: NotFound, 409: Conflict, 410: JobGone,
    413: BadRequest, 415: BadRequest, 422: IdempotencyConflict, 429: TooManyRequests, 503: ServerBusy,
}
_PENDING = ("queued", "running")


def problem_message(status: int, problem: Mapping[str, Any]) -> str:
    """One line saying what went wrong: the problem's detail, else its title, else the status."""
    detail = problem.get("detail") or problem.get("title")
    return f"{status}: {detail}" if isinstance(detail, str) and detail else f"the server answered {status}"


def error_for_answer(status: int, problem: Mapping[str, Any], headers: Mapping[str, str] | None = None, *,
                     retry_after: float | None = None, rate_limit: RateLimit | None = None,
                     method: str | None = None, url: str | None = None) -> ClientError:
    """The exception for a 4xx/5xx answer (or a WebSocket error frame): the only status-to-exception map.

    A 409 that carries the job's ``error`` and a terminal ``job_status`` is the result resource of a
    failed or canceled job, so it becomes ``JobFailed`` / ``JobCanceled``; a 404 with a pending
    ``job_status`` is a result that does not exist yet. ``rate_limit`` (the answer's RateLimit fields,
    read by ``rules.read_rate_limit``) goes to a 429's ``TooManyRequests``.
    """
    job_status = problem.get("job_status")
    message = problem_message(status, problem)
    if status == 409 and "error" in problem and job_status in ("failed", "canceled"):
        kind = JobFailed if job_status == "failed" else JobCanceled
        error = problem["error"] if isinstance(problem["error"], dict) else {}
        reason = ": ".join(str(error[k]) for k in ("type", "message") if error.get(k))
        detail = problem.get("detail") or f"the job {job_status}"
        return kind(f"{detail} ({reason})" if reason else str(detail), problem=problem, method=method, url=url)
    cls: type[ProblemError]
    if status == 404 and job_status in _PENDING:
        cls = ResultNotReady
    elif status in _BY_STATUS:
        cls = _BY_STATUS[status]
    elif status >= 500:
        cls = ServerError
    else:
        cls = BadRequest if 400 <= status < 500 else ProblemError
    if cls is TooManyRequests:
        return TooManyRequests(message, status=status, problem=problem, headers=headers, retry_after=retry_after,
                               rate_limit=rate_limit, method=method, url=url)
    return cls(message, status=status, problem=problem, headers=headers, retry_after=retry_after,
               method=method, url=url)
