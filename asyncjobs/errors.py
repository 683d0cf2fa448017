"""Domain errors: what went wrong, in the service's words; ``web/problems.py`` maps each to HTTP."""

from __future__ import annotations

from typing import Any


class AsyncJobsError(Exception):
    """Base of every error asyncjobs raises on purpose."""


class RequestError(AsyncJobsError):
    """A request the service will not carry out, and why. It carries no HTTP status: the web layer
    maps each kind to its answer in one table (``web/problems.py``)."""

    def __init__(
        self,
        detail: str,
        *,
        errors: list[dict[str, str]] | None = None,
        job_status: str | None = None,
        job_version: int | None = None,
        retry_after_s: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors  # per field: [{"field", "message"}]
        self.job_status = job_status  # where the request was about a job that exists
        self.job_version = job_version  # that job's version, for the answer's ETag
        self.retry_after_s = retry_after_s  # when trying again may succeed
        self.extra = extra or {}


class InvalidRequest(RequestError):
    """Malformed, or not what the task takes (``errors`` name the fields)."""


class Unauthorized(RequestError):
    """No valid credentials."""


class Forbidden(RequestError):
    """Valid credentials, but this request may not be made with them (a missing CSRF token, another origin)."""


class JobNotFound(RequestError):
    """No such job, or not visible to this caller."""


class JobGone(RequestError):
    """The job existed but has expired."""


class StateConflict(RequestError):
    """The job's state does not allow this (canceling a finished job, the result of a failed one)."""


class UploadStalled(RequestError):
    """An upload stopped arriving."""


class TooLarge(RequestError):
    """A body or a file over its limit."""


class UnsupportedType(RequestError):
    """A body or file of a type this route or task does not take."""


class KeyReused(RequestError):
    """An idempotency key used before with a different request."""


class QuotaExceeded(RequestError):
    """The caller has as many queued jobs, or made as many submits, as it may."""


class StorageFull(RequestError):
    """The files would not fit (the configured limit, or the disk)."""


class Unavailable(RequestError):
    """Not now: the queue is full, the server is stopping, the store cannot be written."""


class ConfigError(AsyncJobsError):
    """A wrong key or value in the configuration; the message names it."""


class StoreError(AsyncJobsError):
    """The store cannot do its work (file unreadable, read-only, full)."""


class StoreUnreachable(StoreError):
    """The store's server does not answer (down, starting, cut off, out of connections): unlike a store
    that refuses (a wrong password, a missing database, a newer schema), it may answer later."""


class InvalidTransition(AsyncJobsError):
    """A job was asked to move to a status its current status does not allow."""


class Canceled(AsyncJobsError):
    """Raised inside a sync handler at a progress report or cancel check once its job is canceled."""
