"""Pushing job changes to clients: Server-Sent Events per job and the WebSocket channel."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from .. import codec, protocol
from ..errors import InvalidRequest, JobGone, JobNotFound
from ..hub import Subscription
from ..models import Job, Status
from ..queue import JobQueue
from . import problems
from .common import (
    QUEUE_KEY,
    SESSIONS_KEY,
    SETTINGS_KEY,
    WAITERS_KEY,
    WebSettings,
    job_id_of,
    session_of,
    visible_owner,
)

log = logging.getLogger("asyncjobs.web")

SOCKETS_KEY: web.AppKey[weakref.WeakSet[web.WebSocketResponse]] = web.AppKey("asyncjobs_sockets")
CLOSING_KEY = web.AppKey("asyncjobs_closing", set)
MAX_FRAME_BYTES = 1 << 20


async def _body(queue: JobQueue, job: Job) -> dict[str, Any]:
    view = await queue.view(job)
    return protocol.job_body(job, eta=view.eta, queue_position=view.queue_position)


# -- Server-Sent Events -----------------------------------------------------------

async def events(request: web.Request) -> web.StreamResponse:
    """The job now, then an event per change (``status`` or ``progress``), ending after the terminal one."""
    queue = request.app[QUEUE_KEY]
    settings = request.app[SETTINGS_KEY]
    waiters = request.app[WAITERS_KEY]
    last_seen = protocol.parse_last_event_id(request.headers.get("Last-Event-ID"))
    with queue.hub.subscribe([job_id_of(request)], conflate=True) as sub:
        job = await queue.find(job_id_of(request), owner=visible_owner(request))  # 404/410 before the stream
        response = web.StreamResponse(headers={  # the ETag: the job as the stream starts (each event says its own)
            "Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no",
            "ETag": protocol.etag(job)})
        await response.prepare(request)
        if request.method == "HEAD":  # the stream's headers only: a HEAD answer carries no content
            return response
        waiters.event_streams += 1
        try:
            with _held_by_session(request, sub.end):  # a stream opened on a sign-in session ends with it
                await _stream(queue, settings, sub, response, job, last_seen)
        except (ConnectionResetError, ConnectionError):
            pass  # the client went away
        finally:
            waiters.event_streams -= 1
        return response


async def _stream(queue: JobQueue, settings: WebSettings, sub: Subscription, response: web.StreamResponse, job: Job,
                  last_seen: int | None) -> None:
    """The events of an SSE stream: the job now unless ``last_seen`` is its version, then each change, until
    the terminal one (or the subscription ends)."""
    if last_seen is None or job.version > last_seen:
        await response.write(protocol.sse_event(job, "status", await _body(queue, job)))
    last_status = job.status
    while not job.terminal:
        newer = await sub.get(settings.sse_keepalive_s)
        if newer is None:
            if sub.ended or sub.vanished:  # its session ended, or the job is gone (deleted on another node)
                return
            await response.write(protocol.SSE_KEEPALIVE)
            continue
        if newer.version <= job.version:
            continue
        job = newer
        name = protocol.sse_event_name(job, last_status)
        await response.write(protocol.sse_event(job, name, await _body(queue, job)))
        last_status = job.status


def _held_by_session(request: web.Request, end: Callable[[], None]) -> contextlib.AbstractContextManager[None]:
    """Call ``end`` if the sign-in session that opened this stream or socket ends (nothing for a token)."""
    session = session_of(request)
    sessions = request.app.get(SESSIONS_KEY)
    if session is None or sessions is None:
        return contextlib.nullcontext()
    return sessions.hold(session, end)


# -- WebSocket ----------------------------------------------------------------------

@dataclass
class _Socket:
    """One client's subscriptions and what it was last sent, per job."""

    ws: web.WebSocketResponse
    sub: Subscription
    progress_ids: set[str] = field(default_factory=set)
    progress_all: bool = False
    sent: dict[str, tuple[Status, int]] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    principal: str | None = None  # None with auth off: every job is visible
    star_since: float | None = None  # when "*" was subscribed (None: it is not)

    def wants(self, job: Job) -> bool:
        """Status changes always; progress only where asked; never an older version than already sent."""
        if self.principal is not None and job.owner != self.principal:
            return False
        prev = self.sent.get(job.id)
        if prev is not None and job.version <= prev[1]:
            return False
        if prev is None and self.star_since is not None and job.status is Status.RUNNING \
                and job.started_at is not None and job.started_at < self.star_since:
            prev = (Status.RUNNING, 0)  # seen through "*", running since before it: a change of progress
        if prev is None or prev[0] is not job.status:
            return True
        return self.progress_all or job.id in self.progress_ids

    def mark_sent(self, job: Job) -> None:
        if job.terminal and job.id not in self.sub.job_ids:
            self.sent.pop(job.id, None)  # seen through "*": nothing more will come for it
        else:
            self.sent[job.id] = (job.status, job.version)

    async def send_job(self, queue: JobQueue, job: Job) -> None:
        if self.wants(job):
            self.mark_sent(job)
            await self.send({"type": "job", "job": await _body(queue, job)})

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_str(codec.dumps(message).decode())


async def websocket(request: web.Request) -> web.WebSocketResponse:
    queue = request.app[QUEUE_KEY]
    settings = request.app[SETTINGS_KEY]
    waiters = request.app[WAITERS_KEY]
    ws = web.WebSocketResponse(heartbeat=settings.ws_heartbeat_s, max_msg_size=MAX_FRAME_BYTES)
    transport = request.transport
    await ws.prepare(request)
    request.app[SOCKETS_KEY].add(ws)
    waiters.websockets += 1
    sock = _Socket(ws=ws, sub=queue.hub.subscribe(maxsize=settings.ws_buffer), principal=visible_owner(request))
    sender = asyncio.create_task(_send_changes(queue, sock), name="asyncjobs-ws-sender")

    def close_later(closing: Coroutine[Any, Any, Any]) -> None:
        """Close from outside the handler, in a task the app keeps until it is done."""
        task = asyncio.create_task(closing)
        request.app[CLOSING_KEY].add(task)
        task.add_done_callback(request.app[CLOSING_KEY].discard)

    def too_slow() -> None:
        # The sender may be stuck in a send to a peer that stopped reading: stop it, then close.
        sender.cancel()
        close_later(_close_slow(ws, transport))

    def signed_out() -> None:
        sock.sub.end()  # the sender stops
        close_later(ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"the sign-in session ended"))

    sock.sub.on_overflow = too_slow
    try:
        with _held_by_session(request, signed_out):  # a socket opened on a sign-in session ends with it
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    await _handle_frame(queue, sock, msg.data)
                elif msg.type is WSMsgType.BINARY:
                    await sock.send(protocol.ws_error(400, "binary frames are not understood; send JSON text frames"))
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        sock.sub.close()
        waiters.websockets -= 1
    return ws


async def _send_changes(queue: JobQueue, sock: _Socket) -> None:
    """Forward published changes (an overflow of the buffer is handled by ``too_slow``)."""
    try:
        while not sock.ws.closed and not sock.sub.overflowed and not sock.sub.ended:
            job = await sock.sub.get()
            if job is not None:
                async with sock.lock:
                    await sock.send_job(queue, job)
            elif sock.sub.vanished:
                async with sock.lock:
                    await _vanished(queue, sock)
    except (ConnectionResetError, ConnectionError):
        pass


async def _vanished(queue: JobQueue, sock: _Socket) -> None:
    """Jobs watched by id that are no longer stored (deleted or expired on another node before this one
    read their last state): an error frame each, as a subscribe to them now would get, and no more watching."""
    ids, sock.sub.vanished = sock.sub.vanished & sock.sub.job_ids, set()
    for job_id in sorted(ids):
        try:
            await queue.find(job_id, owner=sock.principal)
        except (JobNotFound, JobGone) as exc:
            sock.sub.remove([job_id])
            sock.progress_ids.discard(job_id)
            sock.sent.pop(job_id, None)
            await sock.send(protocol.ws_error(problems.status_of(exc), exc.detail, id=job_id))


async def _close_slow(ws: web.WebSocketResponse, transport: asyncio.Transport | None) -> None:
    """Send a 1008 close, then cut the connection: a peer this far behind cannot be waited for."""
    log.info("closing a WebSocket that fell too far behind")
    try:
        async with asyncio.timeout(1.0):
            await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"too slow: events overflowed")
    except (TimeoutError, ConnectionError, asyncio.CancelledError):
        # CancelledError too: the stopped sender's cancel also cancels the drain waiter it shared with close().
        pass
    finally:
        if transport is not None:
            transport.abort()  # a graceful close would wait for the peer to read what is buffered


async def _handle_frame(queue: JobQueue, sock: _Socket, text: str) -> None:
    try:
        command = protocol.parse_ws_frame(codec.loads(text))
    except codec.JSONDecodeError:
        await sock.send(protocol.ws_error(400, "a frame must be JSON"))
        return
    except InvalidRequest as exc:
        await sock.send(protocol.ws_error(400, exc.detail))
        return
    async with sock.lock:  # keep "subscribed" and the states it promises ahead of later changes
        if command.op is protocol.WsOp.UNSUBSCRIBE:
            await _unsubscribe(sock, command)
        else:
            await _subscribe(queue, sock, command)


async def _subscribe(queue: JobQueue, sock: _Socket, command: protocol.WsCommand) -> None:
    if command.jobs is None:
        sock.sub.watch_everything()
        if sock.star_since is None:
            sock.star_since = queue.clock()
        sock.progress_all = sock.progress_all or command.progress
        await sock.send({"type": "subscribed", "jobs": "*"})
        return
    room = protocol.MAX_IDS_PER_SOCKET - len(sock.sub.job_ids)
    if len(set(command.jobs) - sock.sub.job_ids) > room:
        await sock.send(protocol.ws_error(400, f"a socket may watch at most {protocol.MAX_IDS_PER_SOCKET} jobs"))
        return
    known, finished, errors = [], [], []
    for job_id in command.jobs:
        sock.sub.add([job_id])  # subscribe before reading, so no change falls in between
        try:
            job = await queue.find(job_id, owner=sock.principal)
        except (JobNotFound, JobGone) as exc:
            sock.sub.remove([job_id])
            errors.append(protocol.ws_error(problems.status_of(exc), exc.detail, id=job_id))
            continue
        known.append(job_id)
        if command.progress:
            sock.progress_ids.add(job_id)
        if job.terminal:
            finished.append(job)
        else:  # the state it has now is no change: the next frame is its next status (or progress)
            sock.sent.setdefault(job_id, (job.status, job.version))
    await sock.send({"type": "subscribed", "jobs": known})
    for error in errors:
        await sock.send(error)
    for job in finished:  # its final state at once, on every subscribe: sent before or not
        sock.sent.pop(job.id, None)
        await sock.send_job(queue, job)


async def _unsubscribe(sock: _Socket, command: protocol.WsCommand) -> None:
    if command.jobs is None:
        sock.sub.unwatch_everything()
        removed: list[str] | str = "*"
        sock.progress_all = False
        sock.star_since = None
    else:
        sock.sub.remove(command.jobs)
        for job_id in command.jobs:
            sock.progress_ids.discard(job_id)
            if not sock.sub.everything:  # still seen through "*": what it was sent still counts
                sock.sent.pop(job_id, None)
        removed = command.jobs
    await sock.send({"type": "unsubscribed", "jobs": removed})


async def end_waits(app: web.Application) -> None:
    """At shutdown: a long poll still open answers with its job as it is now (to poll again elsewhere or
    later), an event stream ends, and every socket is told the server is going away: none is cut off."""
    app[QUEUE_KEY].hub.end_all()
    sockets: weakref.WeakSet[web.WebSocketResponse] = app[SOCKETS_KEY]
    for ws in list(sockets):
        with contextlib.suppress(Exception):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
