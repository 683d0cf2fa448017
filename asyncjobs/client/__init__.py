"""The asyncjobs client: ``Client`` (async), ``SyncClient`` (blocking) and their exceptions.

It speaks only the HTTP protocol (``PROTOCOL.md``) and imports nothing of the server but
``asyncjobs.codec``, so it works against any server that speaks the protocol. The exception tree
is drawn in ``asyncjobs.client.errors``.
"""

from .aio import Client, JobRef
from .errors import (
    BadRequest,
    ClientError,
    Conflict,
    ConnectError,
    IdempotencyConflict,
    JobCanceled,
    JobError,
    JobFailed,
    JobGone,
    NotFound,
    ProblemError,
    ProtocolError,
    RequestTimeout,
    ResultNotReady,
    ServerBusy,
    ServerError,
    Timeout,
    TooManyRequests,
    TransportError,
    Unauthorized,
    WaitTimeout,
)
from .rules import JobState
from .sync import SyncClient
from .transfer import Download

__all__ = [
    "BadRequest", "Client", "ClientError", "Conflict", "ConnectError", "Download", "IdempotencyConflict",
    "JobCanceled", "JobError", "JobFailed", "JobGone", "JobRef", "JobState", "NotFound", "ProblemError",
    "ProtocolError", "RequestTimeout", "ResultNotReady", "ServerBusy", "ServerError", "SyncClient", "Timeout",
    "TooManyRequests", "TransportError", "Unauthorized", "WaitTimeout",
]
