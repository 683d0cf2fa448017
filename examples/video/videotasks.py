"""An example task module: convert an uploaded video with ffmpeg, with progress, cancel and timeout."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from asyncjobs import FileResult, InputFile, TaskFailure, task

FFMPEG = "ffmpeg"
FFPROBE = "ffprobe"
STDERR_LINES = 8  # ffmpeg's last words, enough to say why it failed
PROGRESS_PERIOD_S = "0.25"  # how often ffmpeg writes a -progress block
# Only local files: a crafted upload (an HLS or SDP playlist) must not make ffmpeg fetch URLs.
INPUT_PROTOCOLS = ("-protocol_whitelist", "file")

Format = Literal["webm", "mp4"]
Quality = Literal["fast", "good", "best"]


@dataclass(frozen=True)
class Profile:
    """How ffmpeg encodes one output format."""

    muxer: str
    content_type: str
    codecs: tuple[str, ...]
    speeds: dict[str, tuple[str, ...]]  # by quality: slower encodes are smaller at the same quality


PROFILES: dict[str, Profile] = {
    "webm": Profile(
        muxer="webm", content_type="video/webm",
        codecs=("-c:v", "libvpx-vp9", "-row-mt", "1", "-crf", "32", "-b:v", "0", "-c:a", "libopus", "-b:a", "96k"),
        speeds={"fast": ("-deadline", "realtime", "-cpu-used", "8"),
                "good": ("-deadline", "good", "-cpu-used", "4"),
                "best": ("-deadline", "good", "-cpu-used", "0")},
    ),
    "mp4": Profile(
        muxer="mp4", content_type="video/mp4",
        # yuv420p (which needs even sizes) and faststart: what browsers and phones play, before it has all loaded.
        codecs=("-vf", "scale=trunc(iw/2)*2:trunc(ih/2)*2", "-c:v", "libx264", "-crf", "23", "-pix_fmt", "yuv420p",
                "-c:a", "aac", "-b:a", "128k", "-movflags", "+faststart"),
        speeds={"fast": ("-preset", "ultrafast"), "good": ("-preset", "medium"), "best": ("-preset", "slow")},
    ),
}


@task(route="PUT /videos/{name}", timeout=600, concurrency=2,
      accept={"video": ["video/*", "application/octet-stream"]})
async def convert(ctx: Any, video: InputFile, name: str = "", format: Format = "webm",
                  quality: Quality = "fast") -> FileResult:
    """Converts a video with ffmpeg to WebM (VP9 + Opus) or MP4 (H.264 + AAC); reports progress as it encodes."""
    profile = PROFILES[format]
    duration_s = await probe_duration(video.path)
    output = ctx.output_path(f"converted.{format}")
    await ctx.progress(0.0, "converting")
    await run_ffmpeg(ctx, ffmpeg_args(video.path, output, profile, quality), output, duration_s)
    return FileResult(output, content_type=profile.content_type, name=result_name(name or video.name, format))


def result_name(name: str, format: str) -> str:
    """The download's name: the upload's (or the route's ``{name}``) with the new extension."""
    stem = Path(Path(name).name).stem or "video"
    return f"{stem}.{format}"


def ffmpeg_args(source: Path, output: Path, profile: Profile, quality: str) -> list[str]:
    """First video stream and first audio stream (if any), nothing else; progress as key=value lines on stdout."""
    return [
        "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *INPUT_PROTOCOLS, "-i", str(source),
        "-map", "0:v:0", "-map", "0:a:0?", "-sn", "-dn",
        *profile.codecs, *profile.speeds[quality], "-f", profile.muxer,
        "-progress", "pipe:1", "-stats_period", PROGRESS_PERIOD_S, "-nostats", str(output),
    ]


# -- running ffmpeg and ffprobe -------------------------------------------------------------

@contextlib.asynccontextmanager
async def spawned(*argv: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run ``argv`` with its output piped; if the block is left early (cancel, timeout, error), kill it and reap it."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except FileNotFoundError:
        raise TaskFailure(f"{argv[0]} is not installed on the server", type=argv[0]) from None
    try:
        yield process
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        await process.wait()  # reaped before the job ends: no ffmpeg outlives a canceled job


async def probe_duration(path: Path) -> float | None:
    """The upload's duration in seconds (``None`` when it does not say); one that is no video fails the job."""
    argv = [FFPROBE, "-v", "error", *INPUT_PROTOCOLS, "-show_entries", "format=duration:stream=codec_type",
            "-of", "json", str(path)]
    async with spawned(*argv) as process:
        stdout, stderr = await process.communicate()
    if process.returncode != 0:
        raise TaskFailure(f"ffprobe cannot read the upload: {last_lines(stderr.decode(errors='replace').splitlines())}",
                          type="invalid_video")
    probed = json.loads(stdout)
    if not any(stream.get("codec_type") == "video" for stream in probed.get("streams", [])):
        raise TaskFailure("the upload has no video stream", type="invalid_video")
    return parse_duration(probed)


def parse_duration(probed: dict[str, Any]) -> float | None:
    try:
        duration = float(probed["format"]["duration"])
    except (ValueError, KeyError, TypeError):
        return None
    return duration if duration > 0 else None


async def run_ffmpeg(ctx: Any, args: list[str], output: Path, duration_s: float | None) -> None:
    """Run ffmpeg to the end, reporting its progress; a non-zero exit fails the job with ffmpeg's last lines."""
    stderr_tail: deque[str] = deque(maxlen=STDERR_LINES)
    try:
        async with spawned(FFMPEG, *args) as process:
            assert process.stdout is not None and process.stderr is not None
            await asyncio.gather(report_progress(ctx, process.stdout, duration_s),
                                 keep_tail(process.stderr, stderr_tail))
            code = await process.wait()
    except BaseException:
        output.unlink(missing_ok=True)  # a stopped ffmpeg leaves a partial file
        raise
    if code != 0:
        output.unlink(missing_ok=True)
        raise TaskFailure(f"ffmpeg exited with status {code}: {last_lines(stderr_tail)}", type="ffmpeg")


async def keep_tail(stream: asyncio.StreamReader, tail: deque[str]) -> None:
    """Read ``stream`` to its end (a full pipe would stall ffmpeg), keeping its last lines."""
    async for line in stream:
        if text := line.decode(errors="replace").strip():
            tail.append(text)


def last_lines(lines: Iterable[str]) -> str:
    return " / ".join(lines) or "no message"


# -- progress -----------------------------------------------------------------------------

@dataclass
class Progress:
    """ffmpeg's ``-progress`` output, one key=value line at a time; a ``progress=`` line ends each block."""

    duration_s: float | None
    out_time_s: float = 0.0
    speed: str = ""
    ended: bool = False

    def feed(self, line: str) -> bool:
        """Take one line; true when it ended a block (time to report)."""
        key, _, value = line.strip().partition("=")
        if key == "out_time_us":
            with contextlib.suppress(ValueError):  # "N/A" before the first frame
                self.out_time_s = max(self.out_time_s, int(value) / 1e6)  # never backwards
        elif key == "speed":
            self.speed = value.strip()
        elif key == "progress":
            self.ended = value.strip() == "end"
        return key == "progress"

    def fraction(self) -> float | None:
        if self.ended:
            return 1.0  # the last frame's time may fall short of the container's duration
        if self.duration_s is None:
            return None
        return round(min(self.out_time_s / self.duration_s, 1.0), 4)

    def message(self) -> str:
        total = f" of {self.duration_s:.1f}" if self.duration_s is not None else ""
        speed = f" at {self.speed}" if self.speed and self.speed != "N/A" else ""
        return f"converted {self.out_time_s:.1f}{total} s{speed}"


async def report_progress(ctx: Any, stdout: asyncio.StreamReader, duration_s: float | None) -> None:
    """Turn each ``-progress`` block into ``ctx.progress``; ends when ffmpeg closes its stdout."""
    progress = Progress(duration_s)
    async for line in stdout:
        if progress.feed(line.decode(errors="replace")):
            await ctx.progress(progress.fraction(), progress.message())
