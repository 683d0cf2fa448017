"""The client command line: ``asyncjobs submit|status|wait|result|cancel|delete|list|tasks``.

Files: ``submit TASK name=@path`` sends a file param (as ``curl -F``); ``-o PATH`` writes the result to a
file (an interrupted download to the same PATH resumes). Without ``-o`` a file result goes to stdout
when stdout is not a terminal, else to a file in the current folder named as the server says.

Exit status: 0 done (the job succeeded), 1 the job failed, was canceled or does not exist,
2 usage error (including params the server refused), 3 cannot reach the server, unauthorized or
forbidden, the server busy or failing (503, other 5xx), or not an asyncjobs server, 4 timeout,
5 too many requests (over the caller's quota or submit rate: nothing was submitted; the message says
when to try again), 130 interrupted (the job keeps running).

A submit that the server answers with an equal earlier job (a task that reuses equal requests)
prints that job's id, and says so on stderr; ``submit --fresh`` asks for a new job all the same.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TextIO

from .. import codec
from . import rules
from .aio import Client
from .errors import (
    BadRequest,
    ClientError,
    ProblemError,
    ProtocolError,
    ServerBusy,
    ServerError,
    Timeout,
    TooManyRequests,
    TransportError,
    Unauthorized,
)
from .rules import JobState
from .transfer import BinaryWriter, Download

EXIT_OK, EXIT_JOB, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
EXIT_TOO_MANY = 5
COMMANDS = ("submit", "status", "wait", "result", "cancel", "delete", "list", "tasks")
DEFAULT_URL = "http://127.0.0.1:8080"
TICK_S = 0.5  # how often a live progress bar is redrawn (the ETA counts down between events)
BYTES_REDRAW_S = 0.1  # at most this often for a transfer, which reports every chunk


class UsageError(Exception):
    """The command line is wrong; the message says how."""


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line, and where only exact option names are options.

    Job ids are URL-safe base64 and may begin with ``-``: anything that is not exactly one of the
    options (or ``--option=value``) is an argument, so ``asyncjobs wait -x3Fq…`` works.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Raise instead of printing usage and exiting, so the message is one line."""
        raise UsageError(f"{message} (see: {self.prog} --help)")

    def _parse_optional(self, arg_string: str) -> Any:
        if arg_string.split("=", 1)[0] not in self._option_string_actions:
            return None  # not one of our options: an argument (a job id may start with "-")
        return super()._parse_optional(arg_string)


# -- the command line ----------------------------------------------------------------------

def _common() -> _Parser:
    """Options every command takes, before or after its name."""
    common = _Parser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--url", help=f"the service (default: $ASYNCJOBS_URL, else {DEFAULT_URL})")
    common.add_argument("--token", help="bearer token (default: $ASYNCJOBS_TOKEN)")
    common.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return common


RESULT_HELP = ("The result is printed: JSON as JSON, text as it is. A file result goes to stdout when stdout "
               "is not a terminal, else to a file in the current folder named as the server says (never "
               "overwriting one). With -o PATH the result goes to PATH ('-': stdout); run the same command "
               "again after an interruption and the download resumes where it stopped.")


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The command line read by ``parser``, where a submit's ``key=value`` pairs may also follow its options
    (argparse takes a positional list only from before the first option)."""
    args, extra = parser.parse_known_args(argv)
    if args.command == "submit":
        args.pairs += [a for a in extra if "=" in a]
        extra = [a for a in extra if "=" not in a]
        misspelled = [a.split("=", 1)[0] for a in args.pairs if a.startswith("--")]
        if misspelled:  # no param is named so: an option mistyped (--priorty=5) must not become one
            parser.error(f"unrecognized option: {misspelled[0]}")
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def build_parser() -> argparse.ArgumentParser:
    """The client's argument parser: common options, then one subcommand per command."""
    common = _common()
    parser = _Parser(prog="asyncjobs", parents=[common],
                     description="Submit and follow jobs of an asyncjobs service.",
                     epilog="exit status: 0 succeeded, 1 job failed/canceled/not found, "
                            "2 usage error or params refused, 3 cannot reach the server, unauthorized, "
                            "server busy or failing, or not asyncjobs, 4 timeout, 5 too many requests "
                            "(over quota or rate; try again later), 130 interrupted")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    submit = commands.add_parser("submit", parents=[common], help="submit a job",
                                 description="Submit TASK with params key=value (values are JSON when they "
                                             "parse as JSON, else strings) or --params JSON. key=@path sends "
                                             "the file at path as the file param key (as curl -F).",
                                 epilog=RESULT_HELP)
    submit.add_argument("task")
    submit.add_argument("pairs", nargs="*", metavar="key=value|key=@file")
    submit.add_argument("--params", help="params as a JSON object (key=value pairs are merged over it)")
    submit.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    submit.add_argument("--delay", type=float, help="seconds before the job may run")
    submit.add_argument("--idempotency-key", help="repeat a submit safely with the same key")
    submit.add_argument("--fresh", action="store_true",
                        help="always a new job, even where the task would reuse an equal earlier one")
    submit.add_argument("--wait", action="store_true", help="follow the job and print its result")
    _wait_options(submit)
    _output_option(submit)
    for name, text in (("status", "show a job"), ("wait", "follow a job, then print its result"),
                       ("result", "print a job's result"), ("cancel", "cancel a job"),
                       ("delete", "cancel a job if needed, then forget it")):
        epilog = RESULT_HELP if name in ("wait", "result") else None
        command = commands.add_parser(name, parents=[common], help=text, description=text, epilog=epilog)
        command.add_argument("id", metavar="ID")
        if name == "wait":
            _wait_options(command)
        if name == "result":
            command.add_argument("--quiet", "-q", action="store_true", help="no progress output")
        if name in ("wait", "result"):
            _output_option(command)
    listing = commands.add_parser("list", parents=[common], help="list jobs, newest first")
    listing.add_argument("--status", choices=rules.STATUSES)
    listing.add_argument("--task")
    listing.add_argument("--limit", type=int, help="show at most this many")
    commands.add_parser("tasks", parents=[common], help="list the registered tasks")
    return parser


def _wait_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, help="give up waiting after this many seconds (exit 4)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress output")


def _output_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", metavar="PATH", help="write the result to PATH ('-' for stdout)")


def parse_params(pairs: Sequence[str], params_json: str | None) -> dict[str, Any]:
    """Params from ``--params JSON`` and ``key=value`` pairs; a value is JSON if it parses, else a string."""
    params: dict[str, Any] = {}
    if params_json is not None:
        try:
            params = codec.loads(params_json)
        except codec.JSONDecodeError:
            raise UsageError("--params is not valid JSON") from None
        if not isinstance(params, dict):
            raise UsageError("--params must be a JSON object")
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"expected key=value, got {pair!r}")
        try:
            params[key] = codec.loads(value)
        except codec.JSONDecodeError:
            params[key] = value
    return params


def split_files(pairs: Sequence[str]) -> tuple[list[str], dict[str, Path]]:
    """The ``key=@path`` pairs (file params, each checked to be a readable file) apart from the others."""
    rest: list[str] = []
    files: dict[str, Path] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not (sep and key and value.startswith("@")):
            rest.append(pair)
            continue
        if value == "@":
            raise UsageError(f"{pair}: a file path must follow @")
        path = Path(value[1:]).expanduser()
        if not path.is_file() or not os.access(path, os.R_OK):
            reason = "not a readable file" if path.exists() else "no such file"
            raise UsageError(f"{key}=@{value[1:]}: {reason}")
        files[key] = path
    return rest, files


@dataclass(frozen=True)
class Settings:
    url: str
    token: str | None
    json: bool


def settings_of(args: argparse.Namespace, env: Mapping[str, str]) -> Settings:
    """Flags first, then ``ASYNCJOBS_URL`` / ``ASYNCJOBS_TOKEN``, then the default."""
    url = getattr(args, "url", None) or env.get("ASYNCJOBS_URL") or DEFAULT_URL
    token = getattr(args, "token", None) or env.get("ASYNCJOBS_TOKEN") or None
    return Settings(url=url, token=token, json=bool(getattr(args, "json", False)))


# -- what to say --------------------------------------------------------------------------------

def exit_status(error: BaseException) -> int:
    """The exit status for an error (see the module docstring)."""
    if isinstance(error, (UsageError, BadRequest)):
        return EXIT_USAGE
    if isinstance(error, Timeout):
        return EXIT_TIMEOUT
    if isinstance(error, TooManyRequests):
        return EXIT_TOO_MANY
    if isinstance(error, (TransportError, ProtocolError, Unauthorized, ServerBusy, ServerError)):
        return EXIT_UNREACHABLE
    return EXIT_JOB


def error_line(error: BaseException, url: str) -> str:
    """One line saying what went wrong, for stderr."""
    if isinstance(error, UsageError):
        return f"asyncjobs: usage: {error}"
    if isinstance(error, TransportError):
        return f"asyncjobs: cannot reach the server at {url}: {error}"
    if isinstance(error, Unauthorized):
        return f"asyncjobs: unauthorized ({error}); give a valid --token or set ASYNCJOBS_TOKEN"
    if isinstance(error, TooManyRequests):
        later = f"; retry in {error.retry_after} s" if error.retry_after is not None else "; retry later"
        return f"asyncjobs: too many requests: {error.detail or error}{later}"
    if isinstance(error, BadRequest) and error.errors:
        fields = "; ".join(f"{e.get('field')}: {e.get('message')}" for e in error.errors)
        return f"asyncjobs: refused: {error.detail or error} ({fields})"
    if isinstance(error, ProblemError):
        return f"asyncjobs: {error.detail or error}"
    if isinstance(error, ClientError):
        return f"asyncjobs: {error}"
    if isinstance(error, OSError) and error.strerror:  # a local file: unreadable, no space left ...
        where = f"{error.filename}: " if error.filename else ""
        return f"asyncjobs: {where}{error.strerror}"
    return f"asyncjobs: unexpected error: {type(error).__name__}: {error}"


def duration(seconds: float) -> str:
    """A short human duration: ``4s``, ``2m05s``, ``1h02m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def describe(state: JobState, now: datetime, *, percent: bool = True) -> str:
    """The state in words: ``running 40% step 4 of 10, eta 3s``."""
    parts = [state.status]
    if state.status == "queued" and state.queue_position is not None:
        parts.append(f"(position {state.queue_position})")
    if percent and state.fraction is not None and not state.terminal:
        parts.append(f"{state.fraction:.0%}")
    if state.message and not state.terminal:
        parts.append(state.message)
    if state.error:
        parts.append(f"{state.error.get('type')}: {state.error.get('message')}")
    text = " ".join(parts)
    if state.eta is not None and not state.terminal:
        left = (state.eta - now).total_seconds()
        text += f", eta {duration(left)}" if left >= 0.5 else ", eta any moment"
    return text


def size_text(count: float) -> str:
    """A short human size: ``512 B``, ``4.0 KiB``, ``12.3 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def render_transfer(label: str, done: int, total: int | None, rate: float | None, width: int) -> str:
    """A one-line bar for bytes on the move: ``[####------]  40% 4.0 MiB/10.0 MiB  2.0 MiB/s, eta 3s  clip.mp4``."""
    cells = max(10, min(30, width // 4))
    fraction = None if not total else min(1.0, done / total)
    filled = round(cells * (fraction or 0.0))
    percent = "  --%" if fraction is None else f"{fraction:5.0%}"
    amount = size_text(done) + ("" if total is None else f"/{size_text(total)}")
    speed = "" if rate is None else f"  {size_text(rate)}/s"
    if rate and total is not None and done < total:
        speed += f", eta {duration((total - done) / rate)}"
    line = f"[{'#' * filled}{'-' * (cells - filled)}] {percent} {amount}{speed}  {label}"
    return line[:max(20, width - 1)]


def render_bar(state: JobState, now: datetime, width: int) -> str:
    """A one-line progress bar for a terminal: ``[#####-----]  50% step 5 of 10, eta 4s``."""
    cells = max(10, min(30, width // 4))
    done = round(cells * min(1.0, max(0.0, state.fraction or 0.0)))
    percent = "  --%" if state.fraction is None else f"{state.fraction:5.0%}"
    line = f"[{'#' * done}{'-' * (cells - done)}] {percent} {describe(state, now, percent=False)}"
    return line[:max(20, width - 1)]


# -- output ------------------------------------------------------------------------------------

@dataclass
class Console:
    """Where output goes: results on stdout, progress and errors on stderr."""

    out: TextIO
    err: TextIO
    json: bool = False
    live: bool = False  # stderr is a terminal: draw a progress bar in place
    bar_open: bool = field(default=False, init=False)

    def print(self, text: str) -> None:
        """A line on stdout."""
        self.out.write(text + "\n")
        self.out.flush()

    def print_json(self, value: Any) -> None:
        """Compact JSON on one line of stdout."""
        self.print(codec.dumps(value).decode())

    def print_result(self, value: Any) -> None:
        """A string result as it is, bytes raw, anything else as indented JSON."""
        if isinstance(value, bytes):
            self.out.flush()
            buffer = getattr(self.out, "buffer", None)
            if buffer is not None:
                buffer.write(value)
                buffer.flush()
            else:
                self.out.write(value.decode(errors="replace"))
        elif isinstance(value, str) and not self.json:
            self.print(value)
        else:
            self.print(codec.dumps_pretty(value).decode() if not self.json else codec.dumps(value).decode())

    def note(self, text: str) -> None:
        """A line on stderr (after ending a progress bar that is on screen)."""
        self.end_bar()
        self.err.write(text + "\n")
        self.err.flush()

    def bar(self, text: str) -> None:
        """Redraw the progress bar in place (a terminal only)."""
        self.err.write("\r\x1b[K" + text)
        self.err.flush()
        self.bar_open = True

    def end_bar(self) -> None:
        """Leave the bar's line, so what follows starts on a line of its own."""
        if self.bar_open:
            self.err.write("\n")
            self.err.flush()
            self.bar_open = False


class Progress:
    """Shows a job's states as they arrive: a live bar on a terminal, else a line per change."""

    def __init__(self, console: Console, *, quiet: bool) -> None:
        self.console = console
        self.quiet = quiet
        self.state: JobState | None = None
        self.shown = ""

    def update(self, state: JobState) -> None:
        """Show a new state: redraw the bar, or print a line if it says something new."""
        self.state = state
        if self.quiet:
            return
        if self.console.live:
            self.draw()
            return
        line = f"{state.id} {describe(state, _now())}"
        if line != self.shown:
            self.shown = line
            self.console.note(line)

    def draw(self) -> None:
        """Redraw the bar from the last state (the ETA moves on with the clock)."""
        if self.state is not None and not self.quiet:
            width = _terminal_width(self.console.err)
            self.console.bar(render_bar(self.state, _now(), width))

    async def tick(self) -> None:
        """Redraw the bar every ``TICK_S`` so the ETA counts down between events (cancelled at the end)."""
        while True:
            await asyncio.sleep(TICK_S)
            self.draw()


class ByteProgress:
    """Shows a transfer as it goes: a live bar on a terminal (bytes, rate, ETA); nothing otherwise."""

    def __init__(self, console: Console, label: str, *, quiet: bool) -> None:
        self.console = console
        self.label = label
        self.shown = console.live and not quiet
        self.started: tuple[float, int] | None = None  # (when, bytes already there): the rate counts from here
        self.drawn_at = 0.0

    def __call__(self, done: int, total: int | None) -> None:
        """A progress report from the client: redraw, at most every ``BYTES_REDRAW_S`` (and at the end)."""
        now = time.monotonic()
        if self.started is None or done < self.started[1]:  # the first report, or a retry from the start
            self.started = (now, done)
        if not self.shown or (now - self.drawn_at < BYTES_REDRAW_S and done != total):
            return
        self.drawn_at = now
        elapsed = now - self.started[0]
        rate = (done - self.started[1]) / elapsed if elapsed > 0.2 else None
        self.console.bar(render_transfer(self.label, done, total, rate, _terminal_width(self.console.err)))

    def close(self) -> None:
        """The transfer is over: what follows goes on a line of its own."""
        self.console.end_bar()


def _terminal_width(stream: TextIO) -> int:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        columns = os.get_terminal_size(stream.fileno()).columns
        if columns >= 20:  # a pseudo-terminal without a size says 0
            return columns
    return 80


def _now() -> datetime:
    return datetime.now(UTC)


# -- the commands ------------------------------------------------------------------------------

@dataclass
class Run:
    """What one invocation knows so far (the job id, for the message when it is interrupted)."""

    args: argparse.Namespace
    settings: Settings
    console: Console
    job_id: str | None = None
    saving: tuple[str, str] | None = None  # (job id, file) being downloaded, for the message on an interrupt

    def show(self, value: Any, line: str) -> None:
        """``value`` as JSON with ``--json``, else the human ``line``."""
        if self.settings.json:
            self.console.print_json(value)
        else:
            self.console.print(line)


async def follow(client: Client, job: JobState | str, run: Run) -> int:
    """Show the job's progress until it ends; print its result (0) or say why there is none (1)."""
    quiet = bool(getattr(run.args, "quiet", False))
    progress = Progress(run.console, quiet=quiet)
    ticker = asyncio.create_task(progress.tick()) if run.console.live and not quiet else None
    final: JobState | None = None
    try:
        async with contextlib.aclosing(client.events(job, timeout=run.args.timeout)) as states:
            async for final in states:
                progress.update(final)
    finally:
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        run.console.end_bar()
    assert final is not None
    failure = rules.job_error(final)
    if run.settings.json:
        run.console.print_json(final.raw)
    if failure is None and (getattr(run.args, "output", None) is not None or not run.settings.json):
        await deliver(client, final, run)
    if failure is not None:
        raise failure
    return EXIT_OK


async def deliver(client: Client, job: JobState | str, run: Run) -> Download | None:
    """Put the finished job's result where it belongs: ``-o PATH``; for a file result stdout (not a
    terminal) or a file named as the server says; else printed. Returns the download, if there was one.

    ``job`` may be a bare id only with ``-o``: otherwise its state says whether the result is a file.
    """
    output = getattr(run.args, "output", None)
    if output is None and isinstance(job, JobState) and job.result_file is None:
        run.console.print_result(await client.result(job))
        return None
    if output == "-" or (output is None and not _isatty(run.console.out)):
        return await download(client, job, run, None, label="stdout")
    if output is not None:
        path = Path(output)
    else:
        assert isinstance(job, JobState)  # a bare id comes only with -o
        path = _server_named(job)
    saved = await download(client, job, run, path, label=str(path))
    if output is None and not bool(getattr(run.args, "quiet", False)):
        run.console.note(f"saved {path} ({size_text(saved.size)})")
    return saved


def _server_named(job: JobState) -> Path:
    """The current folder's file named after the result, as the server names it; never one that exists."""
    info = job.result_file or {}
    name = rules.safe_filename(info.get("name") if isinstance(info.get("name"), str) else None)
    path = Path(name or f"{job.id}.result")
    if path.exists():
        raise UsageError(f"{path} exists; give -o PATH to say where the result goes")
    return path


async def download(client: Client, job: JobState | str, run: Run, path: Path | None, *, label: str) -> Download:
    """Download the result into ``path`` (None: stdout), with a byte progress bar on a terminal."""
    progress = ByteProgress(run.console, label, quiet=bool(getattr(run.args, "quiet", False)))
    run.saving = None if path is None else (job.id if isinstance(job, JobState) else job, str(path))
    try:
        return await client.download(job, _stdout_bytes(run.console.out) if path is None else path,
                                     progress=progress)
    finally:
        progress.close()


def _stdout_bytes(out: TextIO) -> BinaryWriter:
    """The binary side of stdout (a text-only stream, as in tests, gets the bytes decoded as UTF-8)."""
    out.flush()
    buffer = getattr(out, "buffer", None)
    return buffer if buffer is not None else _TextBytes(out)


class _TextBytes:
    """A binary writer onto a text stream, decoding UTF-8 across chunk boundaries."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, data: bytes) -> int:
        self.out.write(self.decoder.decode(data))
        return len(data)

    def flush(self) -> None:
        self.out.write(self.decoder.decode(b"", final=True))
        self.out.flush()


async def cmd_submit(client: Client, run: Run) -> int:
    """``submit TASK [key=value|key=@file …]``: print the id, or with ``--wait`` follow the job."""
    args = run.args
    if args.output is not None and not args.wait:
        raise UsageError("-o/--output needs --wait (or use: asyncjobs result ID -o PATH)")
    pairs, files = split_files(args.pairs)
    params = parse_params(pairs, args.params)
    progress = ByteProgress(run.console, "uploading " + ", ".join(p.name for p in files.values()),
                            quiet=bool(args.quiet))
    try:
        job = await client.submit(args.task, params, priority=args.priority, delay=args.delay,
                                  idempotency_key=args.idempotency_key, files=dict(files) or None,
                                  progress=progress if files else None, fresh=args.fresh)
    finally:
        progress.close()
    run.job_id = job.id
    if job.reused and not args.quiet:
        run.console.note(f"asyncjobs: reused the equal job {job.id} ({job.status}); --fresh for a new one")
    if args.wait:
        return await follow(client, job, run)
    run.show(job.raw, job.id)
    return EXIT_OK


async def cmd_status(client: Client, run: Run) -> int:
    """``status ID``: one line describing the job (or the job as JSON)."""
    job = await client.get(run.args.id)
    run.show(job.raw, f"{job.id} {job.task} {describe(job, _now())}")
    return EXIT_OK


async def cmd_wait(client: Client, run: Run) -> int:
    """``wait ID``: follow the job, then print its result."""
    run.job_id = run.args.id
    return await follow(client, run.args.id, run)


async def cmd_result(client: Client, run: Run) -> int:
    """``result ID``: print the result (bytes as they are), or write a file result (see ``deliver``)."""
    job: JobState | str = run.args.id
    if run.args.output is None:  # only the job says whether its result is a file
        job = await client.get(run.args.id)
        if job.status != "succeeded" or job.result_file is None:
            run.console.print_result(await client.result(job))  # or the reason there is none
            return EXIT_OK
    saved = await deliver(client, job, run)
    if saved is not None and saved.path is not None and run.settings.json:
        run.console.print_json(_download_json(saved))
    return EXIT_OK


def _download_json(saved: Download) -> dict[str, Any]:
    return {"path": str(saved.path), "size": saved.size, "sha256": saved.sha256,
            "content_type": saved.content_type, "name": saved.name}


async def cmd_cancel(client: Client, run: Run) -> int:
    """``cancel ID``: cancel it, and say whether it has stopped."""
    job = await client.cancel(run.args.id)
    run.show(job.raw, f"{job.id} {job.status}" + ("" if job.terminal else " (stopping)"))
    return EXIT_OK


async def cmd_delete(client: Client, run: Run) -> int:
    """``delete ID``: cancel it if needed and forget it."""
    await client.delete(run.args.id)
    run.show({"id": run.args.id, "deleted": True}, f"{run.args.id} deleted")
    return EXIT_OK


async def cmd_list(client: Client, run: Run) -> int:
    """JSON lines with ``--json``; otherwise a line per job."""
    shown = 0
    async with contextlib.aclosing(client.list(status=run.args.status, task=run.args.task)) as jobs:
        async for job in jobs:
            if run.args.limit is not None and shown >= run.args.limit:
                break
            shown += 1
            if run.settings.json:
                run.console.print_json(job.raw)
            else:
                created = f"{job.created_at:%Y-%m-%d %H:%M:%S}" if job.created_at else "-"
                run.console.print(f"{job.id}  {created}  {job.task}  {describe(job, _now())}")
    return EXIT_OK


async def cmd_tasks(client: Client, run: Run) -> int:
    """``tasks``: each registered task with the first line of its description."""
    tasks = await client.tasks()
    if run.settings.json:
        run.console.print_json(tasks)
        return EXIT_OK
    width = max((len(str(t.get("name"))) for t in tasks), default=0)
    for spec in tasks:
        first_line = (spec.get("description") or "").strip().splitlines()[:1]
        run.console.print(f"{spec.get('name')!s:<{width}}  {first_line[0] if first_line else ''}".rstrip())
    return EXIT_OK


HANDLERS = {"submit": cmd_submit, "status": cmd_status, "wait": cmd_wait, "result": cmd_result,
            "cancel": cmd_cancel, "delete": cmd_delete, "list": cmd_list, "tasks": cmd_tasks}


async def execute(run: Run) -> int:
    """Run the parsed command with a client that is closed afterwards."""
    try:
        client = Client(run.settings.url, token=run.settings.token)
    except ValueError as exc:
        raise UsageError(f"--url: {exc}") from None
    check_output(getattr(run.args, "output", None))
    async with client:
        return await HANDLERS[run.args.command](client, run)


def check_output(output: str | None) -> None:
    """A usage error, before anything is submitted or downloaded, for an ``-o`` that cannot be written."""
    if output is None or output == "-":
        return
    path = Path(output)
    if path.is_dir():
        raise UsageError(f"-o {output}: is a folder; name the file to write")
    if not path.parent.is_dir():
        raise UsageError(f"-o {output}: no folder {path.parent}")


def interrupted_line(run: Run) -> str:
    """What to say on Ctrl-C: the job, if there is one, keeps running; a download resumes if run again."""
    if run.saving is not None:
        job_id, path = run.saving
        return (f"asyncjobs: interrupted; the download of {path} resumes where it stopped "
                f"when run again (asyncjobs result {job_id} -o {path})")
    if run.job_id is None:
        return "asyncjobs: interrupted"
    return (f"asyncjobs: interrupted; job {run.job_id} keeps running on the server "
            f"(asyncjobs wait {run.job_id} to follow it, asyncjobs cancel {run.job_id} to stop it)")


def main(argv: Sequence[str] | None = None, *, env: Mapping[str, str] | None = None,
         stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run one client command; returns the exit status. Errors are one line on stderr, never a traceback."""
    out, err = stdout or sys.stdout, stderr or sys.stderr
    env = os.environ if env is None else env
    try:
        args = parse_args(build_parser(), list(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        err.write(error_line(exc, "") + "\n")
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    settings = settings_of(args, env)
    console = Console(out, err, json=settings.json, live=_isatty(err))
    run = Run(args, settings, console)
    try:
        return asyncio.run(execute(run))
    except KeyboardInterrupt:
        console.note(interrupted_line(run))
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())  # no second error at exit
        return EXIT_JOB
    except (ClientError, UsageError) as exc:
        console.note(error_line(exc, settings.url))
        return exit_status(exc)
    except Exception as exc:
        console.note(error_line(exc, settings.url))
        return EXIT_JOB


def _isatty(stream: TextIO) -> bool:
    with contextlib.suppress(AttributeError, ValueError):
        return stream.isatty()
    return False
