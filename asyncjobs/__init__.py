"""asyncjobs: the asynchronous request-reply pattern over HTTP, on one SQLite file."""

from .config import Config
from .errors import Canceled
from .models import Job, Status
from .tasks import Blob, FileResult, InputFile, Retry, TaskFailure, TaskRegistry, task

_CLIENT_NAMES = frozenset({
    "Client", "SyncClient", "ClientError", "TransportError", "ConnectError", "Timeout", "RequestTimeout",
    "WaitTimeout", "ProtocolError", "ProblemError", "BadRequest", "IdempotencyConflict", "Unauthorized",
    "NotFound", "ResultNotReady", "Conflict", "JobGone", "ServerBusy", "ServerError", "JobError", "JobFailed",
    "JobCanceled", "JobState", "Download", "TooManyRequests",
})

__all__ = ["App", "Blob", "Canceled", "Config", "FileResult", "InputFile", "Job", "Retry", "Status", "TaskFailure",
           "TaskRegistry", "task",
           *sorted(_CLIENT_NAMES)]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``App`` and the client's names load on first use: a task module or a client loads neither server nor client."""
    if name == "App":
        from .app import App

        return App
    if name in _CLIENT_NAMES:
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
