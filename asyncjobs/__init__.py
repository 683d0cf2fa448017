"""asyncjobs: the asynchronous request-reply pattern over HTTP, on one SQLite file."""

from .app import App
from .config import Config
from .errors import Canceled
from .models import Job, Status
from .tasks import Blob, Retry, TaskFailure, TaskRegistry, task

# The client's names are loaded on first use, so importing the server does not load the client.
_CLIENT_NAMES = frozenset({
    "Client", "SyncClient", "ClientError", "TransportError", "ConnectError", "Timeout", "RequestTimeout",
    "WaitTimeout", "ProtocolError", "ProblemError", "BadRequest", "IdempotencyConflict", "Unauthorized",
    "NotFound", "ResultNotReady", "Conflict", "JobGone", "ServerBusy", "ServerError", "JobError", "JobFailed",
    "JobCanceled", "JobState",
})

__all__ = ["App", "Blob", "Canceled", "Config", "Job", "Retry", "Status", "TaskFailure", "TaskRegistry", "task",
           *sorted(_CLIENT_NAMES)]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    if name in _CLIENT_NAMES:
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
