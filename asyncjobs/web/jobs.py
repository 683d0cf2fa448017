"""The REST endpoints of jobs and tasks: handlers that do I/O around ``protocol``'s decisions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .. import callbacks, codec, protocol
from ..errors import InvalidRequest, QuotaExceeded, RequestError, StoreError
from ..files import Upload
from ..limits import BucketState, Rates
from ..models import Job
from ..queue import JobQueue
from ..tasks import TaskSpec
from . import downloads, pages, uploads
from .common import (
    QUEUE_KEY,
    RATES_KEY,
    SETTINGS_KEY,
    SUBMIT_ROUTES_KEY,
    WAITERS_KEY,
    caller_of,
    job_id_of,
    json_response,
    list_header,
    principal_of,
    problem_response,
    read_json,
    visible_owner,
)
from .problems import WebProblem, problem_body

log = logging.getLogger("asyncjobs.web")


async def _accepted(queue: JobQueue, job: Job, extra: dict[str, str] | None = None, *,
                    just_submitted: bool = False) -> web.Response:
    view = await queue.view(job, just_submitted=just_submitted)
    answer = protocol.submit_answer(job, eta=view.eta, now=queue.clock())
    return json_response(protocol.job_body(job, eta=view.eta, queue_position=view.queue_position),
                         status=answer.status, headers={**answer.headers, **(extra or {})})


async def rate_fields_on_refusals(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: while a submit rate is set, every submit answer carries the RateLimit fields,
    a refusal too. ``_submit`` adds them where it holds the bucket; any other refusal of a submit route (a 400,
    a 413 or 417 from the ``Expect`` handler, a 403 for a missing CSRF token, aiohttp's own 413) gets them
    here, from a look at the caller's bucket. A caller without valid credentials (401) has no bucket."""
    rates = request.app[RATES_KEY]
    if rates is None or response.status < 400 or "RateLimit" in response.headers:  # (set only with a rate)
        return
    if request.match_info.route not in request.app[SUBMIT_ROUTES_KEY]:
        return
    try:
        caller = await caller_of(request)
        if caller is not None:
            response.headers.update(_rate_headers(await rates.peek(caller)))
    except StoreError as exc:  # the refusal still goes out, without the fields
        log.warning("cannot read the submit rate's bucket for a refusal: %s", exc)


def _rate_headers(bucket: BucketState) -> dict[str, str]:
    return protocol.ratelimit_headers(burst=bucket.burst, window_s=bucket.window_s, left=bucket.left,
                                      next_s=bucket.next_s)


async def submit(request: web.Request) -> web.Response:
    queue = request.app[QUEUE_KEY]
    if uploads.is_multipart(request):
        async with uploads.receiving() as received:
            await uploads.read_multipart(request, received, spec=None)
            if received.submit is None:
                raise InvalidRequest("the multipart body has no 'job' part (the JSON submit body)",
                                 errors=[{"field": "job", "message": "is required"}])
            return await _submit(request, queue, received.submit, received.uploads)
    body = protocol.parse_submit(await read_json(request))
    return await _submit(request, queue, body)


async def _submit(request: web.Request, queue: JobQueue, body: protocol.Submit,
                  files: list[Upload] | None = None) -> web.Response:
    """Store the job (or find the one this request repeats) and answer as the protocol says.

    With ``files``, the request's identity for an ``Idempotency-Key`` includes their digests.
    """
    settings = request.app[SETTINGS_KEY]
    if body.callback_url is not None and not callbacks.host_allowed(body.callback_url, settings.callback_hosts):
        raise InvalidRequest("callback_url must be an http(s) URL on a host this server allows callbacks to"
                         if settings.callback_hosts else "callbacks are not enabled on this server",
                         errors=[{"field": "callback_url", "message": "host not allowed"}])
    key = protocol.parse_idempotency_key(request.headers.get("Idempotency-Key"))
    request_hash = None
    if key:
        digests = {u.param: u.stored.sha256 for u in files or () if u.stored is not None}
        request_hash = codec.fingerprint([body.fingerprint(), digests]) if digests else body.fingerprint()
    owner = principal_of(request) or ""
    rates = request.app[RATES_KEY]
    bucket, over_rate = await _take_token(rates, owner)
    spent_from = rates if over_rate is None else None  # where a token was spent, to give back if it buys nothing
    # Files past max_total_bytes were hashed, not kept: only a replay or a reuse can be answered (507 otherwise).
    no_room = next((u.no_room for u in files if u.no_room is not None), None) if files else None
    try:
        inserted = await queue.submit(
            body.task, body.params, priority=body.priority, delay_s=body.delay_s, owner=owner,
            idempotency_key=key, request_hash=request_hash, callback_url=body.callback_url, uploads=files,
            fresh=protocol.wants_fresh(list_header(request, "Cache-Control")), refuse_new=over_rate or no_room)
    except BaseException as exc:
        if spent_from is not None:
            bucket = await asyncio.shield(spent_from.give_back(owner))  # a refused submit spends no token
        if bucket is not None and isinstance(exc, RequestError):  # the bucket as known: no second look
            raise WebProblem(exc, _rate_headers(bucket)) from exc
        raise
    if inserted.duplicate is not None and spent_from is not None:
        bucket = await spent_from.give_back(owner)  # replays and reused jobs take no quota
    if inserted.duplicate in ("reuse", "key-reuse"):  # a key first answered by an equal job: that answer again
        response = await _answer_reuse(request, queue, inserted.job)
    else:
        response = await _answer_submit(request, queue, inserted.job, just_submitted=inserted.duplicate is None)
    if inserted.duplicate in ("idempotency", "key-reuse"):
        response.headers["Idempotent-Replayed"] = "true"
    if bucket is not None:
        response.headers.update(_rate_headers(bucket))
    return response


async def _take_token(rates: Rates | None, owner: str) -> tuple[BucketState | None, QuotaExceeded | None]:
    """The caller's bucket after a token is spent; or, when it is empty, the bucket with nothing spent and the
    429 to answer unless the submit turns out to be a replay or a reuse (they take no quota)."""
    if rates is None:
        return None, None
    wait_s, state = await rates.take_token(owner)
    if not wait_s:
        return state, None
    return state, QuotaExceeded(f"more than {rates.rate:g} submits per second (bursts of {rates.burst}); slow down",
                                retry_after_s=protocol.rate_retry_after_s(wait_s))


async def _answer_reuse(request: web.Request, queue: JobQueue, job: Job) -> web.Response:
    """An equal job answers: 303 to it; with ``Prefer: wait=N``, 201/200 if it ends within N seconds."""
    requested = protocol.requested_wait({}, list_header(request, "Prefer"))
    applied = None if requested is None else protocol.applied_wait(requested, request.app[SETTINGS_KEY].max_wait_s)
    if applied:
        job = await _held(request, queue.wait(job.id, timeout_s=applied, until=lambda j: j.terminal,
                                              owner=visible_owner(request), expired_is_gone=False))
    view = await queue.view(job)
    answer = protocol.reuse_answer(job, eta=view.eta, now=queue.clock(), waited=applied is not None)
    return json_response(protocol.job_body(job, eta=view.eta, queue_position=view.queue_position),
                         status=answer.status, headers={**answer.headers, **protocol.wait_headers(applied)})


async def _answer_submit(request: web.Request, queue: JobQueue, job: Job, *,
                         just_submitted: bool = False) -> web.Response:
    """202 at once; with ``Prefer: wait=N``, hold up to N seconds for a terminal state (201 / 200)."""
    requested = protocol.requested_wait({}, list_header(request, "Prefer"))
    if requested is None:
        return await _accepted(queue, job, {"Vary": "Prefer"}, just_submitted=just_submitted)
    applied = protocol.applied_wait(requested, request.app[SETTINGS_KEY].max_wait_s)
    job = await _held(request, queue.wait(job.id, timeout_s=applied, until=lambda j: j.terminal,
                                          owner=visible_owner(request), expired_is_gone=False))
    view = await queue.view(job)
    answer = protocol.submit_wait_answer(job, eta=view.eta, now=queue.clock())
    return json_response(protocol.job_body(job, eta=view.eta, queue_position=view.queue_position),
                         status=answer.status, headers={**answer.headers, **protocol.wait_headers(applied)})


async def _held(request: web.Request, waiting: Awaitable[Job]) -> Job:
    """Await a wait for a job while it is counted as an open long poll."""
    waiters = request.app[WAITERS_KEY]
    waiters.long_polls += 1
    try:
        return await waiting
    finally:
        waiters.long_polls -= 1


def _raw_file(request: web.Request, spec: TaskSpec) -> bool:
    """Whether the body is the task's file: any body at all, or an empty one said so (``Content-Length: 0``,
    an empty file) where the file is required (an optional file is left out by sending nothing)."""
    return request.body_exists or (request.content_length == 0 and len(spec.files) == 1 and spec.files[0].required)


def task_route_handler(spec: TaskSpec) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A task on its own route: path parameters and the JSON body become its params.

    A task with file params also takes multipart (form fields as params) or, with one file
    param, a raw body of any type as that file (query parameters as params).
    """

    async def handle(request: web.Request) -> web.Response:
        queue = request.app[QUEUE_KEY]
        if uploads.is_multipart(request) or (spec.files and _raw_file(request, spec)):
            async with uploads.receiving() as received:
                if uploads.is_multipart(request):
                    await uploads.read_multipart(request, received, spec=spec)
                    given = uploads.coerce(received.fields, spec.schema)
                else:
                    await uploads.read_raw(request, received, spec)
                    given = uploads.coerce({k: v for k, v in request.query.items() if k != "filename"}, spec.schema)
                params = _with_path_params(request, given)
                return await _submit(request, queue, protocol.Submit(spec.name, params), received.uploads)
        body = await read_json(request, required=False)
        if body is not None and not isinstance(body, dict):
            raise InvalidRequest("the body must be a JSON object", errors=[{"field": "", "message": "expected object"}])
        return await _submit(request, queue, protocol.Submit(spec.name, _with_path_params(request, body or {})))

    return handle


def _with_path_params(request: web.Request, given: dict[str, Any]) -> dict[str, Any]:
    params = dict(given)
    for name, value in request.match_info.items():
        if name in params and params[name] != value:
            raise InvalidRequest(f"{name!r} is given in the path and, differently, in the body",
                             errors=[{"field": name, "message": "differs from the path"}])
        params[name] = value
    return params


# Every answer of the monitor depends on Accept (a browser gets a page, its errors too) and on Prefer (a long poll).
_MONITOR_VARY = {"Vary": "Prefer, Accept"}


async def monitor(request: web.Request) -> web.StreamResponse:
    """The status monitor; with ``?wait=N`` or ``Prefer: wait=N`` a long poll; a page for browsers."""
    if pages.wants_html(request):
        return await pages.job_page(request)
    try:
        return await _monitor(request)
    except RequestError as exc:  # a 404, a 410, a 400: problem details, which a browser would have had as a page
        raise WebProblem(exc, _MONITOR_VARY) from exc


async def _monitor(request: web.Request) -> web.StreamResponse:
    queue = request.app[QUEUE_KEY]
    settings = request.app[SETTINGS_KEY]
    job_id = job_id_of(request)
    if_none_match = list_header(request, "If-None-Match")
    try:
        requested = protocol.requested_wait(request.query, list_header(request, "Prefer"))
    except InvalidRequest as exc:  # still an answer about the job, when there is one: its status and ETag
        with contextlib.suppress(RequestError, StoreError):  # no job, or no store: the 400 all the same
            found = await queue.find(job_id, owner=visible_owner(request))
            exc.job_status, exc.job_version = found.status.value, found.version
        raise
    applied = None if requested is None else protocol.applied_wait(requested, settings.max_wait_s)
    if applied:
        job = await _held(request, queue.wait(job_id, timeout_s=applied, owner=visible_owner(request),
                                              until=lambda j: protocol.long_poll_done(j, if_none_match)))
    else:
        job = await queue.find(job_id, owner=visible_owner(request))
    wait_headers = {**protocol.wait_headers(applied), **_MONITOR_VARY}
    if protocol.etag_matches(if_none_match, protocol.etag(job)):
        return web.Response(status=304, headers={**protocol.job_headers(job), **wait_headers})
    view = await queue.view(job)
    answer = protocol.monitor_answer(job, eta=view.eta, now=queue.clock(), style=settings.monitor_style,
                                     redirect=protocol.parse_bool(request.query.get("redirect"), True))
    return json_response(protocol.job_body(job, eta=view.eta, queue_position=view.queue_position),
                         status=answer.status, headers={**answer.headers, **wait_headers})


async def result(request: web.Request) -> web.StreamResponse:
    queue = request.app[QUEUE_KEY]
    job = await queue.find(job_id_of(request), owner=visible_owner(request))
    view = await queue.view(job) if not job.terminal else None
    answer = protocol.result_answer(job, eta=view.eta if view else None, now=queue.clock(),
                                    if_none_match=list_header(request, "If-None-Match"))
    if answer.status in (200, 304) and job.files is not None and job.files.get("result"):
        return await downloads.send_file_result(request, queue, job)  # a file has validators of its own
    if answer.status == 304:
        return web.Response(status=304, headers=answer.headers)
    if answer.status == 200:
        response = web.Response(body=job.result or b"null", headers=answer.headers)
        response.content_type = job.result_type or "application/json"
        return response
    if answer.status == 404:
        problem = problem_body(404, f"job {job.id} is {job.status.value}; its result does not exist yet")
        return problem_response({**problem, "job_status": job.status.value}, answer.headers)
    problem = problem_body(409, f"job {job.id} {job.status.value}; it has no result and never will")
    return problem_response({**problem, "job_status": job.status.value, "error": job.error}, answer.headers)


async def cancel(request: web.Request) -> web.Response:
    queue = request.app[QUEUE_KEY]
    job, stopped = await queue.cancel(job_id_of(request), owner=visible_owner(request))
    answer = protocol.cancel_answer(job, stopped=stopped)
    return json_response(protocol.job_body(job), status=answer.status, headers=answer.headers)


async def delete(request: web.Request) -> web.Response:
    queue = request.app[QUEUE_KEY]
    job_id = job_id_of(request)
    if await queue.delete(job_id, owner=visible_owner(request)):
        return web.Response(status=204, headers=protocol.NO_STORE)
    job = await queue.find(job_id, owner=visible_owner(request))
    return json_response(protocol.job_body(job), status=202, headers=protocol.job_headers(job))


async def list_jobs(request: web.Request) -> web.Response:
    queue = request.app[QUEUE_KEY]
    query = protocol.parse_list_query(request.query)
    owner = visible_owner(request)
    jobs: list[Job] = []
    cursor = None
    if owner is None or query.owner in (None, owner):  # another principal's jobs do not exist for this caller
        jobs, cursor = await queue.list_jobs(status=query.status, task=query.task, before_seq=query.before,
                                        limit=query.limit, owner=owner if owner is not None else query.owner)
    next_url = protocol.next_page_url(status=query.status, task=query.task, limit=query.limit, cursor=cursor,
                                      owner=query.owner)
    headers = dict(protocol.NO_STORE)
    if next_url:
        headers["Link"] = f'<{next_url}>; rel="next"'
    bodies = [protocol.job_body(v.job, eta=v.eta, queue_position=v.queue_position) for v in await queue.views(jobs)]
    return json_response({"jobs": bodies, "next": next_url}, headers=headers)


async def list_tasks(request: web.Request) -> web.Response:
    registry = request.app[QUEUE_KEY].registry
    return json_response({"tasks": [spec.describe() for spec in sorted(registry, key=lambda s: s.name)]})


async def healthz(request: web.Request) -> web.Response:
    """Liveness: this node, whether its store and change feed are up, and who waits on each channel;
    503 while the store does not answer, or the node has not started on it yet."""
    waiters = request.app[WAITERS_KEY]
    queue = request.app[QUEUE_KEY]
    store_up = await queue.store_up()
    up = store_up and queue.started
    body = {"status": "ok" if up else "unavailable", "node": queue.node, "store": "up" if store_up else "down",
            "feed": "up" if queue.feed.up else "down", "waiting": vars(waiters)}
    return json_response(body, status=200 if up else 503,
                         headers={**protocol.NO_STORE, **({} if up else {"Retry-After": "5"})})
