"""The client's files (`Client.submit(files=...)`, `Client.download`): pure rules, real uploads and downloads."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from asyncjobs import codec
from asyncjobs.client import (
    BadRequest,
    Download,
    IdempotencyConflict,
    JobFailed,
    NotFound,
    ProtocolError,
    ResultNotReady,
    SyncClient,
    rules,
)
from asyncjobs.client.rules import Answer
from tests.conftest import Server

MIB = 1024 * 1024


# -- helpers -----------------------------------------------------------------------------



def expected_bytes(size: int, seed: str = "") -> bytes:
    """What the built-in `bytes` task returns: block i is sha256(f"{seed}:{i}"), concatenated and cut."""
    blocks = (hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(size // 32 + 1))
    return b"".join(blocks)[:size]


def make_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


class Reports:
    """A progress callback that keeps every (done, total) it is given."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.seen: list[tuple[int, int | None]] = []
        self.stop_after = stop_after

    def __call__(self, done: int, total: int | None) -> None:
        self.seen.append((done, total))
        if self.stop_after is not None and done >= self.stop_after:
            raise Stop(done)


class Stop(Exception):
    """Raised by a progress callback to interrupt a transfer, as a Ctrl-C would."""


HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "date", "server", "keep-alive"}


@dataclass
class Seen:
    method: str
    path: str
    headers: CIMultiDict
    status: int = 0


@dataclass
class Proxy:
    """An HTTP front for a real server that records each request and its answer's status. It can lose
    the first submit's answer, cut the first result download off half way, or change a byte of each."""

    upstream: str
    session: aiohttp.ClientSession
    drop_first_submit: bool = False
    cut_first_download: bool = False
    corrupt_downloads: bool = False
    seen: list[Seen] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * MIB)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        return app

    def downloads(self) -> list[Seen]:
        return [s for s in self.seen if s.method == "GET" and s.path.endswith("/result")]

    async def forward(self, request: web.Request) -> web.StreamResponse:
        seen = Seen(request.method, request.path_qs, CIMultiDict(request.headers))
        self.seen.append(seen)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS | {"host"}}
        sent = await request.read()
        async with self.session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                        data=io.BytesIO(sent) if sent else None, allow_redirects=False,
                                        auto_decompress=False) as upstream:
            body = await upstream.read()
            answer = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
            seen.status = upstream.status
        if self.drop_first_submit and request.method == "POST" and request.path == "/jobs":
            self.drop_first_submit = False
            assert request.transport is not None
            request.transport.abort()  # the job exists upstream; its answer is lost on the way back
            raise ConnectionResetError("answer dropped on purpose")
        is_download = request.method == "GET" and request.path.endswith("/result") and upstream.status in (200, 206)
        if is_download and self.cut_first_download:
            self.cut_first_download = False
            return await self._cut(request, upstream.status, answer, body)
        if is_download and self.corrupt_downloads:
            body = body[:-1] + bytes([body[-1] ^ 1])
        return web.Response(status=upstream.status, body=body, headers=answer)

    async def _cut(self, request: web.Request, status: int, headers: dict[str, str], body: bytes) -> web.Response:
        """Send the head and half the body, then close the connection (as a dropped network would)."""
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[:len(body) // 2])
        await asyncio.sleep(0.2)  # let the half reach the client before the connection goes
        assert request.transport is not None
        request.transport.close()
        raise ConnectionResetError("download cut on purpose")


@pytest.fixture
async def proxy(aiohttp_server):
    """Start a ``Proxy`` in front of a server; returns (proxy, its base URL)."""
    async with aiohttp.ClientSession() as session:

        async def make(upstream: str, **options: Any) -> tuple[Proxy, str]:
            front = Proxy(upstream.rstrip("/"), session, **options)
            server = await aiohttp_server(front.app())
            return front, str(server.make_url("/"))

        yield make


async def jobs_on_server(server: Server) -> list[dict]:
    resp = await server.http.get("/jobs", params={"limit": "500"})
    return (await resp.json())["jobs"]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".part", ".part.json")))


# -- pure rules ------------------------------------------------------------------------------

def answer(status: int, **headers: str) -> Answer:
    names = {k.replace("_", "-").lower(): v for k, v in headers.items()}
    return Answer("GET", "http://svc.test/jobs/j1/result", status, names, names.get("content-type", ""), b"")


def test_multipart_framing_and_content_types():
    """Parts open with the delimiter and their headers; names are escaped as browsers do; types are guessed."""
    head = rules.form_part_head("B", "video", "video/mp4", filename='a"b\r\n€.mp4')
    assert head == ('--B\r\nContent-Disposition: form-data; name="video"; filename="a%22b%0D%0A€.mp4"\r\n'
                    'Content-Type: video/mp4\r\n\r\n').encode()
    assert b'filename="100%2541 a%5Cb.txt"' in rules.form_part_head("B", "f", "text/plain", filename="100%41 a\\b.txt")
    assert rules.form_part_head("B", "job", "application/json").startswith(b'--B\r\nContent-Disposition: form-data; '
                                                                           b'name="job"\r\n')
    assert rules.form_end("B") == b"--B--\r\n" and rules.PART_END == b"\r\n"
    assert rules.guess_content_type("clip.mp4") == "video/mp4"
    assert rules.guess_content_type("notes.txt") == "text/plain"
    assert rules.guess_content_type("blob.nosuchtype") == "application/octet-stream"


def test_download_headers_are_read():
    """Content-Range, Repr-Digest (among other algorithms), Content-Disposition (filename* first), validators."""
    assert rules.content_range("bytes 10-99/100") == (10, 99, 100)
    assert rules.content_range("bytes 0-4/*") == (0, 4, None)
    assert rules.content_range("bytes */100") is None and rules.content_range(None) is None
    digest = hashlib.sha256(b"x").digest()
    encoded = base64.b64encode(digest).decode()
    assert rules.repr_digest_sha256(f"sha-512=:AAAA:, sha-256=:{encoded}:") == digest
    assert rules.repr_digest_sha256("sha-256=:AAAA:") is None and rules.repr_digest_sha256(None) is None
    both = "attachment; filename=\"a b.txt\"; filename*=UTF-8''%E2%82%AC%20x.txt"
    assert rules.disposition_filename(both) == "€ x.txt"
    assert rules.disposition_filename('attachment; filename="q\\"uote.bin"') == 'q"uote.bin'
    assert rules.disposition_filename("attachment; filename=plain.bin") == "plain.bin"
    assert rules.disposition_filename("attachment") is None and rules.disposition_filename(None) is None
    assert rules.is_strong_etag('"abc"') and not rules.is_strong_etag('W/"abc"') and not rules.is_strong_etag(None)
    assert rules.range_headers(10, '"e"') == {"Range": "bytes=10-", "If-Range": '"e"'}
    assert rules.range_headers(0, '"e"') == {} and rules.range_headers(10, None) == {}


@pytest.mark.parametrize("name, safe", [
    ("out.webm", "out.webm"), ("../../etc/passwd", "passwd"), ("C:\\x\\y.z", "y.z"), ("..", None),
    (".bashrc", "bashrc"), ("a\x07b\x1b.txt", "ab.txt"), ("", None), (None, None), ("/", None),
])
def test_a_server_given_name_is_made_safe(name, safe):
    """Only the last path segment, without control characters or a leading dot, may name a file here."""
    assert rules.safe_filename(name) == safe


def test_the_head_of_a_download_is_read():
    """200 is the whole file from 0; 206 must be the range asked for, to the end; anything else is refused."""
    digest = hashlib.sha256(b"x").digest()
    whole = rules.read_download(answer(200, Content_Length="100", ETag='"e"', Content_Type="application/gzip",
                                       Repr_Digest=f"sha-256=:{base64.b64encode(digest).decode()}:",
                                       Content_Disposition='attachment; filename="a.gz"'), asked_from=0)
    assert (whole.offset, whole.total, whole.etag, whole.sha256, whole.name) == (0, 100, '"e"', digest, "a.gz")
    assert whole.content_type == "application/gzip"
    rest = rules.read_download(answer(206, Content_Range="bytes 40-99/100"), asked_from=40)
    assert (rest.offset, rest.total) == (40, 100)
    for wrong in ("bytes 0-99/100", "bytes 40-59/100", "junk"):
        with pytest.raises(ProtocolError):
            rules.read_download(answer(206, Content_Range=wrong), asked_from=40)
    with pytest.raises(ProtocolError):
        rules.read_download(answer(204), asked_from=0)


def test_a_file_job_is_read_with_its_files():
    """The job's `files` is kept; `result_file` is the file result's description, or None."""
    result = {"name": "a.gz", "size": 3, "content_type": "application/gzip", "sha256": "ab"}
    state = rules.parse_job({"id": "j", "status": "succeeded", "files": {"inputs": {}, "result": result}},
                            base="http://h/")
    assert state.files == {"inputs": {}, "result": result} and state.result_file == result
    plain = rules.parse_job({"id": "j", "status": "succeeded", "files": None}, base="http://h/")
    assert plain.files is None and plain.result_file is None


# -- uploads against a real server -----------------------------------------------------------------

async def test_submit_with_a_file_streams_it_and_reports_progress(start, connect, tmp_path):
    """A file param is sent as multipart; progress grows chunk by chunk to the total; `digest` sees the same bytes."""
    server = await start()
    client = connect(server.url)
    data = make_file(tmp_path / "clip.txt", 3 * MIB + 123)
    reports = Reports()
    job = await client.submit("digest", {}, files={"file": tmp_path / "clip.txt"}, progress=reports)
    sha256 = hashlib.sha256(data).hexdigest()
    assert job.files["inputs"]["file"] == {"name": "clip.txt", "size": len(data), "content_type": "text/plain",
                                           "sha256": sha256}
    done = [d for d, _ in reports.seen]
    assert reports.seen[0] == (0, len(data)) and reports.seen[-1] == (len(data), len(data))
    assert done == sorted(done) and len(set(done)) >= 4 and {t for _, t in reports.seen} == {len(data)}
    final = await client.wait(job, timeout=20)
    assert final.status == "succeeded" and final.result == {"sha256": sha256, "size": len(data)}


@pytest.mark.parametrize("name, stored", [("100%41 done.txt", "100%41 done.txt"), ("dir\\a.txt", "a.txt")])
async def test_a_file_name_with_percent_or_backslash_arrives_as_it_is(start, connect, tmp_path, name, stored):
    """A `%` in a file's name is not decoded away on the server; a `\\` is a path separator there as a `/`."""
    server = await start()
    (tmp_path / name).write_bytes(b"hello")
    job = await connect(server.url).submit("digest", files={"file": tmp_path / name})
    assert job.files["inputs"]["file"]["name"] == stored


async def test_a_content_type_can_be_given_and_json_params_go_beside_files(start, connect, tmp_path):
    """A (path, content type) pair overrides the guess; the other params travel in the `job` part."""
    server = await start()
    client = connect(server.url)
    data = make_file(tmp_path / "words.bin", 100_000)
    job = await client.submit("gzip", {"level": 9}, files={"file": (str(tmp_path / "words.bin"), "text/x-words")},
                              priority=3)
    assert job.files["inputs"]["file"]["content_type"] == "text/x-words" and job.priority == 3
    final = await client.wait(job, timeout=20)
    assert final.status == "succeeded" and final.result is None
    assert final.result_file["name"] == "words.bin.gz"
    saved = await client.download(final, tmp_path / "words.gz")
    assert gzip.decompress((tmp_path / "words.gz").read_bytes()) == data
    assert saved.content_type == "application/gzip" and saved.name == "words.bin.gz"


async def test_a_missing_file_fails_before_anything_is_sent(start, connect, tmp_path):
    """A wrong path raises its OSError at once, and no job is made."""
    server = await start()
    client = connect(server.url)
    with pytest.raises(FileNotFoundError):
        await client.submit("digest", {}, files={"file": tmp_path / "nope.bin"})
    with pytest.raises(IsADirectoryError):
        await client.submit("digest", {}, files={"file": tmp_path})
    assert await jobs_on_server(server) == []


async def test_a_lost_answer_resends_the_file_with_the_same_key(start, proxy, connect, tmp_path):
    """The first submit's answer is lost: the retry streams the file again from its start under the same
    Idempotency-Key, the server replays the job, and there is one job."""
    server = await start()
    front, url = await proxy(server.url, drop_first_submit=True)
    client = connect(url)
    data = make_file(tmp_path / "x.bin", MIB + 7)
    reports = Reports()
    job = await client.submit("digest", {}, files={"file": tmp_path / "x.bin"}, progress=reports)
    submits = [s for s in front.seen if s.method == "POST"]
    assert len(submits) == 2 and submits[0].headers["Idempotency-Key"] == submits[1].headers["Idempotency-Key"]
    assert submits[0].headers["Content-Type"].startswith("multipart/form-data; boundary=")
    assert int(submits[0].headers["Content-Length"]) > len(data)
    assert [r for r in reports.seen if r[0] == 0] == [(0, len(data))] * 2  # sent twice, from the start each time
    assert [j["id"] for j in await jobs_on_server(server)] == [job.id]
    assert (await client.wait(job, timeout=20)).result["sha256"] == hashlib.sha256(data).hexdigest()


async def test_the_same_key_with_another_file_is_a_conflict(start, connect, tmp_path):
    """The file's digest is part of the request: a replayed key with other bytes is IdempotencyConflict."""
    server = await start()
    client = connect(server.url)
    make_file(tmp_path / "a.bin", 1000)
    make_file(tmp_path / "b.bin", 1000)
    first = await client.submit("digest", {}, files={"file": tmp_path / "a.bin"}, idempotency_key="k-1")
    again = await client.submit("digest", {}, files={"file": tmp_path / "a.bin"}, idempotency_key="k-1")
    assert again.id == first.id
    with pytest.raises(IdempotencyConflict):
        await client.submit("digest", {}, files={"file": tmp_path / "b.bin"}, idempotency_key="k-1")


# -- downloads against a real server ---------------------------------------------------------------

async def test_download_of_a_file_result_is_byte_exact(start, connect, tmp_path):
    """`bytes` gives a file result; the download is exact, checked, named, and leaves nothing behind."""
    server = await start()
    client = connect(server.url)
    size = 3 * MIB + 5
    final = await client.wait(await client.submit("bytes", {"size": size, "seed": "s"}), timeout=20)
    assert final.result is None and final.result_file["size"] == size
    reports = Reports()
    saved = await client.download(final, tmp_path / "out.bin", progress=reports)
    expected = expected_bytes(size, "s")
    assert (tmp_path / "out.bin").read_bytes() == expected
    assert saved == Download(path=tmp_path / "out.bin", size=size, sha256=hashlib.sha256(expected).hexdigest(),
                             content_type="application/octet-stream", name=f"bytes-{size}.bin", resumed_from=0)
    assert saved.sha256 == final.result_file["sha256"]
    assert reports.seen[0] == (0, size) and reports.seen[-1] == (size, size)
    assert leftovers(tmp_path) == []
    by_id = await client.download(final.id, str(tmp_path / "again.bin"))
    assert by_id.path == tmp_path / "again.bin" and by_id.sha256 == saved.sha256


async def test_an_interrupted_download_resumes_with_a_range(start, proxy, connect, tmp_path):
    """A download stopped half way keeps `.part`; the next download to the same path asks only for the
    rest (Range + If-Range with the ETag), gets 206, and ends with the exact file."""
    server = await start()
    front, url = await proxy(server.url)
    client = connect(url)
    size = 4 * MIB
    final = await client.wait(await client.submit("bytes", {"size": size, "seed": "r"}), timeout=20)
    with pytest.raises(Stop):
        await client.download(final, tmp_path / "out.bin", progress=Reports(stop_after=MIB))
    assert not (tmp_path / "out.bin").exists() and leftovers(tmp_path) == ["out.bin.part", "out.bin.part.json"]
    kept = (tmp_path / "out.bin.part").stat().st_size
    assert 0 < kept < size
    reports = Reports()
    saved = await client.download(final, tmp_path / "out.bin", progress=reports)
    assert (tmp_path / "out.bin").read_bytes() == expected_bytes(size, "r") and leftovers(tmp_path) == []
    assert saved.resumed_from == kept and reports.seen[0] == (kept, size) and reports.seen[-1] == (size, size)
    first, second = front.downloads()
    assert "Range" not in first.headers and first.status == 200
    assert second.headers["Range"] == f"bytes={kept}-" and second.status == 206
    assert second.headers["If-Range"] == (await server.http.head(f"/jobs/{final.id}/result")).headers["ETag"]


async def test_a_stale_validator_restarts_from_zero(start, proxy, connect, tmp_path):
    """What `.part` holds belongs to another result: If-Range does not match, the server sends the whole
    file (200), and the download starts over instead of appending."""
    server = await start()
    front, url = await proxy(server.url)
    client = connect(url)
    size = 2 * MIB
    old = await client.wait(await client.submit("bytes", {"size": size, "seed": "old"}), timeout=20)
    new = await client.wait(await client.submit("bytes", {"size": size, "seed": "new"}), timeout=20)
    with pytest.raises(Stop):
        await client.download(old, tmp_path / "out.bin", progress=Reports(stop_after=MIB // 2))
    reports = Reports()
    saved = await client.download(new, tmp_path / "out.bin", progress=reports)
    assert (tmp_path / "out.bin").read_bytes() == expected_bytes(size, "new") and leftovers(tmp_path) == []
    assert saved.resumed_from == 0 and reports.seen[0] == (0, size)
    last = front.downloads()[-1]
    assert last.headers["Range"].startswith("bytes=") and last.status == 200


async def test_a_part_that_is_already_whole_is_fetched_again(start, proxy, connect, tmp_path):
    """Stopped after the last byte but before the rename: the range asked for is past the end (416), so
    the download drops the part and fetches the whole file once more."""
    server = await start()
    front, url = await proxy(server.url)
    client = connect(url)
    final = await client.wait(await client.submit("bytes", {"size": 50_000}), timeout=20)
    with pytest.raises(Stop):
        await client.download(final, tmp_path / "out.bin", progress=Reports(stop_after=50_000))
    assert (tmp_path / "out.bin.part").stat().st_size == 50_000
    saved = await client.download(final, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == expected_bytes(50_000) and leftovers(tmp_path) == []
    assert saved.resumed_from == 0 and [s.status for s in front.downloads()] == [200, 416, 200]


async def test_a_dropped_connection_is_resumed_within_the_same_call(start, proxy, connect, tmp_path):
    """The connection drops half way through: the download tries again from what it has, and completes."""
    server = await start()
    front, url = await proxy(server.url, cut_first_download=True)
    client = connect(url)
    size = 2 * MIB + 1
    final = await client.wait(await client.submit("bytes", {"size": size}), timeout=20)
    saved = await client.download(final, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == expected_bytes(size) and leftovers(tmp_path) == []
    _, second = front.downloads()
    assert saved.resumed_from > 0 and second.headers["Range"] == f"bytes={saved.resumed_from}-"
    assert second.status == 206
    front.cut_first_download = True
    stream = io.BytesIO()
    streamed = await client.download(final, stream)  # a stream resumes too, from what it was given
    assert stream.getvalue() == expected_bytes(size) and streamed.resumed_from > 0 and streamed.path is None


async def test_bytes_that_do_not_match_the_digest_are_refused(start, proxy, connect, tmp_path):
    """A byte changed on the way: the Repr-Digest check fails, ProtocolError, and no file is left."""
    server = await start()
    _, url = await proxy(server.url, corrupt_downloads=True)
    client = connect(url)
    final = await client.wait(await client.submit("bytes", {"size": 10_000}), timeout=20)
    folder = tmp_path / "downloads"
    folder.mkdir()
    with pytest.raises(ProtocolError) as caught:
        await client.download(final, folder / "out.bin")
    assert "Repr-Digest" in str(caught.value)
    assert list(folder.iterdir()) == []


async def test_download_errors_are_the_result_errors(start, connect, tmp_path):
    """Not ready is ResultNotReady, failed is JobFailed, unknown is NotFound; nothing is written."""
    server = await start()
    client = connect(server.url)
    folder = tmp_path / "downloads"
    folder.mkdir()
    running = await client.submit("block")
    with pytest.raises(ResultNotReady):
        await client.download(running, folder / "out.bin")
    await client.cancel(running)
    failed = await client.wait(await client.submit("fail", {"message": "boom"}), timeout=20)
    with pytest.raises(JobFailed) as caught:
        await client.download(failed, folder / "out.bin")
    assert caught.value.error["message"] == "boom"
    with pytest.raises(NotFound):
        await client.download("no-such-job", folder / "out.bin")
    assert list(folder.iterdir()) == []


async def test_download_into_a_stream_and_of_a_json_result(start, connect):
    """A binary stream takes the bytes as they come (no path); a JSON result downloads as its JSON."""
    server = await start()
    client = connect(server.url)
    final = await client.wait(await client.submit("bytes", {"size": 100_003, "seed": "x"}), timeout=20)
    sink = io.BytesIO()
    saved = await client.download(final, sink)
    assert sink.getvalue() == expected_bytes(100_003, "x") and saved.path is None and saved.size == 100_003
    echoed = await client.wait(await client.submit("echo", {"a": 1}), timeout=20)
    sink = io.BytesIO()
    saved = await client.download(echoed, sink)
    assert codec.loads(sink.getvalue()) == {"a": 1} and saved.content_type.startswith("application/json")


def test_sync_client_uploads_and_downloads(server_factory, tmp_path):
    """SyncClient offers submit(files=, progress=) and download() without await."""
    server = server_factory()
    data = make_file(tmp_path / "in.bin", 2 * MIB + 1)
    reports = Reports()
    with SyncClient(server.url, request_timeout_s=10.0) as client:
        job = client.submit("digest", files={"file": tmp_path / "in.bin"}, progress=reports)
        assert client.wait(job, timeout=20).result == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        assert reports.seen[-1] == (len(data), len(data))
        gzipped = client.wait(client.submit("gzip", files={"file": str(tmp_path / "in.bin")}), timeout=20)
        saved = client.download(gzipped, tmp_path / "in.bin.gz")
        assert gzip.decompress((tmp_path / "in.bin.gz").read_bytes()) == data and saved.name == "in.bin.gz"
        made = client.wait(client.submit("bytes", {"size": 70_000}), timeout=20)
        with pytest.raises(Stop):
            client.download(made, tmp_path / "b.bin", progress=Reports(stop_after=1))
        assert client.download(made, tmp_path / "b.bin").size == 70_000
        assert (tmp_path / "b.bin").read_bytes() == expected_bytes(70_000)


async def test_a_file_over_the_upload_limit_is_refused(start, connect, tmp_path):
    """A file past `files.max_upload_bytes` is answered 413 while it is still being sent: BadRequest, no job."""
    server = await start(files={"max_upload_bytes": 100_000})
    client = connect(server.url)
    make_file(tmp_path / "big.bin", 8 * MIB)
    make_file(tmp_path / "fits.bin", 100_000)
    with pytest.raises(BadRequest) as caught:
        await client.submit("digest", {}, files={"file": tmp_path / "big.bin"})
    assert caught.value.status == 413
    assert await jobs_on_server(server) == []
    job = await client.submit("digest", {}, files={"file": tmp_path / "fits.bin"})
    assert (await client.wait(job, timeout=20)).result["size"] == 100_000
