"""The async client: HTTP I/O around the decisions of ``rules``."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import secrets
import socket
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import aclosing
from pathlib import Path
from typing import Any, Self, TypeVar

import aiohttp

from .. import codec
from . import rules, transfer
from .errors import (
    BadRequest,
    ClientError,
    ConnectError,
    ProblemError,
    ProtocolError,
    RequestTimeout,
    TransportError,
    Unauthorized,
    WaitTimeout,
)
from .rules import Answer, JobState
from .transfer import BinaryWriter, Download, FileArg, Progress

__all__ = ["Client", "JobRef"]

JobRef = str | JobState  # a job id, or a state the server gave (whose URLs are then used)
T = TypeVar("T")
USER_AGENT = "asyncjobs-client/0.1"
LAST_LOOK_S = 2.0  # at most this long for the one reading of a wait whose time ran out before any reading


class _Unavailable(Exception):
    """This way of waiting is not offered by the server: try the next one."""


class _Deadline(Exception):
    """The caller's deadline passed while waiting."""


class Client:
    """An asyncjobs client; use ``async with Client(url) as client:`` (or call ``close()``).

    ``channels`` are the ways ``wait`` and ``events`` may use, best first: ``"websocket"``,
    ``"long_poll"``, ``"poll"``. Each falls back to the next when the server does not offer it.
    """

    def __init__(self, url: str, *, token: str | None = None, request_timeout_s: float = 30.0,
                 attempts: int = 4, channels: tuple[str, ...] = rules.CHANNELS, long_poll_s: float = 30.0,
                 heartbeat_s: float = 20.0) -> None:
        unknown = set(channels) - set(rules.CHANNELS)
        if not channels or unknown:
            raise ValueError(f"channels must be some of {rules.CHANNELS}, not {channels!r}")
        self.base = rules.base_url(url)
        self.token = token
        self.request_timeout_s = request_timeout_s
        self.attempts = max(1, attempts)
        self.channels = tuple(channels)
        self.long_poll_s = long_poll_s
        self.heartbeat_s = heartbeat_s
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connections (the client opens new ones if used again)."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def __repr__(self) -> str:
        return f"<Client {self.base}>"

    # -- the public API ----------------------------------------------------------------

    async def submit(self, task: str, params: Mapping[str, Any] | None = None, *, priority: int = 0,
                     delay: float | None = None, idempotency_key: str | None = None, wait: float | None = None,
                     files: Mapping[str, FileArg] | None = None, progress: Progress | None = None,
                     fresh: bool = False) -> JobState:
        """Submit a job; returns it as accepted (or finished, if ``wait`` seconds sufficed: ``Prefer: wait``).

        A task that reuses equal requests (``unique``, ``reuse``) may answer with an earlier equal job
        instead of a new one (``303 See Other``): that job's state is returned, with ``reused`` set.
        ``fresh=True`` asks for a new job all the same (``Cache-Control: no-cache``).

        ``files`` maps file params to paths (or ``(path, content_type)``; the type is otherwise guessed
        from the name): they are streamed from disk as ``multipart/form-data``, and ``progress(sent,
        total)`` is called as their bytes go out. A missing or unreadable file raises its ``OSError``
        before anything is sent.

        Retried on a lost connection and 502/503/504, always with the same ``Idempotency-Key``
        (a fresh random one unless given), so a retry never creates a second job; a retry sends the
        files again from the start (``progress`` starts again from 0). Not retried on 429: that raises
        ``TooManyRequests`` at once, with the server's ``retry_after`` and ``rate_limit``.
        """
        key = idempotency_key or secrets.token_urlsafe(18)
        job = rules.submit_body(task, params, priority=priority, delay_s=delay)
        headers = rules.submit_headers(key, wait, fresh=fresh)
        post = functools.partial(self._call, "POST", self._url("jobs"), retry=True, retry_timeouts=True,
                                 retry_statuses=rules.SUBMIT_RETRYABLE_STATUSES)
        if files:
            upload = transfer.Upload(job, transfer.upload_files(files), progress=progress,
                                     idle_s=self.request_timeout_s, answer_s=self.request_timeout_s + (wait or 0))
            headers.update({"Content-Type": upload.content_type, "Content-Length": str(upload.length)})
            answer = await post(upload=upload, headers=headers)
        else:
            answer = await post(data=codec.dumps(job), headers={**headers, "Content-Type": "application/json"},
                                timeout_s=self.request_timeout_s + (wait or 0))
        self._raise_for(answer)
        reused_at = rules.reused_location(answer)
        if reused_at is not None:  # a 303 without the job in it: read the reused job where it points
            reading = await self._monitor(reused_at, timeout_s=self.request_timeout_s)
            if reading.job is None:
                raise rules.not_asyncjobs(answer)
            return dataclasses.replace(reading.job, reused=True)
        return _read(answer, lambda: rules.read_submit(answer, base=self.base))

    async def get(self, job: JobRef) -> JobState:
        """The job's current state (``NotFound``, ``JobGone`` if it does not exist or has expired)."""
        reading = await self._monitor(self._monitor_url(job), timeout_s=self.request_timeout_s)
        if reading.job is None:
            raise ProtocolError("the monitor answered 304 to a request without If-None-Match", url=reading.next_url)
        return reading.job

    async def wait(self, job: JobRef, timeout: float | None = None) -> JobState:
        """Wait until the job is finished and return its final state (``succeeded``, ``failed`` or
        ``canceled``); ``WaitTimeout`` after ``timeout`` seconds (the job keeps running)."""
        last: JobState | None = None
        async with aclosing(self._watch(job, timeout, progress=False)) as states:
            async for last in states:
                pass
        assert last is not None and last.terminal
        return last

    def events(self, job: JobRef, *, timeout: float | None = None,
               progress: bool = True) -> AsyncGenerator[JobState, None]:
        """The job's states: the current one at once, then each change (progress too, unless
        ``progress=False``), ending after the final one; ``WaitTimeout`` after ``timeout`` seconds.

        To stop early, iterate inside ``contextlib.aclosing(...)`` so its connection closes at once.
        """
        return self._watch(job, timeout, progress=progress)

    async def result(self, job: JobRef) -> Any:
        """The result: the JSON value, or bytes for a result of another content type.

        ``JobFailed`` / ``JobCanceled`` if it never will exist; ``ResultNotReady`` while the job runs.
        """
        url = job.result_url if isinstance(job, JobState) else self._url(f"{rules.job_path(job)}/result")
        answer = await self._call("GET", url, retry=True)
        return _read(answer, lambda: rules.read_result(answer, now=_now()))

    async def download(self, job: JobRef, path: str | os.PathLike[str] | BinaryWriter, *,
                       progress: Progress | None = None) -> Download:
        """Stream the job's result into the file at ``path`` (or into a binary stream), checked and complete.

        The bytes go to ``<path>.part`` (its strong ``ETag`` kept in ``<path>.part.json``) and are
        renamed to ``path`` once their size and ``Repr-Digest`` match. A download that was interrupted,
        in this call or an earlier one, continues from where it stopped (``Range`` + ``If-Range``) when
        the result is still the same, and starts over when it is not. ``progress(done, total)`` is
        called as bytes arrive (first with what was kept); ``total`` is None if the server gave no size.

        Errors as for ``result``: ``ResultNotReady``, ``JobFailed`` / ``JobCanceled``, ``JobGone``;
        ``ProtocolError`` if the bytes do not match the size or digest the server announced.
        """
        url = job.result_url if isinstance(job, JobState) else self._url(f"{rules.job_path(job)}/result")
        sink: transfer.Sink = (transfer.FileSink(Path(path)) if isinstance(path, (str, os.PathLike))
                               else transfer.StreamSink(path))
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._download_once(url, sink, progress)
            except transfer.Restart:
                sink.discard()  # what was kept is unusable: once more, from zero (not a failed attempt)
                attempt -= 1
                continue
            except ClientError as exc:
                sink.suspend()  # closed, and kept if it can be resumed: by the next try, or a later call
                delay = self._download_retry_s(exc, attempt)
                if delay is None:
                    raise
            except BaseException:
                sink.suspend()  # interrupted (Ctrl-C, a cancel, a progress callback that raised): resumable
                raise
            await asyncio.sleep(delay)

    def _download_retry_s(self, error: ClientError, attempt: int) -> float | None:
        """Seconds before a download tries again (resuming), or None when ``error`` is final."""
        if isinstance(error, (TransportError, RequestTimeout)):
            return rules.retry_delay_s(attempt, self.attempts, status=None, retry_after=None)
        if isinstance(error, ProblemError):
            return rules.retry_delay_s(attempt, self.attempts, status=error.status, retry_after=error.retry_after)
        return None

    async def _download_once(self, url: str, sink: transfer.Sink,
                             progress: Progress | None) -> Download:
        """One GET of the result, written into ``sink`` from what it already holds."""
        held, etag = sink.held()
        headers = {**self._auth(), "Accept": "*/*", "Accept-Encoding": "identity",
                   **rules.range_headers(held, etag)}
        # no limit on the whole exchange (a big file takes its time); a stall of request_timeout_s fails it
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.request_timeout_s,
                                        sock_read=self.request_timeout_s)
        try:
            async with self._http().get(url, headers=headers, timeout=timeout, allow_redirects=False) as response:
                head = _answer_of(response, b"", decode=False)
                if response.status not in (200, 206):
                    if response.status == 416 and held:
                        raise transfer.Restart
                    answer = _answer_of(response, await response.read())
                    self._raise_for(answer)
                start = _read(head, lambda: rules.read_download(head, asked_from=held))
                await sink.begin(start.offset, start.etag, start.total)
                _report(progress, sink.size, start.total)
                async for chunk in response.content.iter_chunked(transfer.CHUNK_BYTES):
                    sink.write(chunk)
                    _report(progress, sink.size, start.total)
        except ProtocolError as exc:
            exc.method, exc.url = exc.method or "GET", exc.url or url
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _transport_error(exc, "GET", url) from None
        self._check_download(sink, start, url, resumed=start.offset > 0)
        return Download(await sink.complete(), sink.size, sink.hasher.hexdigest(),
                        start.content_type or "application/octet-stream", start.name, resumed_from=start.offset)

    @staticmethod
    def _check_download(sink: transfer.Sink, start: rules.DownloadStart, url: str, *,
                        resumed: bool) -> None:
        """The size and digest the server announced, against what was written."""
        if start.total is not None and sink.size != start.total:
            raise TransportError(f"the download ended after {sink.size} of {start.total} bytes", method="GET",
                                 url=url)
        if start.sha256 is not None and sink.hasher.digest() != start.sha256:
            if resumed:
                raise transfer.Restart  # the kept part may be what is wrong: once more, whole
            sink.discard()
            raise ProtocolError("the downloaded bytes do not match the Repr-Digest the server sent",
                                method="GET", url=url)

    async def cancel(self, job: JobRef) -> JobState:
        """Cancel the job and return its state: ``canceled``, or still ``running`` if it is stopping
        after the server's grace period. ``Conflict`` if it had already succeeded or failed."""
        answer = await self._call("POST", rules.action_url(job, "cancel", base=self.base), retry=True)
        self._raise_for(answer)
        if answer.status not in (200, 202):
            raise rules.not_asyncjobs(answer)
        return _read(answer, lambda: rules.parse_job(answer.body, base=answer.url))

    async def delete(self, job: JobRef) -> None:
        """Cancel the job if needed, then forget it: afterwards it answers ``NotFound``."""
        answer = await self._call("DELETE", rules.action_url(job, "delete", base=self.base), retry=False)
        self._raise_for(answer)
        if answer.status not in (202, 204):
            raise rules.not_asyncjobs(answer)

    async def tasks(self) -> list[dict[str, Any]]:
        """The registered tasks: name, description, route, params schema, timeout, retries."""
        answer = await self._call("GET", self._url("tasks"), retry=True)
        self._raise_for(answer)
        body = answer.body
        if answer.status != 200 or not isinstance(body, dict) or not isinstance(body.get("tasks"), list):
            raise rules.not_asyncjobs(answer)
        return body["tasks"]

    async def list(self, *, status: str | None = None, task: str | None = None,
                   page_size: int | None = None) -> AsyncGenerator[JobState, None]:
        """Every job this caller may see, newest first, page after page (filters: ``status``, ``task``)."""
        url: str | None = self._url("jobs", rules.list_query(status=status, task=task, limit=page_size))
        while url is not None:
            answer = await self._call("GET", url, retry=True)
            jobs, url = _read(answer, functools.partial(rules.read_page, answer, now=_now()))
            for job in jobs:
                yield job

    # -- waiting ------------------------------------------------------------------------

    async def _watch(self, job: JobRef, timeout: float | None, *,
                     progress: bool) -> AsyncGenerator[JobState, None]:
        """States of the job, newest only, over the best channel the server offers, until the final one."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        job_id = job.id if isinstance(job, JobState) else job
        url = self._monitor_url(job)
        last: JobState | None = None
        channel: str | None = self.channels[0]
        watchers: dict[str, Callable[..., AsyncGenerator[JobState, None]]] = {
            "websocket": self._watch_websocket, "long_poll": self._watch_long_poll, "poll": self._watch_poll}
        while channel is not None:
            try:
                async with aclosing(watchers[channel](job_id, url, deadline, progress)) as states:
                    async for state in states:
                        if rules.is_newer(state, last) or state.terminal:
                            last, url = state, state.url or url
                            yield state
                        if state.terminal:
                            return
            except _Unavailable:
                channel = rules.next_channel(self.channels, channel)
            except (_Deadline, RequestTimeout) as exc:
                if isinstance(exc, RequestTimeout) and rules.remaining_s(deadline, loop.time()) != 0:
                    raise
                if last is None:  # nothing read in the time given (a timeout of 0): one short look, so that
                    with contextlib.suppress(TransportError, RequestTimeout, _Deadline):  # a job that has
                        last = (await self._monitor(url, timeout_s=min(self.request_timeout_s, LAST_LOOK_S),
                                                    deadline=deadline)).job  # ended already is not missed
                    if last is not None and last.terminal:
                        yield last
                        return
                status = last.status if last else "unknown"
                raise WaitTimeout(f"job {job_id} is still {status} after {timeout:g}s; it keeps running",
                                  job=last, url=url) from None
        raise ProtocolError(f"the server offers none of the ways of waiting {self.channels}", url=url)

    def _left(self, deadline: float | None) -> float | None:
        """Seconds before ``deadline``; ``_Deadline`` once it has passed."""
        left = rules.remaining_s(deadline, asyncio.get_running_loop().time())
        if left == 0:
            raise _Deadline
        return left

    def _timeout_for(self, deadline: float | None, extra_s: float = 0.0) -> float:
        left = self._left(deadline)
        limit = self.request_timeout_s + extra_s
        return limit if left is None else min(limit, left + 0.05)

    async def _watch_poll(self, job_id: str, url: str, deadline: float | None,
                          progress: bool) -> AsyncGenerator[JobState, None]:
        """Plain polling, at the server's ``Retry-After``."""
        while True:
            reading = await self._monitor(url, timeout_s=self._timeout_for(deadline), deadline=deadline)
            url = reading.next_url
            if reading.job is not None:
                yield reading.job
            left = self._left(deadline)
            await asyncio.sleep(rules.poll_delay_s(reading.retry_after, left))

    async def _watch_long_poll(self, job_id: str, url: str, deadline: float | None,
                               progress: bool) -> AsyncGenerator[JobState, None]:
        """Long polls (``?wait=N``; with ``If-None-Match`` for progress); unavailable if the server answers at once."""
        reading = await self._monitor(url, timeout_s=self._timeout_for(deadline), deadline=deadline)
        while True:
            url, etag = reading.next_url, reading.etag or None
            if reading.job is not None:
                yield reading.job
            wait_s = rules.long_poll_s(self._left(deadline), self.long_poll_s)
            try:
                reading = await self._monitor(url, wait_s=wait_s, etag=etag if progress else None,
                                              timeout_s=self._timeout_for(deadline, wait_s), deadline=deadline)
            except BadRequest:
                raise _Unavailable from None  # a server that refuses ``wait``
            if reading.job is not None and not reading.job.terminal and not reading.long_poll_honoured:
                yield reading.job
                raise _Unavailable  # the server ignored ``wait``

    async def _watch_websocket(self, job_id: str, url: str, deadline: float | None,
                               progress: bool) -> AsyncGenerator[JobState, None]:
        """Subscribe on the WebSocket channel first, then read the job, so no change falls in between."""
        ws_url = rules.websocket_url(self.base)
        try:
            async with asyncio.timeout(self._timeout_for(deadline)):
                ws = await self._http().ws_connect(ws_url, headers=self._auth(), heartbeat=self.heartbeat_s)
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (401, 403):
                raise Unauthorized(f"{exc.status}: the server refused the bearer token", status=exc.status,
                                   method="GET", url=ws_url) from None
            raise _Unavailable from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _transport_error(exc, "GET", ws_url) from None
        async with ws:
            await ws.send_str(rules.subscribe_frame(job_id, progress=progress).decode())
            await self._ws_event(ws, ws_url, job_id, deadline, until="subscribed")
            reading = await self._monitor(url, timeout_s=self._timeout_for(deadline), deadline=deadline)
            if reading.job is not None:
                yield reading.job
            while True:
                event = await self._ws_event(ws, ws_url, job_id, deadline, until="job")
                assert event.job is not None
                yield event.job

    async def _ws_event(self, ws: aiohttp.ClientWebSocketResponse, ws_url: str, job_id: str,
                        deadline: float | None, *, until: str) -> rules.WsEvent:
        """The next frame about the job of kind ``until``; its error raised; ``_Unavailable`` if the socket ends."""
        while True:
            left = self._left(deadline)
            limit = left
            if until == "subscribed":
                limit = self.request_timeout_s if left is None else min(self.request_timeout_s, left)
            try:
                message = await ws.receive(timeout=limit)
            except TimeoutError:
                self._left(deadline)  # _Deadline if that was the caller's deadline
                raise _Unavailable from None  # no answer to the subscribe: not the channel we know
            if message.type is not aiohttp.WSMsgType.TEXT:
                raise _Unavailable  # closed (server restart, too slow): go on over HTTP
            event = rules.read_ws_frame(message.data, job_id, base=self.base, url=ws_url)
            if event is None:
                continue
            if event.error is not None:
                raise event.error
            if event.kind == until:
                return event

    # -- HTTP ------------------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers={"User-Agent": USER_AGENT,
                                                           "Accept": "application/json, application/problem+json"})
        return self._session

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _url(self, path: str, query: Mapping[str, str] | None = None) -> str:
        return rules.with_query(rules.resolve(self.base, path), query or {})

    def _monitor_url(self, job: JobRef) -> str:
        return job.url if isinstance(job, JobState) and job.url else self._url(rules.job_path(
            job.id if isinstance(job, JobState) else job))

    async def _monitor(self, url: str, *, timeout_s: float, wait_s: float | None = None,
                       etag: str | None = None, deadline: float | None = None) -> rules.MonitorReading:
        """One answer of the status monitor (a long poll with ``wait_s``), without following its 303; its
        repeats after a busy answer end at the caller's ``deadline`` (``_Deadline``)."""
        target = url if wait_s is None else rules.with_wait(url, wait_s)
        headers = {"If-None-Match": etag} if etag else {}
        answer = await self._call("GET", target, retry=True, headers=headers, timeout_s=timeout_s, deadline=deadline)
        reading = _read(answer, lambda: rules.read_monitor(answer, now=_now()))
        if reading.redirect_without_job:  # a 303 without the job: ask for the job itself
            answer = await self._call("GET", rules.with_query(url, {"redirect": "false"}), retry=True,
                                      timeout_s=timeout_s, deadline=deadline)
            reading = _read(answer, lambda: rules.read_monitor(answer, now=_now()))
            if reading.job is None:
                raise rules.not_asyncjobs(answer)
        return reading

    def _raise_for(self, answer: Answer) -> None:
        error = rules.answer_error(answer, now=_now())
        if error is not None:
            raise error

    async def _call(self, method: str, url: str, *, retry: bool, retry_timeouts: bool = False,
                    retry_statuses: frozenset[int] = rules.RETRYABLE_STATUSES, timeout_s: float | None = None,
                    deadline: float | None = None, **kwargs: Any) -> Answer:
        """One request, repeated (when ``retry``: the request is safe to repeat) after a lost
        connection or an answer with one of ``retry_statuses`` (429/502/503/504), as
        ``rules.retry_delay_s`` says. A request that timed out is repeated only with ``retry_timeouts``
        (its caller has no deadline of its own). A repeat that would start past ``deadline`` (the loop's
        clock) is not made: ``_Deadline``."""
        attempt = 0
        while True:
            attempt += 1
            try:
                answer = await self._exchange(method, url, timeout_s=timeout_s, **kwargs)
            except (TransportError, RequestTimeout) as exc:
                repeatable = retry and (retry_timeouts or not isinstance(exc, RequestTimeout))
                delay = rules.retry_delay_s(attempt, self.attempts if repeatable else 1, status=None,
                                            retry_after=None)
                if delay is None:
                    raise
            else:
                retry_after = rules.retry_after_s(answer.header("Retry-After"), now=_now())
                delay = rules.retry_delay_s(attempt, self.attempts if retry else 1, status=answer.status,
                                            retry_after=retry_after, statuses=retry_statuses)
                if delay is None or answer.status < 400:
                    return answer
            left = rules.remaining_s(deadline, asyncio.get_running_loop().time())
            if left is not None and delay >= left:
                raise _Deadline
            await asyncio.sleep(delay)

    async def _exchange(self, method: str, url: str, *, timeout_s: float | None = None,
                        headers: Mapping[str, str] | None = None, upload: transfer.Upload | None = None,
                        **kwargs: Any) -> Answer:
        """One HTTP request and its whole answer; a failure to talk becomes a ``ClientError``.

        An ``upload`` is the body, limited by its own watchdog instead of one overall timeout.
        """
        timeout = aiohttp.ClientTimeout(total=None if upload else timeout_s or self.request_timeout_s)
        watchdog: contextlib.AbstractAsyncContextManager[None] = contextlib.nullcontext()
        if upload is not None:
            kwargs["data"], watchdog = upload, upload.watch()
        try:
            async with (watchdog,
                        self._http().request(method, url, headers={**self._auth(), **(headers or {})},
                                             timeout=timeout, allow_redirects=False, **kwargs) as response):
                return _answer_of(response, await response.read())
        except ProtocolError as exc:
            exc.method, exc.url = method, url
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            if upload is not None and upload.failure is not None:
                raise upload.failure from None  # reading the file failed, not the connection
            raise _transport_error(exc, method, url) from None


def _now() -> float:
    return time.time()


def _answer_of(response: aiohttp.ClientResponse, raw: bytes, *, decode: bool = True) -> Answer:
    """An aiohttp response as an ``Answer`` (a JSON body decoded; ``ProtocolError`` if it is not JSON)."""
    content_type = response.headers.get("Content-Type", "")
    names = {name.lower() for name in response.headers}
    found = {name: ", ".join(response.headers.getall(name)) for name in names}
    body = rules.decode_body(content_type, raw) if decode else raw
    return Answer(response.method, str(response.url), response.status, found, content_type, body)


def _report(progress: Progress | None, done: int, total: int | None) -> None:
    if progress is not None:
        progress(done, total)


def _read(answer: Answer, reader: Callable[[], T]) -> T:
    """Run a pure reader on an answer; a ``ProtocolError`` it raises is told which request it concerns."""
    try:
        return reader()
    except ProtocolError as exc:
        exc.method = exc.method or answer.method
        exc.url = exc.url or answer.url
        raise


def _reason(error: OSError) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, socket.gaierror):
        return "unknown host"
    if isinstance(error, TimeoutError):
        return "timed out"
    return (error.strerror or str(error) or "connection failed").lower()


def _transport_error(exc: BaseException, method: str, url: str) -> ClientError:
    """An aiohttp failure as one of ours: cannot connect, no answer in time, connection lost, not HTTP."""
    if isinstance(exc, TimeoutError):
        return RequestTimeout(f"no answer from {url} in time", method=method, url=url)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ConnectError(f"cannot connect to {exc.host}:{exc.port}: {_reason(exc.os_error)}", method=method,
                            url=url)
    if isinstance(exc, aiohttp.ClientResponseError):
        return ProtocolError(f"the answer from {url} is not valid HTTP ({exc.message}): is this an asyncjobs server?",
                             method=method, url=url)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return TransportError(f"the server closed the connection without answering {method} {url}",
                              method=method, url=url)
    return TransportError(f"the connection to {url} failed: {exc}", method=method, url=url)
