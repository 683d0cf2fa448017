"""Files in and out over HTTP against a real server: uploads, file results, downloads, limits and cleanup."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import eventually, files_under, submit, wait_status

@pytest.fixture
def make_client(make_client):
    """The conftest's, with a short shutdown grace: these tests leave jobs running at their end."""

    async def make(**sections):
        return await make_client(**{**sections, "queue": {"shutdown_grace": 0.2, **sections.get("queue", {})}})

    return make



def form(job: dict[str, Any] | None = None, files: dict[str, tuple[bytes, str]] | None = None,
         fields: dict[str, str] | None = None, *, job_first: bool = True) -> aiohttp.MultipartWriter:
    """A multipart/form-data body: the ``job`` part, form fields, then one part per file (data, file name)."""
    writer = aiohttp.MultipartWriter("form-data")

    def add_job() -> None:
        if job is not None:
            part = writer.append(json.dumps(job), {"Content-Type": "application/json"})
            part.set_content_disposition("form-data", name="job")

    if job_first:
        add_job()
    for name, value in (fields or {}).items():
        part = writer.append(value, {"Content-Type": "text/plain"})
        part.set_content_disposition("form-data", name=name)
    for name, (data, filename) in (files or {}).items():
        part = writer.append(io.BytesIO(data), {"Content-Type": "application/octet-stream"})
        part.set_content_disposition("form-data", name=name, filename=filename)
    if not job_first:
        add_job()
    return writer


def files_dir(app) -> Path:
    return app.files.root


def stored_files(app) -> list[Path]:
    """Every file under the files folder (committed, arriving, or work files)."""
    return files_under(files_dir(app))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_multipart_submit_stores_the_file_before_202_and_the_handler_reads_it(make_client):
    """The upload is on disk, named by job id, when the 202 leaves; the job lists it; the handler gets it."""
    client, app = await make_client()
    data = bytes(range(256)) * 20_000
    resp = await client.post("/jobs", data=form({"task": "digest", "delay": 60}, {"file": (data, "clip.bin")}))
    assert resp.status == 202, await resp.text()
    job = await resp.json()
    assert job["files"] == {"inputs": {"file": {"name": "clip.bin", "size": len(data),
                                                "content_type": "application/octet-stream", "sha256": sha(data)}},
                            "result": None}
    assert app.files.input_path(job["id"], "file").read_bytes() == data
    resp = await client.post("/jobs", data=form({"task": "digest"}, {"file": (data, "clip.bin")}))
    done = await wait_status(client, (await resp.json())["id"], "succeeded")
    assert done["result"] == {"sha256": sha(data), "size": len(data)}


async def test_inputs_are_removed_once_the_job_is_terminal(make_client):
    """A finished job can never run again, so its upload goes; its record still describes it."""
    client, app = await make_client()
    resp = await client.post("/jobs", data=form({"task": "digest"}, {"file": (b"abc", "a.txt")}))
    job = await wait_status(client, (await resp.json())["id"], "succeeded")
    assert job["files"]["inputs"]["file"]["sha256"] == sha(b"abc")
    await eventually(lambda: not app.files.input_path(job["id"], "file").exists(), "the input to be removed")
    assert stored_files(app) == []


async def test_raw_body_on_a_task_route_is_the_file_and_the_query_gives_params(make_client):
    """PUT with any Content-Type: the body is the single file param; path and query are the other params."""
    client, _ = await make_client()
    data = b"\x00raw video bytes\xff" * 1000
    resp = await client.put("/uploads/clip?tag=x&copies=3", data=data,
                            headers={"Content-Type": "video/mp4", "Content-Disposition": 'attachment; filename="c.mp4"'})
    assert resp.status == 202, await resp.text()
    job = await wait_status(client, (await resp.json())["id"], "succeeded")
    assert job["result"] == {"name": "clip", "tag": "x", "copies": 3, "file_name": "c.mp4", "size": len(data),
                             "content_type": "video/mp4", "sha256": sha(data), "on_disk": len(data)}
    resp = await client.put("/uploads/other?filename=from-query.bin", data=b"x")
    job = await wait_status(client, (await resp.json())["id"], "succeeded")
    assert job["result"]["file_name"] == "from-query.bin"
    # An empty body said so (Content-Length: 0) is an empty file, as an empty multipart part is.
    resp = await client.put("/uploads/empty?filename=e.bin", data=b"", headers={"Content-Length": "0"})
    assert resp.status == 202, await resp.text()
    job = await wait_status(client, (await resp.json())["id"], "succeeded")
    assert job["result"]["size"] == 0 and job["result"]["sha256"] == sha(b"") and job["files"]["inputs"]["file"][
        "size"] == 0, job


async def test_task_route_takes_multipart_with_form_fields_as_params(make_client):
    """On a task's own route, plain form fields are params (converted per the schema) beside the files."""
    client, _ = await make_client()
    resp = await client.post("/pairs", data=form(None, {"left": (b"L", "l.txt")}, {"label": "both"}))
    assert resp.status == 415, await resp.text()  # left takes text only; the form sent octet-stream
    writer = aiohttp.MultipartWriter("form-data")
    writer.append("both", {"Content-Type": "text/plain"}).set_content_disposition("form-data", name="label")
    writer.append(b"L", {"Content-Type": "text/plain"}).set_content_disposition("form-data", name="left",
                                                                                 filename="l.txt")
    writer.append(b"R", {"Content-Type": "image/png"}).set_content_disposition("form-data", name="right",
                                                                               filename="r.png")
    resp = await client.post("/pairs", data=writer)
    assert resp.status == 202, await resp.text()
    job = await wait_status(client, (await resp.json())["id"], "succeeded")
    assert job["result"] == {"label": "both", "left": sha(b"L"), "right": sha(b"R")}


@pytest.mark.parametrize("body, field", [
    (lambda: form({"task": "digest"}), "file"),                                        # a required file missing
    (lambda: form({"task": "digest"}, {"file": (b"a", "a"), "extra": (b"b", "b")}), "extra"),  # unexpected
    (lambda: form({"task": "echo"}, {"file": (b"a", "a")}), "file"),                   # a task without files
    (lambda: form({"task": "digest"}, {"file": (b"a", "a")}, job_first=False), "file"),  # file before job
    (lambda: form(None, {"file": (b"a", "a")}), "file"),                               # no job part at all
])
async def test_bad_multipart_submits_are_400_naming_the_field_and_store_nothing(make_client, body, field):
    """Missing, unexpected and misplaced parts are 400 with the field named; no job, no file is left."""
    client, app = await make_client()
    resp = await client.post("/jobs", data=body())
    assert resp.status == 400, await resp.text()
    problem = await resp.json()
    assert resp.content_type == "application/problem+json"
    assert field in {e["field"] for e in problem["errors"]}, problem
    assert (await (await client.get("/jobs")).json())["jobs"] == []
    assert stored_files(app) == []


async def _raw_multipart(client, body: bytes, boundary: str = "b0undary") -> aiohttp.ClientResponse:
    return await client.post("/jobs", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})


async def test_duplicate_nameless_and_truncated_parts_are_400(make_client):
    """A part sent twice, a part without a name and a body cut short each get 400, and nothing is kept."""
    client, app = await make_client()
    job = b'--b0undary\r\nContent-Disposition: form-data; name="job"\r\n\r\n{"task": "digest"}\r\n'
    part = b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nAAAA\r\n'
    nameless = b'--b0undary\r\nContent-Disposition: form-data; filename="a"\r\n\r\nAAAA\r\n'
    end = b"--b0undary--\r\n"
    for body, field in ((job + part + part + end, "file"), (job + nameless + end, ""),
                        (job + part[:-10], "")):
        resp = await _raw_multipart(client, body)
        assert resp.status == 400, (body, await resp.text())
        assert field in {e["field"] for e in (await resp.json())["errors"]}
    resp = await _raw_multipart(client, job + part + end)
    assert resp.status == 202, await resp.text()
    await wait_status(client, (await resp.json())["id"], "succeeded")
    assert len((await (await client.get("/jobs")).json())["jobs"]) == 1
    await eventually(lambda: stored_files(app) == [], "only the accepted job's input, then none")


async def test_raw_body_to_a_task_without_files_is_415(make_client):
    """A non-JSON body on a route whose task takes no file is 415; a file task refuses types it does not accept."""
    client, _ = await make_client()
    resp = await client.post("/thumbnails", data=b"\x89PNG", headers={"Content-Type": "image/png"})
    assert resp.status == 415
    resp = await client.post("/pairs", data=b"raw", headers={"Content-Type": "text/plain"})
    assert resp.status == 415, await resp.text()  # two file params: raw bodies cannot say which


async def test_upload_over_the_limit_is_413_at_once_and_leaves_nothing(make_client):
    """Past files.max_upload_bytes: 413 (from Content-Length before reading; chunked as soon as crossed);
    a file of exactly the limit is accepted."""
    client, app = await make_client(files={"max_upload_bytes": 100_000})
    resp = await client.put("/uploads/a", data=io.BytesIO(b"x" * 100_001))
    assert resp.status == 413, await resp.text()

    async def chunked(total: int):
        for _ in range(total // 10_000):
            yield b"y" * 10_000

    resp = await client.put("/uploads/b", data=chunked(300_000))
    assert resp.status == 413
    resp = await client.post("/jobs", data=form({"task": "digest"}, {"file": (b"z" * 100_001, "z")}))
    assert resp.status == 413
    assert (await (await client.get("/jobs")).json())["jobs"] == []
    assert stored_files(app) == []
    resp = await client.put("/uploads/c", data=b"x" * 100_000)
    assert resp.status == 202, await resp.text()


async def test_idempotent_upload_replays_with_the_same_bytes_and_is_422_with_others(make_client):
    """The files' digests are part of the request: same key and bytes replay; other bytes are 422."""
    client, app = await make_client()
    headers = {"Idempotency-Key": "upload-1"}
    first = await client.post("/jobs", data=form({"task": "hold_file", "params": {"seconds": 30}},
                                                  {"file": (b"one", "a")}), headers=headers)
    assert first.status == 202
    job = await first.json()
    again = await client.post("/jobs", data=form({"task": "hold_file", "params": {"seconds": 30}},
                                                  {"file": (b"one", "renamed")}), headers=headers)
    assert again.status == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert (await again.json())["id"] == job["id"]
    other = await client.post("/jobs", data=form({"task": "hold_file", "params": {"seconds": 30}},
                                                  {"file": (b"two", "a")}), headers=headers)
    assert other.status == 422
    assert [p.name for p in stored_files(app)] == ["in.file"]


async def test_file_result_is_downloaded_with_its_headers(make_client):
    """A file result: Content-Type, -Length, -Disposition (RFC 6266, non-ASCII name), strong ETag,
    Repr-Digest, Last-Modified, Accept-Ranges, nosniff, Cache-Control private; HEAD has no body."""
    client, _ = await make_client()
    resp = await client.post("/jobs", json={"task": "write_output", "params": {"size": 5000, "name": "résumé 1.txt"}})
    job = await wait_status(client, (await resp.json())["id"], "succeeded")
    result = job["files"]["result"]
    assert job["result"] is None
    assert result == {"name": "résumé 1.txt", "size": 5000, "content_type": "text/plain; charset=utf-8",
                      "sha256": sha(b"r" * 5000)}
    resp = await client.get(f"/jobs/{job['id']}/result")
    assert resp.status == 200
    assert await resp.read() == b"r" * 5000
    h = resp.headers
    assert h["Content-Type"] == "text/plain; charset=utf-8" and h["Content-Length"] == "5000"
    assert h["Content-Disposition"] == "attachment; filename=\"r_sum_ 1.txt\"; filename*=UTF-8''r%C3%A9sum%C3%A9%201.txt"
    assert h["ETag"] == f'"{result["sha256"]}"'
    import base64
    assert h["Repr-Digest"] == f"sha-256=:{base64.b64encode(hashlib.sha256(b'r' * 5000).digest()).decode()}:"
    assert h["Accept-Ranges"] == "bytes" and h["X-Content-Type-Options"] == "nosniff"
    assert h["Cache-Control"] == "private" and "Last-Modified" in h
    head = await client.head(f"/jobs/{job['id']}/result")
    assert head.status == 200 and head.headers["Content-Length"] == "5000" and await head.read() == b""
    resp = await client.get(f"/jobs/{job['id']}/result", headers={"If-None-Match": h["ETag"]})
    assert resp.status == 304
    resp = await client.get(f"/jobs/{job['id']}/result", headers={"If-Modified-Since": h["Last-Modified"]})
    assert resp.status == 304
    resp = await client.get(f"/jobs/{job['id']}/result", headers={"If-Match": h["ETag"]})
    assert resp.status == 200 and await resp.read() == b"r" * 5000
    resp = await client.get(f"/jobs/{job['id']}/result", headers={"If-Match": '"other"'})
    assert resp.status == 412 and resp.content_type == "application/problem+json"
    assert resp.headers["ETag"] == h["ETag"]
    assert (await resp.json())["job_status"] == "succeeded"  # an answer about a job that exists


async def _bytes_job(client, size: int, seed: str = "s") -> tuple[dict, bytes]:
    resp = await client.post("/jobs", json={"task": "bytes", "params": {"size": size, "seed": seed}})
    job = await wait_status(client, (await resp.json())["id"], "succeeded")
    expected = b"".join(hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(size // 32 + 1))[:size]
    return job, expected


async def test_ranges_are_byte_exact_and_bad_ones_are_416(make_client):
    """bytes=a-b, a-, -n give 206 with Content-Range; malformed, multiple, reversed or past-the-end ranges 416
    with bytes */size; a range of another unit is ignored (RFC 9110, 14.2); If-Range with a stale validator
    answers the whole file."""
    client, _ = await make_client()
    job, expected = await _bytes_job(client, 10_000)
    assert job["files"]["result"]["name"] == "bytes-10000.bin"
    url = f"/jobs/{job['id']}/result"
    for header, first, last in (("bytes=0-99", 0, 99), ("bytes=9990-", 9990, 9999), ("bytes=-10", 9990, 9999),
                                ("bytes=500-20000", 500, 9999), ("bytes=0-0", 0, 0)):
        resp = await client.get(url, headers={"Range": header})
        assert resp.status == 206, header
        assert resp.headers["Content-Range"] == f"bytes {first}-{last}/10000"
        assert await resp.read() == expected[first:last + 1]
    for header in ("bytes=10000-", "bytes=50-10", "bytes=0-1,5-6", "bytes=abc", "bytes=-0", "bytes", "bytes 1-2"):
        resp = await client.get(url, headers={"Range": header})
        assert resp.status == 416, header
        assert resp.headers["Content-Range"] == "bytes */10000"
        assert resp.content_type == "application/problem+json"
        problem = await resp.json()
        assert problem["title"] == "Range Not Satisfiable" and problem["job_status"] == "succeeded"  # RFC 9110
    for header in ("pages=1-2", "Items = 0-1"):
        resp = await client.get(url, headers={"Range": header})
        assert resp.status == 200, header
        assert "Content-Range" not in resp.headers and await resp.read() == expected
    etag = f'"{job["files"]["result"]["sha256"]}"'
    resp = await client.get(url, headers={"Range": "bytes=100-", "If-Range": etag})
    assert resp.status == 206 and await resp.read() == expected[100:]
    for stale in ('"0000"', 'W/' + etag, "Sat, 01 Jan 2000 00:00:00 GMT"):
        resp = await client.get(url, headers={"Range": "bytes=100-", "If-Range": stale})
        assert resp.status == 200, stale
        assert await resp.read() == expected


async def test_result_answers_404_409_410_for_files_as_for_json(make_client):
    """Not yet: 404 with Retry-After; failed: 409; expired: 410."""
    client, _ = await make_client(jobs={"retention": 0.5})
    resp = await client.post("/jobs", data=form({"task": "hold_file", "params": {"seconds": 30}},
                                                {"file": (b"x", "x")}))
    job = await resp.json()
    resp = await client.get(f"/jobs/{job['id']}/result")
    assert resp.status == 404 and "Retry-After" in resp.headers
    await client.post(f"/jobs/{job['id']}/cancel")
    resp = await client.get(f"/jobs/{job['id']}/result")
    assert resp.status == 409
    job, _ = await _bytes_job(client, 100)
    await eventually(lambda: _status_of(client, f"/jobs/{job['id']}/result", 410), "the result to expire")


async def _status_of(client, url: str, wanted: int) -> bool:
    return (await client.get(url)).status == wanted


async def test_context_output_path_returned_implicitly_and_large_blobs_become_files(make_client):
    """A handler that returns None after writing its one output path gets that file; a large Blob
    leaves the row and is served as a file."""
    client, _ = await make_client()
    resp = await client.post("/jobs", json={"task": "write_output",
                                            "params": {"size": 10, "name": "notes.txt", "return_it": False}})
    job = await wait_status(client, (await resp.json())["id"], "succeeded")
    assert job["files"]["result"]["name"] == "notes.txt"
    assert job["files"]["result"]["content_type"] == "text/plain"
    resp = await client.post("/jobs", json={"task": "big_blob", "params": {"size": 300_000}})
    job = await wait_status(client, (await resp.json())["id"], "succeeded")
    assert job["result"] is None and job["files"]["result"]["size"] == 300_000
    resp = await client.get(f"/jobs/{job['id']}/result")
    assert resp.headers["Content-Type"] == "application/x-test" and await resp.read() == b"b" * 300_000
    resp = await client.post("/jobs", json={"task": "big_blob", "params": {"size": 1000}})
    job = await wait_status(client, (await resp.json())["id"], "succeeded")
    assert job["files"] is None and job["result"]["size"] == 1000  # small bytes stay in the row


async def test_missing_or_unstorable_results_fail_the_job(make_client):
    """A returned path that is no file fails the job; one over files.max_total_bytes fails it as storage."""
    client, app = await make_client(files={"max_total_bytes": 50_000})
    resp = await client.post("/jobs", json={"task": "missing_file"})
    job = await wait_status(client, (await resp.json())["id"], "failed")
    assert job["error"]["type"] == "exception"
    resp = await client.post("/jobs", json={"task": "write_output", "params": {"size": 60_000}})
    job = await wait_status(client, (await resp.json())["id"], "failed")
    assert job["error"]["type"] == "storage" and job["files"]["result"] is None if job["files"] else True
    assert stored_files(app) == []


async def test_uploads_over_max_total_bytes_are_507_and_store_nothing(make_client):
    """Input and result files together are bounded; a submit that would cross it gets 507 problem+json."""
    client, app = await make_client(files={"max_total_bytes": 100_000})
    resp = await client.post("/jobs", data=form({"task": "hold_file"}, {"file": (b"a" * 60_000, "a")}))
    assert resp.status == 202
    resp = await client.post("/jobs", data=form({"task": "hold_file"}, {"file": (b"b" * 60_000, "b")}))
    assert resp.status == 507, await resp.text()
    assert resp.content_type == "application/problem+json"
    assert len((await (await client.get("/jobs")).json())["jobs"]) == 1
    assert len(stored_files(app)) == 1
    metrics = await (await client.get("/metrics")).text()
    assert "asyncjobs_files_bytes 60000.0" in metrics and "asyncjobs_files 1.0" in metrics


async def test_a_replay_or_a_reuse_past_max_total_bytes_is_answered_not_refused(make_client):
    """A submit that repeats a job stores no file, so the bound on the files does not refuse it: a retried
    upload with its Idempotency-Key replays (202), an equal upload to a unique task gets its 303. One that
    differs, or has no key, still gets 507; nothing of theirs is kept."""
    client, app = await make_client(files={"max_total_bytes": 100_000})
    key = {"Idempotency-Key": "upload-retry-1"}

    def body(data: bytes = b"a" * 60_000) -> aiohttp.MultipartWriter:
        return form({"task": "hold_file", "params": {"seconds": 30}}, {"file": (data, "a.bin")})

    first = await client.post("/jobs", data=body(), headers=key)
    assert first.status == 202, await first.text()
    again = await client.post("/jobs", data=body(), headers=key)
    assert again.status == 202 and again.headers.get("Idempotent-Replayed") == "true", await again.text()
    assert (await again.json())["id"] == (await first.json())["id"]
    other = await client.post("/jobs", data=body(b"c" * 60_000), headers=key)
    assert other.status == 422, await other.text()  # the same key, other bytes
    assert (await client.post("/jobs", data=body(b"d" * 60_000))).status == 507
    text = b"t" * 30_000
    unique = await client.put("/texts/a?seconds=30", data=text, headers={"Content-Type": "text/plain"})
    assert unique.status == 202, await unique.text()
    twin = await client.put("/texts/a?seconds=30", data=text, headers={"Content-Type": "text/plain"},
                            allow_redirects=False)
    assert twin.status == 303 and twin.headers["Location"] == f"/jobs/{(await unique.json())['id']}"
    assert len(stored_files(app)) == 2  # the two jobs' inputs: nothing of the repeats
    metrics = await (await client.get("/metrics")).text()
    assert "asyncjobs_files_bytes 90000.0" in metrics and "asyncjobs_files 2.0" in metrics


async def test_delete_and_expiry_remove_the_files(make_client):
    """A result file lives as long as its job: DELETE removes it, and so does the end of retention."""
    client, app = await make_client(jobs={"retention": 1})
    job, _ = await _bytes_job(client, 1000)
    assert app.files.result_path(job["id"], job["attempts"]).exists()
    resp = await client.delete(f"/jobs/{job['id']}")
    assert resp.status == 204
    assert not app.files.job_dir(job["id"]).exists()
    job, _ = await _bytes_job(client, 1000)
    await eventually(lambda: not app.files.job_dir(job["id"]).exists(), "the expired job's file to go")
    resp = await client.get(f"/jobs/{job['id']}/result")
    assert resp.status == 410


async def test_a_result_file_stored_before_results_were_kept_per_attempt_is_still_served(make_client):
    """A store made by an earlier version holds a job's file result as ``result``: it is served as before."""
    client, app = await make_client()
    job, expected = await _bytes_job(client, 1000)
    folder = app.files.job_dir(job["id"])
    (folder / f"result.{job['attempts']}").rename(folder / "result")
    resp = await client.get(f"/jobs/{job['id']}/result")
    assert resp.status == 200 and await resp.read() == expected


async def test_files_a_crash_left_behind_are_removed_at_start(app_factory, aiohttp_client, tmp_path):
    """Uploads in progress, folders of jobs never committed, and results never recorded go at start;
    a committed job's input stays."""
    app = app_factory()
    client = await aiohttp_client(app.web)
    resp = await client.post("/jobs", data=form({"task": "hold_file", "params": {"seconds": 60}, "delay": 600},
                                                {"file": (b"keep", "k")}))
    kept = (await resp.json())["id"]
    await client.close()
    root = app.files.root
    (root / "tmp" / "half.part").write_bytes(b"partial")
    (root / "jobs" / "never-committed").mkdir()
    (root / "jobs" / "never-committed" / "in.file").write_bytes(b"orphan")
    (root / "jobs" / kept / "result").write_bytes(b"unrecorded")  # as stored before results were per attempt
    (root / "jobs" / kept / "result.1").write_bytes(b"unrecorded")
    (root / "work" / f"{kept}.1").mkdir()
    again = app_factory()
    await again.start()
    try:
        assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == [f"jobs/{kept}/in.file"]
    finally:
        await again.stop()


async def test_tasks_and_openapi_describe_file_params(make_client):
    """GET /tasks lists file params apart from JSON params; OpenAPI has multipart with binary parts."""
    client, _ = await make_client()
    tasks = {t["name"]: t for t in (await (await client.get("/tasks")).json())["tasks"]}
    assert tasks["digest"]["file_params"] == {"file": {"required": True, "content_types": ["*/*"]}}
    assert "file" not in tasks["digest"]["params_schema"]["properties"]
    assert tasks["pair"]["file_params"]["right"]["required"] is False
    assert tasks["echo"]["file_params"] == {}
    doc = await (await client.get("/openapi.json")).json()
    multipart = doc["paths"]["/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert multipart["properties"]["file"] == {"type": "string", "format": "binary"}
    route = doc["paths"]["/uploads/{name}"]["put"]["requestBody"]["content"]
    assert route["*/*"]["schema"]["format"] == "binary"


async def test_server_goes_on_while_a_slow_upload_arrives_and_a_stalled_one_is_408(make_client):
    """A client that stalls past files.read_timeout gets 408, its partial file is removed."""
    client, app = await make_client(files={"read_timeout": 0.5})

    async def stalls():
        yield b"a" * 1000
        await asyncio.sleep(3)
        yield b"b"

    upload = asyncio.ensure_future(client.put("/uploads/slow", data=stalls()))
    assert (await client.get("/healthz")).status == 200
    resp = await upload
    assert resp.status == 408, await resp.text()
    assert stored_files(app) == []


async def test_a_client_that_disconnects_mid_upload_leaves_no_job_and_no_file(make_client, caplog):
    """The connection drops after part of the body: no job, the partial file removed, nothing logged as a bug."""
    client, app = await make_client()
    for path, head in (("/uploads/cut", b"Content-Type: application/octet-stream\r\n"),
                       ("/jobs", b"Content-Type: multipart/form-data; boundary=b0undary\r\n")):
        reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
        body = b"x" * (3 << 20)
        if path == "/jobs":
            body = (b'--b0undary\r\nContent-Disposition: form-data; name="job"\r\n\r\n{"task": "digest"}\r\n'
                    b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n\r\n' + body)
        writer.write(b"PUT " if path != "/jobs" else b"POST ")
        writer.write(path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + head + b"Content-Length: 20000000\r\n\r\n" + body)
        await writer.drain()
        await eventually(lambda: any(p.suffix == ".part" for p in stored_files(app)), "the partial upload on disk")
        writer.close()
        await eventually(lambda: stored_files(app) == [], "the partial upload to be removed")
    assert (await (await client.get("/jobs")).json())["jobs"] == []
    assert "unhandled error" not in caplog.text


async def test_raw_body_of_a_type_the_task_does_not_accept_is_415(make_client):
    """A raw route whose file param takes text/* refuses an image with 415 and keeps nothing."""
    client, app = await make_client()
    resp = await client.put("/texts/a", data=b"\x89PNG", headers={"Content-Type": "image/png"})
    assert resp.status == 415, await resp.text()
    assert stored_files(app) == []
    resp = await client.put("/texts/a", data=b"hello", headers={"Content-Type": "text/plain; charset=utf-8"})
    assert resp.status == 202


async def test_unique_task_compares_file_digests_not_names(make_client):
    """Equal bytes under another name reuse the live job (303); other bytes make a new one."""
    client, app = await make_client()
    first = await client.put("/texts/a?seconds=30&filename=one.txt", data=b"same", headers={"Content-Type": "text/plain"})
    assert first.status == 202
    twin = await client.put("/texts/a?seconds=30&filename=two.txt", data=b"same", headers={"Content-Type": "text/plain"},
                            allow_redirects=False)
    assert twin.status == 303 and twin.headers["Location"] == f"/jobs/{(await first.json())['id']}"
    other = await client.put("/texts/a?seconds=30", data=b"different", headers={"Content-Type": "text/plain"})
    assert other.status == 202
    assert len([p for p in stored_files(app) if p.name == "in.text"]) == 2  # the twin's upload was not kept


async def test_expect_100_continue_refuses_an_oversized_body_before_it_is_sent(make_client):
    """With Expect: 100-continue, a Content-Length over the limit gets 413 at once; one within it 100 Continue."""
    client, _ = await make_client(files={"max_upload_bytes": 1000})
    for length, first_line in ((5000, b"HTTP/1.1 413"), (10, b"HTTP/1.1 100 Continue")):
        reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
        writer.write(b"PUT /uploads/e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % length)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 5)
        assert line.startswith(first_line), line
        if length == 10:
            writer.write(b"0123456789")
            await reader.readline()  # the blank line after 100 Continue
            assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 202")
        writer.close()


@pytest.mark.parametrize("past", [100, 50_000, 100_000])
async def test_a_multipart_file_gets_413_as_soon_as_it_crosses_the_limit(make_client, past):
    """A client that sends a file part past files.max_upload_bytes and then stops (still to send the rest)
    gets 413 at once, not 408 after the read timeout, whatever aiohttp still holds back to look for the
    boundary; nothing is kept. A file of just the limit, sent whole, is still accepted."""
    limit = 100_000
    client, app = await make_client(files={"max_upload_bytes": limit, "read_timeout": 60})
    head = (b'--B\r\nContent-Disposition: form-data; name="job"\r\n\r\n{"task": "digest"}\r\n'
            b'--B\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n\r\n')
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    try:
        writer.write(b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
                     b"Content-Length: 10000000\r\n\r\n" + head + b"z" * (limit + past))
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 10)  # well within the read timeout of 60 s
    finally:
        writer.close()
    assert line.startswith(b"HTTP/1.1 413"), line
    await eventually(lambda: stored_files(app) == [], "the partial upload to be removed")
    whole = await client.post("/jobs", data=form({"task": "digest"}, {"file": (b"z" * limit, "f")}))
    assert whole.status == 202, await whole.text()


async def test_client_file_names_are_sanitised_for_display(make_client):
    """Paths, control characters, NUL, overlong and non-UTF-8 names become a safe display name; never a path."""
    client, app = await make_client()
    in_header = [(b"../../etc/passwd", "passwd"), (b"a\\\\b\\\\c.txt", "c.txt"),
                 (b"\xff\xfename.bin", "name.bin"), (b"x" * 600, "x" * 255), (b"/", "file")]
    for raw, expected in in_header:
        reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
        writer.write(b'PUT /uploads/n HTTP/1.1\r\nHost: x\r\nContent-Disposition: attachment; filename="' + raw +
                     b'"\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc')
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 202"), answer[:300]
        assert json.loads(body)["files"]["inputs"]["file"]["name"] == expected, raw
    for query, expected in (("ta%01b%7F.txt", "tab.txt"), ("nul%00.txt", "nul.txt"), ("%E2%82%AC" * 100, "\u20ac" * 85)):
        resp = await client.put(f"/uploads/q?filename={query}", data=b"abc")
        assert resp.status == 202
        assert (await resp.json())["files"]["inputs"]["file"]["name"] == expected, query
    paths = [p.name for p in stored_files(app)]
    assert all(name == "in.file" for name in paths), paths


async def test_multipart_file_names_escaped_by_browsers_are_shown_as_chosen(make_client):
    """A form's file name with %22 (a quote), as browsers send it, or percent-encoded UTF-8, reads as the
    name the user picked; a lone % stays."""
    client, _ = await make_client()
    for sent, shown in (('say %22hi%22.txt', 'say "hi".txt'), ("r%C3%A9sum%C3%A9.txt", "résumé.txt"),
                        ("50%.txt", "50%.txt"), ("%FF.bin", "%FF.bin")):
        body = (b'--b0undary\r\nContent-Disposition: form-data; name="job"\r\n\r\n{"task": "digest"}\r\n'
                b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="' + sent.encode() +
                b'"\r\n\r\nAAAA\r\n--b0undary--\r\n')
        resp = await _raw_multipart(client, body)
        assert resp.status == 202, await resp.text()
        assert (await resp.json())["files"]["inputs"]["file"]["name"] == shown


@pytest.mark.parametrize("content_type, multipart", [
    ("multipart/form-data; boundary=x", True),
    ("Multipart/Form-Data; boundary=x", True),
    ("application/json", False),
    ("multipart/mixed; boundary=x", False),
    (None, False),
])
def test_only_a_multipart_form_is_read_as_files(content_type: str | None, multipart: bool) -> None:
    from aiohttp.test_utils import make_mocked_request

    from asyncjobs.web import uploads

    headers = {} if content_type is None else {"Content-Type": content_type}
    assert uploads.is_multipart(make_mocked_request("POST", "/jobs", headers=headers)) is multipart


# -- bytes that are not UTF-8 in part headers, digits that are not ASCII ---------------------------------

async def _send_raw(port: int, request: bytes, timeout_s: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), timeout_s)
    except TimeoutError:
        return b"(no answer within %g s)" % timeout_s
    finally:
        writer.close()


@pytest.mark.parametrize("where", ["multipart part", "raw body"])
async def test_a_file_content_type_that_is_not_utf8_is_refused_and_the_store_goes_on(make_client, where):
    """aiohttp keeps a header's bytes that are not UTF-8 as lone surrogates, which the job's row cannot hold:
    such a file's Content-Type is a 415, and the store goes on taking submits."""
    client, _ = await make_client()
    if where == "multipart part":
        body = (b'--b\r\nContent-Disposition: form-data; name="job"\r\n\r\n{"task": "digest"}\r\n'
                b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n'
                b'Content-Type: text/\xff\r\n\r\nAAAA\r\n--b--\r\n')
        head = b"POST /jobs HTTP/1.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    else:
        body = b"AAAA"
        head = b"PUT /uploads/a HTTP/1.1\r\nContent-Type: text/\xff\r\n"
    raw = await _send_raw(client.server.port, head + b"Host: x\r\nConnection: close\r\nContent-Length: "
                          + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert raw.startswith(b"HTTP/1.1 415 "), raw[:300]
    assert (await client.post("/jobs", json={"task": "noop"})).status == 202


@pytest.mark.parametrize("path, body", [
    ("/jobs", b'--b\r\nContent-Disposition: form-data; name="job"\r\n\r\n{"task": "digest"}\r\n'
              b'--b\r\nContent-Disposition: form-data; name="\xff"; filename="a"\r\n\r\nAAAA\r\n--b--\r\n'),
    ("/jobs", b'--b\r\nContent-Disposition: form-data; name="\xff"\r\n\r\n{}\r\n--b--\r\n'),
    ("/pairs", b'--b\r\nContent-Disposition: form-data; name="\xff"\r\n\r\nx\r\n'
               b'--b\r\nContent-Disposition: form-data; name="left"; filename="l"\r\nContent-Type: text/plain\r\n\r\n'
               b'L\r\n--b--\r\n'),
])
async def test_a_part_name_that_is_not_utf8_is_a_400_problem(make_client, path, body):
    client, _ = await make_client()
    raw = await _send_raw(client.server.port, b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                          b"Connection: close\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: "
                          + str(len(body)).encode() + b"\r\n\r\n" + body)
    head, _, answer = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"application/problem+json" in head, raw[:300]
    assert json.loads(answer)["errors"][0]["message"] == "not UTF-8"


@pytest.mark.parametrize("value", ["bytes=\u00b2-", "bytes=0-\u00b9", "bytes=-\u00b3", "bytes=\u0661-"])
async def test_a_range_with_digits_that_are_not_ascii_is_416(make_client, value):
    """'²'.isdigit() is True, but int('²') raises, and Arabic-Indic digits are no range of RFC 9110."""
    client, _ = await make_client()
    resp = await client.post("/jobs", json={"task": "bytes", "params": {"size": 100}})
    job = await wait_status(client, (await resp.json())["id"], "succeeded")
    raw = await _send_raw(client.server.port, f"GET /jobs/{job['id']}/result HTTP/1.1\r\nHost: x\r\n"
                          f"Connection: close\r\nRange: {value}\r\n\r\n".encode())
    assert raw.startswith(b"HTTP/1.1 416 "), raw[:300]


async def test_a_file_sent_to_a_task_route_that_takes_no_files_is_400(make_client):
    """A part with a file name is a file, not a form field: a task that takes none answers 400."""
    client, _ = await make_client()
    writer = aiohttp.MultipartWriter("form-data")
    writer.append(b"http://example.com/a.png", {"Content-Type": "text/plain"}).set_content_disposition(
        "form-data", name="url", filename="links.txt")
    resp = await client.post("/thumbnails", data=writer)
    problem = await resp.json(content_type=None)
    assert resp.status == 400 and problem["errors"] == [{"field": "url", "message": "unexpected part"}], problem


async def test_file_results_stored_together_stay_within_max_total_bytes(make_client):
    """Results that finish side by side each take their room before they are copied: past the limit they fail
    as storage errors, and the files on disk never exceed it."""
    size, limit, jobs = 4 << 20, 10 << 20, 6  # room for two results of 4 MiB, not three
    client, app = await make_client(files={"max_total_bytes": limit}, queue={"workers": jobs})
    ids = []
    for _ in range(jobs):
        resp = await client.post("/jobs", json={"task": "fill", "params": {"size": size}})
        ids.append((await resp.json())["id"])
    done = [await wait_status(client, i, {"succeeded", "failed"}, timeout_s=60) for i in ids]
    assert sum(p.stat().st_size for p in stored_files(app)) <= limit
    assert len([j for j in done if j["status"] == "succeeded"]) == 2
    assert {j["error"]["type"] for j in done if j["status"] == "failed"} == {"storage"}
    assert app.files.bytes == 2 * size
