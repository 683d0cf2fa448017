"""The one table from domain errors to HTTP answers: status, title and headers of each kind (RFC 9457)."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from .. import errors, protocol

STATUS: dict[type[errors.RequestError], int] = {
    errors.InvalidRequest: 400,
    errors.Unauthorized: 401,
    errors.Forbidden: 403,
    errors.JobNotFound: 404,
    errors.UploadStalled: 408,
    errors.StateConflict: 409,
    errors.JobGone: 410,
    errors.TooLarge: 413,
    errors.UnsupportedType: 415,
    errors.KeyReused: 422,
    errors.QuotaExceeded: 429,
    errors.Unavailable: 503,
    errors.StorageFull: 507,
}
TITLES = {413: "Content Too Large", 416: "Range Not Satisfiable",  # RFC 9110's names, newer than http's
          422: "Unprocessable Content"}
BEARER_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="asyncjobs"'}
# RFC 6750, 3.1: a token that was presented and is not valid is named as such (no error code when none was sent)
INVALID_TOKEN_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="asyncjobs", error="invalid_token"'}


class WebProblem(Exception):
    """An error the web layer raises with headers of its own (the RateLimit fields, say)."""

    def __init__(self, error: errors.RequestError, headers: dict[str, str]) -> None:
        super().__init__(error.detail)
        self.error = error
        self.headers = headers


def status_of(error: errors.RequestError) -> int:
    for kind in type(error).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return 500


def problem_body(status: int, detail: str, title: str | None = None) -> dict[str, Any]:
    return {"type": "about:blank", "title": title or TITLES.get(status) or HTTPStatus(status).phrase,
            "status": status, "detail": detail}


def answer(error: errors.RequestError) -> tuple[dict[str, Any], dict[str, str]]:
    """The problem body and the headers a domain error becomes."""
    status = status_of(error)
    body = problem_body(status, error.detail)
    if error.errors is not None:
        body["errors"] = error.errors
    if error.job_status is not None:
        body["job_status"] = error.job_status
    body.update(error.extra)
    headers: dict[str, str] = {}
    if error.job_version is not None:  # an answer about a job carries its ETag, a refusal too
        headers["ETag"] = protocol.version_etag(error.job_version)
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(error.retry_after_s)
    if isinstance(error, errors.Unauthorized):
        headers.update(BEARER_CHALLENGE)
    return body, headers
