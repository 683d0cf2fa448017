"""asyncjobs: the asynchronous request-reply pattern over HTTP, on one SQLite file."""

from .app import App
from .config import Config
from .errors import Canceled
from .models import Job, Status
from .tasks import Blob, Retry, TaskFailure, TaskRegistry, task

__all__ = ["App", "Blob", "Canceled", "Config", "Job", "Retry", "Status", "TaskFailure", "TaskRegistry", "task"]
__version__ = "0.1.0"
