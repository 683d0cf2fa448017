"""Pushed changes over real connections: Server-Sent Events per job and the WebSocket channel."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable

import aiohttp
import pytest
from aiohttp import WSCloseCode, WSMsgType

from asyncjobs.web.common import SETTINGS_KEY
from tests.conftest import submit, wait_status, eventually, recv, recv_until

PROBLEM = "application/problem+json"
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30)


# -- helpers -------------------------------------------------------------------

@pytest.fixture
def start(app_factory, aiohttp_client):
    """An App behind the test server, with WebSettings overrides (keep-alive, heartbeat, buffer) and a short grace."""

    async def start_(settings: dict[str, Any] | None = None, **sections: dict[str, Any]):
        queue = {"shutdown_grace": 0.5, **sections.pop("queue", {})}
        app = app_factory(queue=queue, **sections)
        if settings:
            app.web[SETTINGS_KEY] = dataclasses.replace(app.web[SETTINGS_KEY], **settings)
        client = await aiohttp_client(app.web)
        return client, app

    return start_


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()



async def waiting(client) -> dict[str, int]:
    """The waiter counts that GET /healthz exposes."""
    resp = await client.get("/healthz")
    assert resp.status == 200, await resp.text()
    return (await resp.json())["waiting"]


def counted(client, channel: str, n: int) -> Callable[[], Any]:
    async def check() -> bool:
        return (await waiting(client))[channel] == n

    return check


async def cancel(client, job_id: str) -> dict:
    resp = await client.post(f"/jobs/{job_id}/cancel")
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def running_job(client, task: str, params: dict | None = None) -> dict:
    job = await submit(client, task, params)
    return await wait_status(client, job["id"], "running")


@dataclass
class SSEEvent:
    id: str | None
    event: str
    data: str

    @property
    def job(self) -> dict:
        return json.loads(self.data)


@dataclass
class SSEComment:
    text: str


class SSEReader:
    """A Server-Sent Events parser over a live aiohttp response, reading ``resp.content`` line by line."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self._fields: dict[str, str] = {}
        self._data: list[str] = []

    async def item(self, timeout_s: float = 10.0) -> SSEEvent | SSEComment | None:
        """The next event or comment; None at the end of the stream."""
        async with asyncio.timeout(timeout_s):
            while True:
                raw = await self.resp.content.readline()
                if not raw:
                    return None
                line = raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
                if line == "":
                    if self._data:
                        event = SSEEvent(self._fields.get("id"), self._fields.get("event", "message"),
                                         "\n".join(self._data))
                        self._fields, self._data = {}, []
                        return event
                    self._fields = {}
                    continue
                if line.startswith(":"):
                    return SSEComment(line[1:].strip())
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "data":
                    self._data.append(value)
                else:
                    self._fields[name] = value

    async def event(self, timeout_s: float = 10.0) -> SSEEvent | None:
        """The next event (comments skipped); None at the end of the stream."""
        deadline = time.monotonic() + timeout_s
        while True:
            item = await self.item(max(0.01, deadline - time.monotonic()))
            if not isinstance(item, SSEComment):
                return item

    async def rest(self, timeout_s: float = 15.0) -> list[SSEEvent]:
        """Every event until the server ends the stream."""
        deadline = time.monotonic() + timeout_s
        events = []
        while (event := await self.event(max(0.01, deadline - time.monotonic()))) is not None:
            events.append(event)
        return events


async def open_events(client, job_id: str, headers: dict[str, str] | None = None) -> tuple[aiohttp.ClientResponse, SSEReader]:
    resp = await client.get(f"/jobs/{job_id}/events", headers=headers or {})
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "text/event-stream"
    assert re.fullmatch(r'W/"\d+"', resp.headers["ETag"]), resp.headers  # every response about a job has one
    return resp, SSEReader(resp)


def check_event_sequence(events: list[SSEEvent], *, resumed_at: int | None = None) -> None:
    """Ids are versions and grow; an event is `status` exactly when the status differs from the previous one.
    At ``resumed_at`` (the first event of a stream resumed with Last-Event-ID) a `status` event is the job as
    it is, sent first as on any stream when it changed while the client was away."""
    previous: dict | None = None
    for i, event in enumerate(events):
        job = event.job
        assert event.id is not None and int(event.id) == job["version"], event
        if previous is not None:
            assert job["version"] > previous["version"], (previous["version"], job["version"])
        expected = "status" if previous is None or previous["status"] != job["status"] else "progress"
        assert event.event == expected or (i == resumed_at and event.event == "status"), (
            event.event, job["status"], previous and previous["status"])
        previous = job




def is_final(job_id: str, status: str = "succeeded") -> Callable[[dict], bool]:
    return lambda f: f.get("type") == "job" and f["job"]["id"] == job_id and f["job"]["status"] == status


async def no_frame_within(ws, seconds: float) -> list[dict]:
    """Frames that arrive within ``seconds`` (the caller expects none)."""
    frames = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            msg = await ws.receive(timeout=left)
        except asyncio.TimeoutError:
            break
        frames.append(msg)
    return frames


# -- Server-Sent Events ----------------------------------------------------------------

async def test_sse_sends_state_at_once_then_progress_and_status_and_ends(start):
    """The stream sends the job at once, then `progress` and `status` events with version ids, and ends after the terminal one."""
    client, _ = await start()
    job = await submit(client, "sleep", {"seconds": 1.0, "steps": 4})
    opened = time.monotonic()
    resp, reader = await open_events(client, job["id"])
    assert resp.headers.get("Cache-Control") == "no-store"
    first = await reader.event(timeout_s=5)
    assert first is not None and time.monotonic() - opened < 1.0
    assert first.event == "status" and first.job["id"] == job["id"]
    events = [first, *await reader.rest()]
    ended = time.time()
    check_event_sequence(events)
    last = events[-1].job
    assert last["status"] == "succeeded" and last["result"] == {"slept": 1.0}
    assert last["progress"] == {"fraction": 1.0, "message": "step 4 of 4"}
    assert ended - ts(last["finished_at"]) < 1.0
    progress = [e.job["progress"]["fraction"] for e in events if e.event == "progress"]
    assert progress and progress == sorted(progress) and all(0 < f <= 1 for f in progress)
    assert [e.job["status"] for e in events if e.event == "status"][-2:] == ["running", "succeeded"]
    await eventually(counted(client, "event_streams", 0), "the stream to be uncounted")


async def test_sse_on_finished_job_sends_final_state_and_ends(start):
    """A stream opened after the job finished sends its final state at once and ends."""
    client, _ = await start()
    job = await submit(client, "fail", {"message": "nope"})
    await wait_status(client, job["id"], "failed")
    began = time.monotonic()
    _, reader = await open_events(client, job["id"])
    events = await reader.rest(timeout_s=5)
    assert time.monotonic() - began < 1.0
    assert [e.event for e in events] == ["status"]
    assert events[0].job["status"] == "failed" and events[0].job["error"]["message"] == "nope"


async def test_sse_status_event_on_cancel(start):
    """A stream on a blocked job ends with a `status` event as soon as the job is canceled."""
    client, _ = await start()
    job = await running_job(client, "block", {"seconds": 30})
    _, reader = await open_events(client, job["id"])
    first = await reader.event()
    assert first.job["status"] == "running"
    await cancel(client, job["id"])
    rest = await reader.rest(timeout_s=5)
    assert [(e.event, e.job["status"]) for e in rest] == [("status", "canceled")]


async def test_sse_last_event_id_resumes_without_repeats(start):
    """Reconnecting with Last-Event-ID continues after that version: no event is sent twice."""
    client, _ = await start()
    job = await submit(client, "sleep", {"seconds": 1.5, "steps": 6})
    resp, reader = await open_events(client, job["id"])
    before = [await reader.event()]
    while before[-1].event != "progress":
        before.append(await reader.event())
    resp.close()  # the connection drops mid-stream
    last_id = before[-1].id
    _, reader = await open_events(client, job["id"], headers={"Last-Event-ID": last_id})
    after = await reader.rest()
    assert after, "the resumed stream sent nothing"
    assert all(int(e.id) > int(last_id) for e in after), ([e.id for e in after], last_id)
    ids = [e.id for e in before + after]
    assert len(ids) == len(set(ids)), f"repeated events: {ids}"
    assert after[-1].job["status"] == "succeeded"
    check_event_sequence(before + after, resumed_at=len(before))

    _, reader = await open_events(client, job["id"], headers={"Last-Event-ID": after[-1].id})
    assert await reader.rest(timeout_s=5) == [], "a stream resumed after the terminal event repeated it"


async def test_sse_malformed_last_event_id_is_ignored(start):
    """A Last-Event-ID that is not a version is treated as absent: the current state comes first."""
    client, _ = await start()
    job = await submit(client, "echo", {"a": 1})
    await wait_status(client, job["id"], "succeeded")
    for value in ("garbage", "-5", "", "1.5", "9" * 50):
        _, reader = await open_events(client, job["id"], headers={"Last-Event-ID": value})
        events = await reader.rest(timeout_s=5)
        if value == "9" * 50:
            assert events == [] or events[0].job["status"] == "succeeded"
        else:
            assert [e.job["status"] for e in events] == ["succeeded"], value


async def test_sse_keepalive_comments_on_an_idle_stream(start):
    """An idle stream gets keep-alive comment lines every sse_keepalive_s."""
    client, _ = await start(settings={"sse_keepalive_s": 0.2})
    job = await running_job(client, "block", {"seconds": 30})
    _, reader = await open_events(client, job["id"])
    first = await reader.item()
    assert isinstance(first, SSEEvent)
    began = time.monotonic()
    comments = [await reader.item(timeout_s=3) for _ in range(3)]
    assert all(isinstance(c, SSEComment) for c in comments), comments
    assert time.monotonic() - began < 3.0
    await cancel(client, job["id"])
    rest = await reader.rest(timeout_s=5)
    assert rest[-1].job["status"] == "canceled"


async def test_sse_unknown_job_is_a_404_problem(start):
    """Events of a job that does not exist answer a 404 problem, not a stream."""
    client, _ = await start()
    resp = await client.get("/jobs/no-such-job/events")
    assert resp.status == 404
    assert resp.content_type == PROBLEM


async def test_sse_head_answers_the_stream_headers_without_events(start):
    """HEAD of a running job's events: the headers of the stream, no event after them, and the connection
    serves the next request (RFC 9110 9.3.2: a HEAD answer has no content)."""
    client, _ = await start()
    job = await running_job(client, "block", {"seconds": 30})
    host, port = client.server.host, client.server.port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        request = f"HEAD /jobs/{job['id']}/events HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head, head
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        nxt = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert nxt.startswith(b"HTTP/1.1 200"), nxt  # not an event where the next status line should be
    finally:
        writer.close()
    assert (await waiting(client))["event_streams"] == 0
    await cancel(client, job["id"])


async def test_sse_dropped_stream_frees_its_counter(start):
    """A client that closes an event stream is no longer counted as waiting, and its subscription goes."""
    client, app = await start()
    job = await running_job(client, "block", {"seconds": 30})
    baseline = app.hub.subscriptions
    resp, reader = await open_events(client, job["id"])
    await reader.event()
    assert (await waiting(client))["event_streams"] == 1
    resp.close()
    await eventually(counted(client, "event_streams", 0), "the dropped stream to be freed", timeout_s=3)
    assert app.hub.subscriptions == baseline
    await cancel(client, job["id"])


# -- WebSocket ------------------------------------------------------------------------------

async def test_ws_subscribe_pushes_status_changes_but_not_progress(start):
    """A subscribed socket gets a `job` frame on each status change and none for progress unless asked."""
    client, _ = await start(queue={"workers": 1})
    blocker = await running_job(client, "block", {"seconds": 30})
    job = await submit(client, "sleep", {"seconds": 0.6, "steps": 3})
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "subscribe", "jobs": [job["id"]]})
        assert await recv(ws) == {"type": "subscribed", "jobs": [job["id"]]}
        await cancel(client, blocker["id"])
        frames = await recv_until(ws, is_final(job["id"]))
    assert [f["type"] for f in frames] == ["job", "job"]
    assert [f["job"]["status"] for f in frames] == ["running", "succeeded"]
    assert frames[-1]["job"]["result"] == {"slept": 0.6}


async def test_ws_subscribe_to_a_running_job_pushes_no_progress_unless_asked(start):
    """Subscribed while it runs: its progress is no status change, so the next frame is its terminal state."""
    client, _ = await start()
    job = await running_job(client, "sleep", {"seconds": 1, "steps": 10})
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "subscribe", "jobs": [job["id"]]})
        assert await recv(ws) == {"type": "subscribed", "jobs": [job["id"]]}
        frames = await recv_until(ws, is_final(job["id"]))
    assert [(f["type"], f["job"]["status"]) for f in frames] == [("job", "succeeded")]


async def test_ws_subscribe_with_progress_pushes_progress_too(start):
    """`"progress": true` adds a frame per progress change, in version order."""
    client, _ = await start(queue={"workers": 1})
    blocker = await running_job(client, "block", {"seconds": 30})
    job = await submit(client, "sleep", {"seconds": 0.6, "steps": 3})
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "subscribe", "jobs": [job["id"]], "progress": True})
        assert await recv(ws) == {"type": "subscribed", "jobs": [job["id"]]}
        await cancel(client, blocker["id"])
        frames = await recv_until(ws, is_final(job["id"]))
    jobs = [f["job"] for f in frames]
    versions = [j["version"] for j in jobs]
    assert versions == sorted(set(versions))
    assert jobs[0]["status"] == "running" and jobs[-1]["status"] == "succeeded"
    progress = [j["progress"]["fraction"] for j in jobs if j["status"] == "running" and j["progress"]]
    assert len(progress) >= 2, jobs
    assert jobs[-1]["progress"] == {"fraction": 1.0, "message": "step 3 of 3"}


async def test_ws_subscribe_after_completion_delivers_final_state(start):
    """Subscribing to a job that already finished sends its final state at once."""
    client, _ = await start()
    job = await submit(client, "echo", {"k": "v"})
    await wait_status(client, job["id"], "succeeded")
    async with client.ws_connect("/ws") as ws:
        began = time.monotonic()
        await ws.send_json({"op": "subscribe", "jobs": [job["id"]]})
        assert await recv(ws) == {"type": "subscribed", "jobs": [job["id"]]}
        frame = await recv(ws, timeout_s=5)
        assert time.monotonic() - began < 1.0
        # Every subscribe to it does, on the same socket too: a client that subscribes again gets no silence.
        await ws.send_json({"op": "subscribe", "jobs": [job["id"]]})
        assert await recv(ws) == {"type": "subscribed", "jobs": [job["id"]]}
        again = await recv(ws, timeout_s=5)
    assert frame["type"] == "job" and frame["job"]["status"] == "succeeded"
    assert frame["job"]["result"] == {"k": "v"}
    assert again == frame


async def test_ws_unknown_ids_get_404_errors_and_known_ones_subscribe(start):
    """Unknown ids get a 404 error frame each; the known ones are subscribed in the same frame."""
    client, _ = await start()
    done = await submit(client, "noop")
    await wait_status(client, done["id"], "succeeded")
    live = await running_job(client, "block", {"seconds": 30})
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "subscribe", "jobs": [live["id"], "no-such-job", done["id"]]})
        frames = [await recv(ws) for _ in range(3)]
        assert frames[0] == {"type": "subscribed", "jobs": [live["id"], done["id"]]}
        errors = [f for f in frames if f["type"] == "error"]
        assert len(errors) == 1 and errors[0]["status"] == 404 and errors[0]["id"] == "no-such-job"
        assert any(f["type"] == "job" and f["job"]["id"] == done["id"] for f in frames)
        await cancel(client, live["id"])
        await recv_until(ws, is_final(live["id"], "canceled"))


async def test_ws_thousands_of_unknown_ids_get_errors_and_leak_nothing(start):
    """2000 unknown ids in one frame get 2000 404 frames; no subscription is left behind and the socket goes on."""
    client, app = await start()
    done = await submit(client, "noop")
    await wait_status(client, done["id"], "succeeded")
    baseline = app.hub.subscriptions
    ids = [f"unknown-{i}" for i in range(2000)]
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "subscribe", "jobs": ids})
        assert await recv(ws, timeout_s=30) == {"type": "subscribed", "jobs": []}
        errors = [await recv(ws) for _ in range(2000)]
        assert {e["type"] for e in errors} == {"error"} and {e["status"] for e in errors} == {404}
        assert sorted(e["id"] for e in errors) == sorted(ids)
        assert app.hub.subscriptions == baseline
        await ws.send_json({"op": "subscribe", "jobs": [done["id"]]})
        assert await recv(ws) == {"type": "subscribed", "jobs": [done["id"]]}
        assert (await recv(ws))["job"]["status"] == "succeeded"
    await eventually(counted(client, "websockets", 0), "the socket to be uncounted")
    assert app.hub.subscriptions == baseline


BAD_FRAMES = [
    "not json", "{", "", "[]", "null", "42", '"subscribe"',
    '{"op": "explode", "jobs": []}', '{"jobs": ["x"]}', '{"op": "subscribe"}', '{"op": "subscribe", "jobs": 5}',
    '{"op": "subscribe", "jobs": "all"}', '{"op": "subscribe", "jobs": [1, 2]}', '{"op": "subscribe", "jobs": [""]}',
    '{"op": "subscribe", "jobs": {"a": 1}}', '{"op": "subscribe", "jobs": ["x"], "progress": "yes"}',
    '{"op": null, "jobs": null}', "[" * 5000, '{"op": "subscribe", "jobs": ["' + "x" * 300 + '"]}',
    '{"op": "subscribe", "jobs": [12345678901234567890123456789]}',
    json.dumps({"op": "subscribe", "jobs": [f"id-{i}" for i in range(10_001)]}),
]


async def test_ws_bad_frames_get_400_and_the_socket_stays_open(start):
    """Non-JSON, binary, unknown op and bad jobs frames each get a 400 error frame; the socket goes on working."""
    client, _ = await start()
    job = await submit(client, "noop")
    await wait_status(client, job["id"], "succeeded")
    async with client.ws_connect("/ws") as ws:
        for frame in BAD_FRAMES:
            await ws.send_str(frame)
            answer = await recv(ws)
            assert answer["type"] == "error" and answer["status"] == 400, (frame[:60], answer)
            assert isinstance(answer.get("detail"), str)
        for data in (b"\x00\x01\x02", b'{"op": "subscribe", "jobs": "*"}'):
            await ws.send_bytes(data)
            answer = await recv(ws)
            assert answer["type"] == "error" and answer["status"] == 400, answer
        assert not ws.closed
        assert (await waiting(client))["websockets"] == 1
        await ws.send_json({"op": "subscribe", "jobs": [job["id"]]})
        assert await recv(ws) == {"type": "subscribed", "jobs": [job["id"]]}
        assert (await recv(ws))["job"]["status"] == "succeeded"


async def test_ws_star_subscription_sees_every_job(start):
    """`"jobs": "*"` pushes the status changes of every job, including ones submitted later."""
    client, _ = await start()
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "subscribe", "jobs": "*"})
        assert await recv(ws) == {"type": "subscribed", "jobs": "*"}
        first = await submit(client, "echo", {"n": 1})
        second = await submit(client, "sleep", {"seconds": 0.3, "steps": 3})
        frames = await recv_until(ws, is_final(first["id"]))
        frames += await recv_until(ws, is_final(second["id"]))
    by_job: dict[str, list[dict]] = {}
    for frame in frames:
        assert frame["type"] == "job"
        by_job.setdefault(frame["job"]["id"], []).append(frame["job"])
    for job_id in (first["id"], second["id"]):
        states = by_job[job_id]
        assert [s["version"] for s in states] == sorted({s["version"] for s in states})
        statuses = [s["status"] for s in states]
        assert statuses[-1] == "succeeded"
        assert all(a != b for a, b in zip(statuses, statuses[1:])), f"a progress frame was pushed: {statuses}"


async def test_ws_star_sends_no_progress_of_a_job_running_since_before_it_nor_after_an_unsubscribe_by_id(start):
    """Without "progress", "*" pushes status changes only: a job already running when "*" was subscribed
    reports progress (no frame), then succeeds (a frame); a job watched by id as well, unsubscribed by id while
    "*" stays, sends no progress either."""
    client, _ = await start()
    early = await submit(client, "sleep", {"seconds": 1.2, "steps": 6})
    await wait_status(client, early["id"], "running")
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "subscribe", "jobs": "*"})
        assert await recv(ws) == {"type": "subscribed", "jobs": "*"}
        late = await submit(client, "sleep", {"seconds": 1.2, "steps": 6})
        await recv_until(ws, lambda f: f.get("job", {}).get("id") == late["id"] and f["job"]["status"] == "running")
        await ws.send_json({"op": "subscribe", "jobs": [late["id"]]})
        await recv_until(ws, lambda f: f.get("type") == "subscribed")
        await ws.send_json({"op": "unsubscribe", "jobs": [late["id"]]})
        await recv_until(ws, lambda f: f.get("type") == "unsubscribed")
        frames = await recv_until(ws, is_final(early["id"]))
        frames += await recv_until(ws, is_final(late["id"]))
    for job in (early, late):
        seen = [f["job"]["status"] for f in frames if f.get("job", {}).get("id") == job["id"]]
        assert seen == ["succeeded"], (job["id"], seen)


async def test_ws_unsubscribe_stops_pushes(start):
    """After an unsubscribe, changes of that job are no longer pushed and its subscription is gone."""
    client, app = await start()
    job = await running_job(client, "block", {"seconds": 30})
    marker = await submit(client, "noop")
    await wait_status(client, marker["id"], "succeeded")
    baseline = app.hub.subscriptions
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "subscribe", "jobs": [job["id"]], "progress": True})
        assert (await recv(ws))["type"] == "subscribed"
        assert app.hub.subscriptions == baseline + 1
        await ws.send_json({"op": "unsubscribe", "jobs": [job["id"]]})
        answer = await recv(ws)
        assert answer["type"] == "unsubscribed" and answer["jobs"] == [job["id"]]
        assert app.hub.subscriptions == baseline
        await cancel(client, job["id"])
        await ws.send_json({"op": "subscribe", "jobs": [marker["id"]]})
        frames = await recv_until(ws, is_final(marker["id"]))
        assert all(f.get("job", {}).get("id") != job["id"] for f in frames), frames
        stray = await no_frame_within(ws, 0.3)
        assert stray == [], stray


async def test_ws_counter_follows_open_sockets(start):
    """GET /healthz counts open WebSockets, and a closed one stops being counted."""
    client, app = await start()
    async with client.ws_connect("/ws") as first, client.ws_connect("/ws") as second:
        await first.send_json({"op": "subscribe", "jobs": "*"})
        await second.send_json({"op": "subscribe", "jobs": "*"})
        assert (await recv(first))["type"] == (await recv(second))["type"] == "subscribed"
        assert (await waiting(client))["websockets"] == 2
        assert app.hub.subscriptions == 2
    await eventually(counted(client, "websockets", 0), "closed sockets to be uncounted", timeout_s=3)
    assert app.hub.subscriptions == 0


async def test_ws_heartbeat_pings(start):
    """The server pings an open socket every ws_heartbeat_s."""
    client, _ = await start(settings={"ws_heartbeat_s": 0.3})
    async with client.ws_connect("/ws", autoping=False) as ws:
        for _ in range(2):
            msg = await ws.receive(timeout=5)
            assert msg.type is WSMsgType.PING, msg
            await ws.pong(msg.data)
        assert (await waiting(client))["websockets"] == 1


async def test_ws_unresponsive_peer_is_closed_by_heartbeat(start):
    """A peer that never answers the heartbeat's pings is disconnected and uncounted."""
    client, app = await start(settings={"ws_heartbeat_s": 0.5})
    async with client.ws_connect("/ws", autoping=False) as ws:
        await ws.send_json({"op": "subscribe", "jobs": "*"})
        msg = await ws.receive(timeout=5)
        while msg.type is WSMsgType.PING:  # seen, deliberately not answered
            msg = await ws.receive(timeout=5)
        assert msg.type is WSMsgType.TEXT and json.loads(msg.data)["type"] == "subscribed", msg
        await eventually(counted(client, "websockets", 0), "the silent peer to be dropped", timeout_s=5)
        assert app.hub.subscriptions == 0


async def test_ws_slow_consumer_is_closed_not_buffered(start):
    """A socket that does not read while many progress events are published is closed with 1008, not buffered."""
    client, app = await start(settings={"ws_buffer": 5})
    job = await running_job(client, "block", {"seconds": 30})
    baseline = app.hub.subscriptions
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "subscribe", "jobs": [job["id"]], "progress": True})
        assert (await recv(ws))["type"] == "subscribed"
        execution = app.workers.running[job["id"]]
        for i in range(1, 201):  # what `await ctx.progress(...)` does, faster than any socket drains
            app.workers.progress(execution, i / 200, f"report {i}")
        await eventually(counted(client, "websockets", 0), "the slow socket to be closed", timeout_s=5)
        assert app.hub.subscriptions == baseline
        received = []
        while (msg := await ws.receive(timeout=5)).type is WSMsgType.TEXT:
            received.append(json.loads(msg.data))
        assert msg.type is WSMsgType.CLOSE and msg.data == WSCloseCode.POLICY_VIOLATION, msg
        assert len(received) <= 5, f"{len(received)} frames buffered for a socket limited to 5"
    await cancel(client, job["id"])


async def test_ws_consumer_that_stops_reading_is_closed(start):
    """A socket that stops reading while progress keeps coming is closed once its buffer overflows, not left open."""
    client, app = await start(settings={"ws_buffer": 5})
    # Reports are shown at most a bounded number of versions ahead of the store: stored as fast as the store
    # takes them here, they are shown as fast as they come.
    app.workers.persist_interval_s = 0
    job = await running_job(client, "block", {"seconds": 30})
    baseline = app.hub.subscriptions
    async with client.ws_connect("/ws") as ws:
        await ws.send_json({"op": "subscribe", "jobs": [job["id"]], "progress": True})
        assert (await recv(ws))["type"] == "subscribed"
        execution = app.workers.running[job["id"]]
        deadline = time.monotonic() + 20
        for i in range(1, 200001):  # up to 200 MB of frames: far more than the socket buffers hold
            app.workers.progress(execution, i / 200000, f"report {i} " + "x" * 900)
            await asyncio.sleep(0)  # the loop turns between reports, as in a real handler
            if i % 2000 == 0 and ((await waiting(client))["websockets"] == 0 or time.monotonic() > deadline):
                break
        await eventually(counted(client, "websockets", 0), "the socket that stopped reading to be closed",
                         timeout_s=5)
        assert app.hub.subscriptions == baseline
    await cancel(client, job["id"])


# -- every channel at once -----------------------------------------------------------------------

async def test_every_channel_receives_one_completion_within_a_second(start):
    """Submit-with-wait, a long poll, an event stream and a WebSocket on one job all get its completion within 1 s."""
    client, app = await start()
    held = asyncio.create_task(client.post("/jobs", json={"task": "sleep", "params": {"seconds": 2.0, "steps": 4}},
                                           headers={"Prefer": "wait=20"}))
    job_id = (await eventually(lambda: list(app.workers.running), "the job to run"))[0]

    async def long_poll() -> tuple[dict, float]:
        resp = await client.get(f"/jobs/{job_id}", params={"wait": "20", "redirect": "false"})
        return await resp.json(), time.time()

    async def stream() -> tuple[dict, float]:
        _, reader = await open_events(client, job_id)
        events = await reader.rest()
        return events[-1].job, time.time()

    async def socket() -> tuple[dict, float]:
        async with client.ws_connect("/ws") as ws:
            await ws.send_json({"op": "subscribe", "jobs": [job_id]})
            frames = await recv_until(ws, is_final(job_id))
            return frames[-1]["job"], time.time()

    async def submitted() -> tuple[dict, float]:
        resp = await held
        assert resp.status == 201
        return await resp.json(), time.time()

    waiters = [asyncio.create_task(c()) for c in (long_poll, stream, socket)]
    await eventually(lambda: _all_waiting(client), "every channel to be waiting")
    answers = await asyncio.gather(submitted(), *waiters)
    for body, arrived in answers:
        assert body["id"] == job_id and body["status"] == "succeeded" and body["result"] == {"slept": 2.0}
        assert arrived - ts(body["finished_at"]) < 1.0
    assert len({body["version"] for body, _ in answers}) == 1
    await eventually(lambda: _none_waiting(client), "every waiter to be freed")


async def _all_waiting(client) -> bool:
    return await waiting(client) == {"long_polls": 2, "event_streams": 1, "websockets": 1}


async def _none_waiting(client) -> bool:
    return await waiting(client) == {"long_polls": 0, "event_streams": 0, "websockets": 0}


# -- a real server process ----------------------------------------------------------------------

async def test_serve_long_poll_and_websocket_both_receive_completion(server_factory):
    """On `asyncjobs serve`, a long poll and a WebSocket subscriber both get a job's completion within 1 s."""
    server = server_factory()
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as http:
        async with http.post(f"{server.url}/jobs", json={"task": "sleep", "params": {"seconds": 1.5, "steps": 3}}) as resp:
            assert resp.status == 202, await resp.text()
            job = await resp.json()

        async def long_poll() -> tuple[dict, float]:
            async with http.get(f"{server.url}/jobs/{job['id']}", params={"wait": "20"},
                                allow_redirects=False) as resp:
                assert resp.status == 303, await resp.text()
                return await resp.json(), time.time()

        async def socket() -> tuple[dict, float]:
            async with http.ws_connect(f"{server.url}/ws") as ws:
                await ws.send_json({"op": "subscribe", "jobs": [job["id"]]})
                assert await recv(ws) == {"type": "subscribed", "jobs": [job["id"]]}
                frames = await recv_until(ws, is_final(job["id"]))
                return frames[-1]["job"], time.time()

        answers = await asyncio.gather(long_poll(), socket())
        for body, arrived in answers:
            assert body["status"] == "succeeded" and body["result"] == {"slept": 1.5}
            assert arrived - ts(body["finished_at"]) < 1.0
        async with http.get(f"{server.url}/healthz") as resp:
            assert (await resp.json())["waiting"]["long_polls"] == 0
