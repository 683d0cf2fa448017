"""Domain errors; each knows the problem-details answer (RFC 9457) it becomes."""

from __future__ import annotations

from typing import Any


class AsyncJobsError(Exception):
    """Base of every error asyncjobs raises on purpose."""


class ProblemError(AsyncJobsError):
    """An error that becomes an ``application/problem+json`` answer."""

    status = 500
    title = "Internal Server Error"

    def __init__(
        self,
        detail: str,
        *,
        errors: list[dict[str, str]] | None = None,
        job_status: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors
        self.job_status = job_status
        self.headers = headers or {}
        self.extra = extra or {}

    def problem(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": "about:blank",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.errors is not None:
            body["errors"] = self.errors
        if self.job_status is not None:
            body["job_status"] = self.job_status
        body.update(self.extra)
        return body


class BadRequest(ProblemError):
    status, title = 400, "Bad Request"


class Unauthorized(ProblemError):
    status, title = 401, "Unauthorized"


class NotFound(ProblemError):
    status, title = 404, "Not Found"


class Conflict(ProblemError):
    status, title = 409, "Conflict"


class Gone(ProblemError):
    status, title = 410, "Gone"


class RequestTimeout(ProblemError):
    status, title = 408, "Request Timeout"


class PayloadTooLarge(ProblemError):
    status, title = 413, "Content Too Large"


class UnsupportedMediaType(ProblemError):
    status, title = 415, "Unsupported Media Type"


class UnprocessableContent(ProblemError):
    status, title = 422, "Unprocessable Content"


class TooManyRequests(ProblemError):
    status, title = 429, "Too Many Requests"


class InsufficientStorage(ProblemError):
    status, title = 507, "Insufficient Storage"


class ServiceUnavailable(ProblemError):
    status, title = 503, "Service Unavailable"


class ConfigError(AsyncJobsError):
    """A wrong key or value in the configuration; the message names it."""


class StoreError(AsyncJobsError):
    """The store cannot do its work (file unreadable, read-only, full)."""


class InvalidTransition(AsyncJobsError):
    """A job was asked to move to a status its current status does not allow."""


class Canceled(AsyncJobsError):
    """Raised inside a sync handler at a progress report or cancel check once its job is canceled."""
