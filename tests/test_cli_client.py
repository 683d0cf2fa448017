"""The client command line (`asyncjobs submit|status|wait|result|cancel|delete|list|tasks`) against a real server."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.server
import io
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import pytest

from asyncjobs import cli as server_cli
from asyncjobs import codec
from asyncjobs.client import SyncClient, cli
from asyncjobs.client.errors import (
    BadRequest,
    ConnectError,
    JobFailed,
    JobGone,
    NotFound,
    ProtocolError,
    RequestTimeout,
    ServerBusy,
    Unauthorized,
    WaitTimeout,
)
from asyncjobs.client.rules import JobState
from tests.conftest import ROOT, TEST_MODULES, ServerProcess

TOKEN = "a-token-of-16-chars-or-more"
RUN_TIMEOUT_S = 30


# -- helpers -----------------------------------------------------------------------------

def clean_env(**extra: str) -> dict[str, str]:
    """This environment without ASYNCJOBS_* settings, with the checkout importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCJOBS_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def config_text(extra: str = "") -> str:
    modules = ", ".join(f'"{m}"' for m in TEST_MODULES)
    return f"[tasks]\nmodules = [{modules}]\n[queue]\nshutdown_grace = 0.5\n{extra}"


def module_server(tmp_path_factory, name: str) -> Iterator[ServerProcess]:
    """One real `asyncjobs serve` process for a whole test module (each test uses its own jobs)."""
    tmp = tmp_path_factory.mktemp(name)
    config = tmp / "config.toml"
    config.write_text(config_text())
    proc = ServerProcess(tmp, tmp / "jobs.db", ["--config", str(config)], clean_env())
    proc.start()
    yield proc
    proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    yield from module_server(tmp_path_factory, "cli-server")


def run(*argv: str, url: str | None = None, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run the client command line in this process; returns (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    full_env = {} if url is None else {"ASYNCJOBS_URL": url}
    code = cli.main(list(argv), env={**full_env, **(env or {})}, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def spawn(*argv: str, **env: str) -> subprocess.CompletedProcess:
    """Run `python -m asyncjobs ARGV` as a real process."""
    return subprocess.run([sys.executable, "-m", "asyncjobs", *argv], capture_output=True, text=True,
                          env=clean_env(**env), timeout=RUN_TIMEOUT_S)


def assert_one_line(stderr: str, *words: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("asyncjobs: "), stderr
    for word in words:
        assert word in lines[0], stderr


@pytest.fixture
def api(server) -> Iterator[SyncClient]:
    with SyncClient(server.url) as client:
        yield client


class _Site(http.server.BaseHTTPRequestHandler):
    """A web server that is not asyncjobs: HTML pages, or JSON of another API."""

    kind = "html"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        if self.kind == "html":
            body, ctype = b"<!doctype html><html><body><h1>Welcome</h1></body></html>", "text/html"
        else:
            body, ctype = b'{"message": "hello from another API"}', "application/json"
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def other_site() -> Iterator[Any]:
    """Start a non-asyncjobs HTTP server of a given kind in a thread; returns its URL."""
    started: list[http.server.ThreadingHTTPServer] = []

    def start(kind: str) -> str:
        handler = type(f"{kind}Site", (_Site,), {"kind": kind})
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        started.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    yield start
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()


def digest(data: str, rounds: int) -> str:
    value = data.encode()
    for _ in range(rounds):
        value = hashlib.sha256(value).digest()
    return value.hex()


# -- pure parts --------------------------------------------------------------------------------

@pytest.mark.parametrize("pairs, params_json, expected", [
    ([], None, {}),
    (["seconds=2", "steps=4"], None, {"seconds": 2, "steps": 4}),
    (["message=boom", "flag=true", "none=null", "ratio=0.5"], None,
     {"message": "boom", "flag": True, "none": None, "ratio": 0.5}),
    (["data=\"123\"", "list=[1,2]", "eq=a=b"], None, {"data": "123", "list": [1, 2], "eq": "a=b"}),
    (["b=2"], '{"a": 1, "b": 1}', {"a": 1, "b": 2}),
])
def test_params_from_pairs_and_json(pairs, params_json, expected):
    """key=value values are JSON when they parse as JSON, else strings; pairs are merged over --params."""
    assert cli.parse_params(pairs, params_json) == expected


@pytest.mark.parametrize("pairs, params_json", [(["novalue"], None), (["=x"], None), ([], "{"), ([], "[1]")])
def test_bad_params_are_usage_errors(pairs, params_json):
    """A pair without `=`, or --params that is not a JSON object, is a usage error."""
    with pytest.raises(cli.UsageError):
        cli.parse_params(pairs, params_json)


@pytest.mark.parametrize("job_id", ["-n-NVCZzt2gTCJ-wEepFMQ", "--json-Zzt2gTCJ-wEepF", "-qZzt2gTCJ-wEepFMQ",
                                    "-h3Zzt2gTCJ-wEepFMQ", "--ur-Zzt2gTCJ-wEepFMQ", "plain_id"])
def test_job_ids_that_begin_with_a_dash_are_arguments(job_id):
    """Ids are URL-safe base64 and may begin with `-`; only exact option names are options."""
    for argv in (["wait", job_id, "--timeout", "2", "-q"], ["--json", "status", job_id],
                 ["result", "--url=http://h", job_id]):
        args = cli.build_parser().parse_args(argv)
        assert args.id == job_id
    assert cli.build_parser().parse_args(["submit", "echo", "-x=1", "--priority", "-5"]).priority == -5


@pytest.mark.parametrize("error, status", [
    (JobFailed("x"), 1), (NotFound("x", status=404), 1), (JobGone("x", status=410), 1),
    (cli.UsageError("x"), 2), (BadRequest("x", status=400), 2),
    (ConnectError("x"), 3), (ProtocolError("x"), 3), (Unauthorized("x", status=401), 3),
    (ServerBusy("x", status=503), 3), (WaitTimeout("x"), 4), (RequestTimeout("x"), 4),
])
def test_exit_status_of_each_error(error, status):
    """Each kind of error has its documented exit status."""
    assert cli.exit_status(error) == status


def test_progress_rendering():
    """The bar shows the fraction, the handler's message and the ETA; plain words do too; durations are short."""
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    state = JobState(id="j", status="running", fraction=0.4, message="resizing", eta=now + timedelta(seconds=3))
    bar = cli.render_bar(state, now, 80)
    assert bar.startswith("[") and "40%" in bar and "resizing" in bar and "eta 3s" in bar and len(bar) < 80
    assert cli.describe(state, now) == "running 40% resizing, eta 3s"
    queued = JobState(id="j", status="queued", queue_position=2)
    assert "--%" in cli.render_bar(queued, now, 80) and "position 2" in cli.describe(queued, now)
    assert [cli.duration(s) for s in (0.2, 59, 125, 3720)] == ["0s", "59s", "2m05s", "1h02m"]


# -- against a real server ------------------------------------------------------------------------

def test_submit_wait_prints_the_result_of_echo_sleep_and_hash(server):
    """`submit TASK key=value --wait` prints the result: JSON as JSON, a string as it is; exit 0."""
    code, out, err = run("submit", "echo", "a=1", "b=text", "--wait", url=server.url)
    assert code == 0 and codec.loads(out) == {"a": 1, "b": "text"}, err
    code, out, err = run("submit", "sleep", "--params", '{"seconds": 0.3, "steps": 2}', "--wait", url=server.url)
    assert code == 0 and codec.loads(out) == {"slept": 0.3}, err
    code, out, err = run("submit", "hash", "data=\"abc\"", "rounds=7", "--wait", "--priority", "3", url=server.url)
    assert code == 0 and out.strip() == digest("abc", 7), err
    # Pairs may also come after options, and between them.
    code, out, err = run("submit", "echo", "--wait", "a=1", "--priority", "2", "b=text", url=server.url)
    assert code == 0 and codec.loads(out) == {"a": 1, "b": "text"}, err
    code, out, err = run("submit", "echo", "--wait", "a=1", "stray", url=server.url)
    assert code == 2 and "unrecognized arguments: stray" in err, err
    for misspelled in (["--priorty=5", "a=1"], ["a=1", "--wait", "--priorty=5"]):  # never a param "--priorty"
        code, out, err = run("submit", "echo", *misspelled, url=server.url)
        assert code == 2 and "unrecognized option: --priorty" in err and not out, (out, err)


def test_submit_then_status_wait_result_each_by_id(server):
    """`submit` prints the id; `status`, `wait`, `result` take it; `--json` gives the job as JSON."""
    code, out, _ = run("submit", "sleep", "seconds=0.3", url=server.url)
    job_id = out.strip()
    assert code == 0 and job_id and " " not in job_id
    code, out, _ = run("status", job_id, url=server.url)
    assert code == 0 and out.startswith(f"{job_id} sleep ")
    code, out, _ = run("wait", job_id, "--quiet", url=server.url)
    assert code == 0 and codec.loads(out) == {"slept": 0.3}
    code, out, _ = run("result", job_id, url=server.url)
    assert code == 0 and codec.loads(out) == {"slept": 0.3}
    code, out, _ = run("status", job_id, "--json", url=server.url)
    assert code == 0 and codec.loads(out)["status"] == "succeeded"
    code, out, _ = run("submit", "echo", "x=1", "--wait", "--json", url=server.url)
    assert code == 0 and codec.loads(out)["result"] == {"x": 1}


def test_a_failed_job_exits_1_with_one_line(server):
    """A job that fails: `submit --wait` and `result` exit 1 with one line naming the error."""
    code, out, err = run("submit", "fail", "message=boom", "--wait", "--quiet", url=server.url)
    assert code == 1 and out == ""
    assert_one_line(err, "failed", "boom")
    job_id = run("submit", "fail", "message=again", url=server.url)[1].strip()
    code, _, err = run("wait", job_id, "--quiet", url=server.url)
    assert code == 1
    code, _, err = run("result", job_id, url=server.url)
    assert code == 1
    assert_one_line(err, "again")
    code, _, err = run("status", "no-such-job", url=server.url)
    assert code == 1
    assert_one_line(err, "no-such-job")


@pytest.mark.parametrize("argv, words", [
    ([], ["required"]),
    (["submit"], ["required"]),
    (["submit", "echo", "novalue"], ["key=value"]),
    (["submit", "echo", "--params", "{"], ["--params"]),
    (["submit", "nosuch"], ["unknown task"]),
    (["submit", "sleep", "seconds=soon"], ["params.seconds"]),
    (["wait", "x", "--timeout", "soon"], ["--timeout"]),
    (["status", "x", "--url", "ftp://x"], ["--url"]),
    (["list", "--status", "done"], ["--status"]),
])
def test_usage_errors_exit_2_with_one_line(server, argv, words):
    """A wrong command line, or params the server refuses, exits 2 with one line."""
    code, out, err = run(*argv, url=server.url)
    assert code == 2 and out == ""
    assert_one_line(err, *words)


def test_an_unreachable_server_exits_3_without_a_traceback():
    """A refused connection exits 3 with one line, in a real process."""
    done = spawn("status", "some-id", "--url", "http://127.0.0.1:1")
    assert done.returncode == 3 and done.stdout == ""
    assert_one_line(done.stderr, "cannot reach", "refused")


@pytest.mark.parametrize("kind", ["html", "json"])
def test_a_server_that_is_not_asyncjobs_exits_3(other_site, kind):
    """An HTML site or another JSON API is named as not asyncjobs; exit 3."""
    url = other_site(kind)
    for argv in (["status", "x"], ["submit", "echo", "--wait"], ["tasks"]):
        code, out, err = run(*argv, url=url)
        assert code == 3 and out == "", (argv, err)
        assert_one_line(err, "asyncjobs server")


def test_a_missing_or_wrong_token_exits_3_and_the_token_comes_from_the_environment(server_factory):
    """With auth on: no token or a wrong one exits 3; ASYNCJOBS_TOKEN or --token is sent as the bearer token."""
    auth = server_factory(config_text=config_text(f'[auth]\ntokens = {{alice = "{TOKEN}"}}\n'))
    code, _, err = run("status", "x", url=auth.url)
    assert code == 3
    assert_one_line(err, "unauthorized", "ASYNCJOBS_TOKEN")
    assert run("tasks", "--token", "wrong-token-of-enough-length", url=auth.url)[0] == 3
    code, out, err = run("submit", "echo", "who=alice", "--wait", url=auth.url, env={"ASYNCJOBS_TOKEN": TOKEN})
    assert code == 0 and codec.loads(out) == {"who": "alice"}, err
    assert run("--token", TOKEN, "list", url=auth.url)[0] == 0


def test_a_wait_that_times_out_exits_4(server, api):
    """`wait ID --timeout 0.5` on a long job exits 4, says the job keeps running, and leaves it running."""
    job = api.submit("block")
    started = time.monotonic()
    code, out, err = run("wait", job.id, "--timeout", "0.5", "--quiet", url=server.url)
    assert code == 4 and out == "" and time.monotonic() - started < 10, err
    assert_one_line(err, job.id, "keeps running")
    code, _, _ = run("submit", "block", "--wait", "--timeout", "0.3", "--quiet", url=server.url)
    assert code == 4
    assert api.get(job).status == "running"
    api.cancel(job)


@contextlib.contextmanager
def ctrl_c_reaches_children() -> Iterator[None]:
    """Children started within get SIGINT as from a terminal, even when this test run itself ignores it (a
    run started in the background does): an ignored signal stays ignored across exec, a handled one does not."""
    before = signal.getsignal(signal.SIGINT)
    if before is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def test_ctrl_c_during_wait_leaves_the_job_running(server, api):
    """SIGINT during `wait` exits 130 with one line saying the job keeps running, and it does."""
    job = api.submit("block")
    with ctrl_c_reaches_children():
        proc = subprocess.Popen([sys.executable, "-m", "asyncjobs", "wait", job.id, "--url", server.url],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env())
    with proc:  # its pipes closed, whatever happens
        try:
            ready, _, _ = select.select([proc.stderr], [], [], RUN_TIMEOUT_S)
            assert ready, "wait printed nothing"
            first = proc.stderr.readline().decode()
            assert first.startswith(job.id), first  # a progress line: the wait is under way
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130 and out == b""
    assert_one_line(err.decode(), "interrupted", job.id, "keeps running")
    assert api.get(job).status == "running"
    api.cancel(job)


def run_in_pty(argv: list[str], timeout_s: float = RUN_TIMEOUT_S, cwd: Path | None = None) -> tuple[int, str]:
    """Run a command (in ``cwd``) with a pseudo-terminal (100 columns) as its stdin, stdout and stderr;
    returns (status, output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=clean_env(), cwd=cwd,
                            close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        return proc.wait(timeout=5), b"".join(chunks).decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(master)


def test_progress_bar_on_a_terminal(server):
    """On a terminal, `submit --wait` redraws a bar (percentage, message, ETA) in place, then prints the result."""
    code, output = run_in_pty([sys.executable, "-m", "asyncjobs", "submit", "sleep", "seconds=1.2", "steps=4",
                               "--wait", "--url", server.url])
    assert code == 0, output
    assert "Traceback" not in output
    bars = [part for part in output.split("\r\x1b[K") if part.startswith("[")]
    assert any("%" in bar and "step 2 of 4" in bar and "eta" in bar for bar in bars), output
    assert any(bar.startswith("[" + "#" * 10) and "50%" in bar for bar in bars), output
    assert "\n" not in "".join(bars[:-1]), "the bar is redrawn in place, not printed line by line"
    assert codec.loads(output.rsplit("succeeded", 1)[1].strip()) == {"slept": 1.2}


def test_plain_progress_lines_when_not_a_terminal(server):
    """Without a terminal, progress is a plain line per change on stderr (no control characters)."""
    code, out, err = run("submit", "sleep", "seconds=0.6", "steps=3", "--wait", url=server.url)
    assert code == 0 and codec.loads(out) == {"slept": 0.6}
    lines = err.strip().splitlines()
    assert "\r" not in err and "\x1b" not in err
    job_id = lines[0].split()[0]
    assert all(line.startswith(job_id + " ") for line in lines)
    assert any("%" in line and "step" in line for line in lines) and lines[-1].endswith("succeeded")


def test_list_tasks_cancel_delete(server, api):
    """`list` (filters, --json lines), `tasks`, `cancel` and `delete` work and exit 0; then the job is gone."""
    job_id = run("submit", "block", "--priority", "1", url=server.url)[1].strip()
    code, out, _ = run("list", "--task", "block", url=server.url)
    assert code == 0 and job_id in out
    code, out, _ = run("list", "--task", "block", "--json", "--limit", "50", url=server.url)
    assert code == 0 and job_id in [codec.loads(line)["id"] for line in out.splitlines()]
    code, out, _ = run("tasks", url=server.url)
    assert code == 0 and {"sleep", "echo", "fail", "hash"} <= {line.split()[0] for line in out.splitlines()}
    code, out, _ = run("tasks", "--json", url=server.url)
    assert code == 0 and "hash" in {t["name"] for t in codec.loads(out)}
    code, out, _ = run("cancel", job_id, url=server.url)
    assert code == 0 and out.strip() == f"{job_id} canceled"
    code, out, _ = run("list", "--status", "canceled", "--json", url=server.url)
    assert code == 0 and job_id in [codec.loads(line)["id"] for line in out.splitlines()]
    code, out, _ = run("delete", job_id, url=server.url)
    assert code == 0 and out.strip() == f"{job_id} deleted"
    assert run("status", job_id, url=server.url)[0] == 1


def test_the_url_comes_from_flag_or_environment_and_options_go_anywhere(server):
    """--url wins over ASYNCJOBS_URL, and the common options may come before or after the command."""
    code, out, _ = run("--url", server.url, "submit", "noop", env={"ASYNCJOBS_URL": "http://127.0.0.1:1"})
    assert code == 0 and out.strip()
    assert run("tasks", "--json", "--url", server.url)[0] == 0
    assert run("tasks", env={"ASYNCJOBS_URL": server.url})[0] == 0


def test_asyncjobs_dispatches_client_commands_and_keeps_serve(capsys):
    """`asyncjobs --help` lists the client commands beside serve; `serve --help` still works."""
    with pytest.raises(SystemExit) as caught:
        server_cli.main(["--help"])
    assert caught.value.code == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("serve", *cli.COMMANDS))
    with pytest.raises(SystemExit) as caught:
        server_cli.main(["serve", "--help"])
    assert caught.value.code == 0 and "--port" in capsys.readouterr().out
    assert server_cli.main(["status", "x", "--url", "http://127.0.0.1:1"]) == 3
    assert "cannot reach" in capsys.readouterr().err
