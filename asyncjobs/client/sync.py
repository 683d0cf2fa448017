"""A blocking facade over ``Client`` for scripts and notebooks: the same methods, without ``await``."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping
from typing import Any, Self, TypeVar

from .aio import Client, JobRef
from .rules import JobState
from .transfer import BinaryWriter, Download, FileArg, Progress

__all__ = ["SyncClient"]

T = TypeVar("T")
CLOSE_TIMEOUT_S = 10.0


class SyncClient:
    """``with SyncClient(url) as client: client.wait(client.submit("echo", {"a": 1}))``.

    The async client runs on an event loop in a thread of its own, so this works where a loop is
    already running in the calling thread (a notebook), and Ctrl-C stops only the call in progress.
    Options are those of ``Client``. ``progress`` callbacks are called on the client's thread.
    """

    def __init__(self, url: str, **options: Any) -> None:
        self._client = Client(url, **options)  # checks the options before a thread is started
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="asyncjobs-client", daemon=True)
        self._thread.start()
        self._closed = False

    @property
    def base(self) -> str:
        """The service's root URL."""
        return self._client.base

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections and stop the client's thread."""
        if self._closed:
            return
        self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._client.close(), self._loop).result(CLOSE_TIMEOUT_S)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CLOSE_TIMEOUT_S)
            if not self._thread.is_alive():
                self._loop.close()

    def __repr__(self) -> str:
        return f"<SyncClient {self._client.base}>"

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the client's loop and block for its outcome; an interrupt cancels it."""
        if self._closed:
            coro.close()
            raise RuntimeError("the SyncClient is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()  # every step of the coroutine has its own deadline
        except BaseException:
            future.cancel()  # KeyboardInterrupt here: stop the request too
            raise

    def _iterate(self, items: AsyncIterator[T]) -> Iterator[T]:
        async def step() -> tuple[bool, T | None]:
            try:
                return True, await items.__anext__()
            except StopAsyncIteration:
                return False, None

        try:
            while True:
                more, item = self._run(step())
                if not more:
                    return
                yield item  # type: ignore[misc]
        finally:
            if not self._closed:
                self._run(items.aclose())  # type: ignore[attr-defined]

    # -- the same methods as Client ---------------------------------------------------

    def submit(self, task: str, params: Mapping[str, Any] | None = None, *, priority: int = 0,
               delay: float | None = None, idempotency_key: str | None = None, wait: float | None = None,
               files: Mapping[str, FileArg] | None = None, progress: Progress | None = None,
               fresh: bool = False) -> JobState:
        """See ``Client.submit``."""
        return self._run(self._client.submit(task, params, priority=priority, delay=delay,
                                             idempotency_key=idempotency_key, wait=wait, files=files,
                                             progress=progress, fresh=fresh))

    def get(self, job: JobRef) -> JobState:
        """See ``Client.get``."""
        return self._run(self._client.get(job))

    def wait(self, job: JobRef, timeout: float | None = None) -> JobState:
        """See ``Client.wait``."""
        return self._run(self._client.wait(job, timeout))

    def events(self, job: JobRef, *, timeout: float | None = None, progress: bool = True) -> Iterator[JobState]:
        """See ``Client.events``."""
        return self._iterate(self._client.events(job, timeout=timeout, progress=progress))

    def result(self, job: JobRef) -> Any:
        """See ``Client.result``."""
        return self._run(self._client.result(job))

    def download(self, job: JobRef, path: str | os.PathLike[str] | BinaryWriter, *,
                 progress: Progress | None = None) -> Download:
        """See ``Client.download``."""
        return self._run(self._client.download(job, path, progress=progress))

    def cancel(self, job: JobRef) -> JobState:
        """See ``Client.cancel``."""
        return self._run(self._client.cancel(job))

    def delete(self, job: JobRef) -> None:
        """See ``Client.delete``."""
        self._run(self._client.delete(job))

    def tasks(self) -> list[dict[str, Any]]:
        """See ``Client.tasks``."""
        return self._run(self._client.tasks())

    def list(self, *, status: str | None = None, task: str | None = None,
             page_size: int | None = None) -> Iterator[JobState]:
        """See ``Client.list``."""
        return self._iterate(self._client.list(status=status, task=task, page_size=page_size))
