"""The video example (examples/video): ffmpeg conversions through a real `asyncjobs serve`, as its README runs them.

Not skipped when ffmpeg is missing: the fixture installs Debian's package where it may (root with apt) and fails
otherwise, as the browser tests do for chromium.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .conftest import ROOT, ServerProcess, eventually

EXAMPLE = ROOT / "examples" / "video"
MODULES = ["asyncjobs.builtin", "videotasks"]
TERMINAL = {"succeeded", "failed", "canceled"}
JOB_TIMEOUT_S = 30  # a loaded two-core machine converts the 10 s clip in about 2 s
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=JOB_TIMEOUT_S)


# -- ffmpeg, clips and probes -----------------------------------------------------------------

def ensure_ffmpeg() -> None:
    """Debian's ffmpeg is a system package, not a pip one: install it if missing and we may, else fail.

    Bounded: apt gets ten minutes at most.
    """
    if shutil.which("ffmpeg") and shutil.which("ffprobe"):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "ffmpeg"]):
            subprocess.run(command, env=env, check=False, stdin=subprocess.DEVNULL, timeout=600,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not (shutil.which("ffmpeg") and shutil.which("ffprobe")):
        pytest.fail("ffmpeg or ffprobe is missing: install Debian's ffmpeg (apt-get install ffmpeg)")


@pytest.fixture(scope="session")
def ffmpeg() -> None:
    ensure_ffmpeg()


def make_clip(path: Path, seconds: int, *, video: bool = True, audio: bool = True) -> Path:
    """A clip from ffmpeg's test sources (a test card and a sine tone), in MPEG-4 Part 2 and AAC."""
    inputs: list[str] = []
    if video:
        inputs += ["-f", "lavfi", "-i", f"testsrc=duration={seconds}:size=640x360:rate=25"]
    if audio:
        inputs += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}"]
    codecs = (["-c:v", "mpeg4", "-q:v", "5"] if video else []) + (["-c:a", "aac"] if audio else [])
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *inputs, *codecs, str(path)],
                   check=True, timeout=60)
    return path


@pytest.fixture(scope="session")
def clips(ffmpeg: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    return {
        "clip": make_clip(folder / "clip.mp4", 10),
        "long": make_clip(folder / "long.mp4", 20),  # slow to convert at quality=best: it is still running when stopped
        "audio": make_clip(folder / "audio.mp4", 2, video=False),
    }


def probe(path: Path) -> dict[str, Any]:
    """``{"duration": seconds, "video": codec, "audio": codec}`` as ffprobe reads them."""
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration:stream=codec_type,codec_name",
                          "-of", "json", str(path)], check=True, capture_output=True, timeout=30).stdout
    probed = json.loads(out)
    codecs = {s["codec_type"]: s["codec_name"] for s in probed["streams"]}
    return {"duration": float(probed["format"]["duration"]), "video": codecs.get("video"), "audio": codecs.get("audio")}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ffmpeg_processes(marker: Path) -> list[int]:
    """Live ffmpeg and ffprobe processes with ``marker`` in their command line (this test's tmp_path)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if Path(os.fsdecode(argv[0])).name in ("ffmpeg", "ffprobe") and any(os.fsencode(marker) in a for a in argv):
            found.append(int(entry.name))
    return found


def outputs_left(root: Path, job_id: str) -> list[Path]:
    """The handler's output files, and the attempt's work folder, wherever they are under ``root``."""
    return [p for p in root.rglob("*") if p.name.startswith("converted.") or p.name.startswith(f"{job_id}.")]


# -- the server and the protocol ----------------------------------------------------------------

@pytest.fixture
def video_server(server_factory: Callable[..., ServerProcess], ffmpeg: None,
                 tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """`asyncjobs serve` as the example's README runs it: its config.toml, its folder on PYTHONPATH."""

    def start(config: Path = EXAMPLE / "config.toml") -> ServerProcess:
        return server_factory("--config", str(config), env={"PYTHONPATH": str(EXAMPLE)})

    yield start
    # A failed test leaves its server SIGKILLed, and an ffmpeg whose server died keeps encoding: stop it.
    for pid in ffmpeg_processes(tmp_path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def put_video(http: aiohttp.ClientSession, server: ServerProcess, clip: Path, query: str) -> dict[str, Any]:
    """Upload ``clip`` as the raw body of the task's own route, as `curl -T` does."""
    with clip.open("rb") as body:
        async with http.put(f"{server.url}/videos/{clip.stem}?{query}", data=body,
                            headers={"Content-Type": "video/mp4"}, timeout=HTTP_TIMEOUT) as resp:
            assert resp.status == 202, await resp.text()
            return await resp.json()


async def post_video(http: aiohttp.ClientSession, url: str, clip: Path, params: dict[str, Any],
                     content_type: str = "video/mp4") -> dict[str, Any]:
    """Submit with multipart/form-data to POST /jobs, as `curl -F job=...;type=application/json -F video=@...` does."""
    with clip.open("rb") as body:
        form = aiohttp.FormData()
        form.add_field("job", json.dumps({"task": "convert", "params": params}), content_type="application/json")
        form.add_field("video", body, filename=clip.name, content_type=content_type)
        async with http.post(f"{url}/jobs", data=form, timeout=HTTP_TIMEOUT) as resp:
            assert resp.status == 202, await resp.text()
            return await resp.json()


async def job_events(http: aiohttp.ClientSession, server: ServerProcess, job_id: str) -> AsyncIterator[dict[str, Any]]:
    """The job bodies of the job's Server-Sent Events stream, to its end."""
    async with http.get(f"{server.url}/jobs/{job_id}/events", timeout=HTTP_TIMEOUT) as resp:
        assert resp.status == 200, await resp.text()
        data: list[str] = []
        async for raw in resp.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("data:"):
                data.append(line[5:].lstrip())
            elif not line and data:
                yield json.loads("\n".join(data))
                data = []


async def finished(http: aiohttp.ClientSession, url: str, job_id: str) -> dict[str, Any]:
    """The job once terminal, by long polls on its monitor."""
    async with asyncio.timeout(JOB_TIMEOUT_S):
        while True:
            async with http.get(f"{url}/jobs/{job_id}?wait=10&redirect=false", timeout=HTTP_TIMEOUT) as resp:
                job = await resp.json()
            if job["status"] in TERMINAL:
                return job


async def download(http: aiohttp.ClientSession, server: ServerProcess, job_id: str, to: Path) -> aiohttp.ClientResponse:
    async with http.get(f"{server.url}/jobs/{job_id}/result", timeout=HTTP_TIMEOUT) as resp:
        assert resp.status == 200, await resp.text()
        to.write_bytes(await resp.read())
        return resp


def fraction_of(job: dict[str, Any]) -> float | None:
    return (job.get("progress") or {}).get("fraction")


# -- the tests ------------------------------------------------------------------------------------

async def test_raw_upload_converts_to_webm_with_rising_progress(video_server, http, clips, tmp_path: Path):
    """`curl -T clip.mp4 .../videos/clip?format=webm`, SSE to the end, then `curl -OJ .../result`: a VP9 WebM."""
    server = video_server()
    clip = clips["clip"]
    job = await put_video(http, server, clip, "format=webm&quality=good")
    assert job["task"] == "convert"
    assert job["files"]["inputs"]["video"]["sha256"] == sha256_of(clip)

    states = [state async for state in job_events(http, server, job["id"])]
    assert states[-1]["status"] == "succeeded", states[-1]
    fractions = [f for f in map(fraction_of, states) if f is not None]
    assert any(0 < f < 1 for f in fractions), f"no progress between 0 and 1 was seen: {fractions}"
    assert fractions == sorted(fractions), f"progress went down: {fractions}"

    resp = await download(http, server, job["id"], tmp_path / "clip.webm")
    assert resp.headers["Content-Type"] == "video/webm"
    assert 'filename="clip.webm"' in resp.headers["Content-Disposition"]
    converted = probe(tmp_path / "clip.webm")
    assert (converted["video"], converted["audio"]) == ("vp9", "opus")
    assert abs(converted["duration"] - probe(clip)["duration"]) < 0.5


async def test_multipart_upload_converts_to_mp4(video_server, http, clips, tmp_path: Path):
    """`curl -F job=...;type=application/json -F video=@clip.mp4 .../jobs` with format=mp4: H.264 and AAC."""
    server = video_server()
    clip = clips["clip"]
    job = await post_video(http, server.url, clip, {"format": "mp4"})
    done = await finished(http, server.url, job["id"])
    assert done["status"] == "succeeded", done
    assert done["files"]["result"]["content_type"] == "video/mp4"

    resp = await download(http, server, job["id"], tmp_path / "out.mp4")
    assert 'filename="clip.mp4"' in resp.headers["Content-Disposition"]
    converted = probe(tmp_path / "out.mp4")
    assert (converted["video"], converted["audio"]) == ("h264", "aac")
    assert abs(converted["duration"] - probe(clip)["duration"]) < 0.5


async def test_cancel_kills_ffmpeg_and_leaves_no_output(video_server, http, clips, tmp_path: Path):
    """A cancel while ffmpeg encodes: the job is canceled, ffmpeg is gone, its partial output too."""
    server = video_server()
    job = await put_video(http, server, clips["long"], "format=webm&quality=best")
    pids = await eventually(lambda: ffmpeg_processes(tmp_path), "ffmpeg to run", timeout_s=JOB_TIMEOUT_S)
    await eventually(lambda: any(tmp_path.rglob("converted.webm")), "ffmpeg to write its output")

    async with http.post(f"{server.url}/jobs/{job['id']}/cancel", timeout=HTTP_TIMEOUT) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["status"] == "canceled"
    assert ffmpeg_processes(tmp_path) == [], f"ffmpeg outlived its job (it was {pids})"
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    await eventually(lambda: not outputs_left(tmp_path, job["id"]), "the attempt's output to be removed", 5)
    assert (await finished(http, server.url, job["id"]))["status"] == "canceled"


async def test_timeout_kills_ffmpeg_and_fails_the_job(video_server, http, clips, tmp_path: Path):
    """`[tasks.convert] timeout = 1`: the job fails as "timeout", and ffmpeg and its output are gone."""
    config = tmp_path / "timeout.toml"
    config.write_text(f"[tasks]\nmodules = {json.dumps(MODULES)}\n[tasks.convert]\ntimeout = 1\n")
    server = video_server(config)
    job = await put_video(http, server, clips["long"], "format=webm&quality=best")
    await eventually(lambda: ffmpeg_processes(tmp_path), "ffmpeg to run", timeout_s=JOB_TIMEOUT_S)

    done = await finished(http, server.url, job["id"])
    assert done["status"] == "failed" and done["error"]["type"] == "timeout", done
    assert ffmpeg_processes(tmp_path) == []
    await eventually(lambda: not outputs_left(tmp_path, job["id"]), "the attempt's output to be removed", 5)


async def test_uploads_that_are_no_video_fail_clearly(video_server, http, clips, tmp_path: Path):
    """An audio-only file and a file that is no media at all: failed, "invalid_video", saying why."""
    server = video_server()
    not_media = tmp_path / "notes.mp4"
    not_media.write_bytes(b"this is not a video\n" * 100)
    audio = await post_video(http, server.url, clips["audio"], {}, content_type="application/octet-stream")
    junk = await post_video(http, server.url, not_media, {})

    audio_done = await finished(http, server.url, audio["id"])
    assert audio_done["status"] == "failed", audio_done
    assert audio_done["error"] == {"type": "invalid_video", "message": "the upload has no video stream"}
    junk_done = await finished(http, server.url, junk["id"])
    assert junk_done["status"] == "failed", junk_done
    assert junk_done["error"]["type"] == "invalid_video"
    assert junk_done["error"]["message"].startswith("ffprobe cannot read the upload: ")
    assert "Invalid data found" in junk_done["error"]["message"]


async def test_a_failing_ffmpeg_fails_the_job_with_its_last_words(make_client, clips, monkeypatch, tmp_path: Path):
    """ffmpeg exiting non-zero (here: a setting it refuses) fails the job as "ffmpeg" with its stderr's last lines."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import videotasks

    webm = videotasks.PROFILES["webm"]
    monkeypatch.setitem(videotasks.PROFILES, "webm", dataclasses.replace(
        webm, speeds={**webm.speeds, "fast": ("-deadline", "whenever")}))
    client, _ = await make_client(tasks={"modules": MODULES}, queue={"shutdown_grace": 1})
    url = str(client.make_url("/")).rstrip("/")  # the in-process App behind aiohttp's test server
    job = await post_video(client.session, url, clips["clip"], {"format": "webm"})
    done = await finished(client.session, url, job["id"])
    assert done["status"] == "failed", done
    assert done["error"]["type"] == "ffmpeg"
    assert done["error"]["message"].startswith("ffmpeg exited with status ")
    assert "deadline" in done["error"]["message"], done["error"]
    assert ffmpeg_processes(tmp_path) == []
    await eventually(lambda: not outputs_left(tmp_path, job["id"]), "the attempt's output to be removed", 5)
