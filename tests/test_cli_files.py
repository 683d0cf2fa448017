"""The client command line with files: `submit TASK name=@path`, `-o PATH`, `result ID` of a file, byte bars."""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncjobs import codec
from asyncjobs.client import SyncClient, cli
from tests.conftest import ServerProcess
from tests.test_cli_client import (
    RUN_TIMEOUT_S,
    assert_one_line,
    clean_env,
    module_server,
    run,
)
from tests.test_cli_client import run_in_pty as run_command_in_pty

MIB = 1024 * 1024


# -- helpers -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    yield from module_server(tmp_path_factory, "cli-files-server")


@pytest.fixture
def api(server) -> Iterator[SyncClient]:
    with SyncClient(server.url) as client:
        yield client


def expected_bytes(size: int, seed: str = "") -> bytes:
    """What the built-in `bytes` task returns: block i is sha256(f"{seed}:{i}"), concatenated and cut."""
    blocks = (hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(size // 32 + 1))
    return b"".join(blocks)[:size]


def run_in_pty(argv: list[str], cwd: Path, timeout_s: float = RUN_TIMEOUT_S) -> tuple[int, str]:
    """Run `python -m asyncjobs ARGV` in ``cwd`` with a pseudo-terminal; returns (status, output)."""
    return run_command_in_pty([sys.executable, "-m", "asyncjobs", *argv], timeout_s, cwd=cwd)


def bars(output: str) -> list[str]:
    """The progress bars drawn in place on a terminal."""
    return [part.split("\r\n")[0] for part in output.split("\r\x1b[K") if part.startswith("[")]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".part", ".part.json")))


# -- pure parts --------------------------------------------------------------------------------

def test_file_pairs_are_split_from_params(tmp_path):
    """`key=@path` is a file (checked now); other pairs, `@` inside a value included, stay params."""
    (tmp_path / "clip.mp4").write_bytes(b"x")
    pairs, files = cli.split_files(["format=webm", f"video=@{tmp_path / 'clip.mp4'}", "email=a@b.c", "n=3"])
    assert pairs == ["format=webm", "email=a@b.c", "n=3"] and files == {"video": tmp_path / "clip.mp4"}
    assert cli.parse_params(pairs, None) == {"format": "webm", "email": "a@b.c", "n": 3}
    for pair, words in ((f"f=@{tmp_path / 'nope'}", "no such file"), ("f=@", "must follow @"),
                        (f"f=@{tmp_path}", "not a readable file")):
        with pytest.raises(cli.UsageError) as caught:
            cli.split_files([pair])
        assert words in str(caught.value)


def test_transfer_bar_rendering():
    """The byte bar shows the percentage, bytes done/total, the rate, the ETA and what moves; sizes are short."""
    bar = cli.render_transfer("clip.mp4", 4 * MIB, 10 * MIB, 2 * MIB, 100)
    assert bar.startswith("[") and "40%" in bar and "4.0 MiB/10.0 MiB" in bar and "2.0 MiB/s" in bar
    assert "eta 3s" in bar and bar.endswith("clip.mp4") and len(bar) < 100
    unknown = cli.render_transfer("out", 5000, None, None, 80)
    assert "--%" in unknown and "4.9 KiB" in unknown and "/s" not in unknown
    assert "eta" not in cli.render_transfer("x", 10, 10, 5.0, 80)
    assert [cli.size_text(n) for n in (0, 1023, 1024, 1536 * 1024, 3 * 1024 ** 3)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 MiB", "3.0 GiB"]


# -- against a real server ------------------------------------------------------------------------

def test_submit_a_file_and_wait_prints_the_digest(server, tmp_path):
    """`submit digest file=@x --wait` uploads the file and prints the result; off a terminal, no bar."""
    data = os.urandom(3 * MIB + 1)
    (tmp_path / "x.bin").write_bytes(data)
    code, out, err = run("submit", "digest", f"file=@{tmp_path / 'x.bin'}", "--wait", url=server.url)
    assert code == 0, err
    assert codec.loads(out) == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert "\r" not in err and "\x1b" not in err


def test_submit_wait_o_writes_the_file_result(server, tmp_path):
    """`submit bytes size=N --wait -o out` waits, then writes the file result to out; stdout stays empty."""
    out_path = tmp_path / "out.bin"
    code, out, err = run("submit", "bytes", "size=300001", "seed=c", "--wait", "-q", "-o", str(out_path),
                         url=server.url)
    assert code == 0 and out == "" and err == "", err
    assert out_path.read_bytes() == expected_bytes(300_001, "c") and leftovers(tmp_path) == []
    code, out, err = run("submit", "gzip", f"file=@{out_path}", "level=1", "--wait", "-q", "-o",
                         str(tmp_path / "out.gz"), url=server.url)
    assert code == 0 and gzip.decompress((tmp_path / "out.gz").read_bytes()) == out_path.read_bytes(), err


def test_result_and_wait_with_o_write_the_file(server, api, tmp_path):
    """`wait ID -o` and `result ID -o` write the file; with --json, `result` describes what it wrote."""
    job = api.submit("bytes", {"size": 70_000, "seed": "r"})
    code, out, err = run("wait", job.id, "-q", "-o", str(tmp_path / "a.bin"), url=server.url)
    assert code == 0 and out == "", err
    code, out, err = run("result", job.id, "-o", str(tmp_path / "b.bin"), url=server.url)
    assert code == 0 and out == "" and err == "", err
    code, out, err = run("result", job.id, "-o", str(tmp_path / "c.bin"), "--json", url=server.url)
    assert code == 0, err
    expected = expected_bytes(70_000, "r")
    assert codec.loads(out) == {"path": str(tmp_path / "c.bin"), "size": 70_000,
                                "sha256": hashlib.sha256(expected).hexdigest(),
                                "content_type": "application/octet-stream", "name": "bytes-70000.bin"}
    for name in ("a.bin", "b.bin", "c.bin"):
        assert (tmp_path / name).read_bytes() == expected


def test_result_of_a_file_goes_to_stdout_when_it_is_not_a_terminal(server, api):
    """Without -o and with stdout a pipe, the file's bytes go to stdout as they are; `-o -` too."""
    job = api.wait(api.submit("bytes", {"size": 200_000, "seed": "p"}), timeout=20)
    for extra in ([], ["-o", "-"]):
        done = subprocess.run([sys.executable, "-m", "asyncjobs", "result", job.id, *extra, "--url", server.url],
                              capture_output=True, env=clean_env(), timeout=RUN_TIMEOUT_S, check=False)
        assert done.returncode == 0 and done.stderr == b"", done.stderr
        assert done.stdout == expected_bytes(200_000, "p")


def test_result_of_a_file_on_a_terminal_is_saved_under_the_servers_name(server, api, tmp_path):
    """With stdout a terminal, `result ID` saves the file in the current folder under the server's name,
    and says so; a second time it refuses to overwrite (exit 2). JSON results still print."""
    job = api.wait(api.submit("bytes", {"size": 50_000}), timeout=20)
    code, output = run_in_pty(["result", job.id, "--url", server.url], cwd=tmp_path)
    assert code == 0, output
    assert (tmp_path / "bytes-50000.bin").read_bytes() == expected_bytes(50_000)
    assert "saved bytes-50000.bin (48.8 KiB)" in output
    code, output = run_in_pty(["result", job.id, "--url", server.url], cwd=tmp_path)
    assert code == 2 and "bytes-50000.bin exists" in output and "-o" in output
    echoed = api.wait(api.submit("echo", {"a": 1}), timeout=20)
    code, output = run_in_pty(["result", echoed.id, "--url", server.url], cwd=tmp_path)
    assert code == 0 and codec.loads(output.strip()) == {"a": 1}


def test_byte_progress_bars_on_a_terminal(server, tmp_path):
    """On a terminal the upload and the download each draw a bar in place (bytes, percentage, name), between
    them the job's own bar; the file arrives whole."""
    data = os.urandom(8 * MIB)
    (tmp_path / "big.bin").write_bytes(data)
    code, output = run_in_pty(["submit", "gzip", "file=@big.bin", "level=1", "--wait", "-o", "out.gz",
                               "--url", server.url], cwd=tmp_path)
    assert code == 0, output
    assert "Traceback" not in output
    drawn = bars(output)
    uploads = [bar for bar in drawn if bar.endswith("uploading big.bin")]
    downloads = [bar for bar in drawn if bar.endswith("out.gz")]
    assert uploads and "100%" in uploads[-1] and "8.0 MiB/8.0 MiB" in uploads[-1], output
    assert downloads and "100%" in downloads[-1], output
    assert any("succeeded" in bar for bar in drawn), output
    assert gzip.decompress((tmp_path / "out.gz").read_bytes()) == data


@pytest.mark.parametrize("argv, words", [
    (["submit", "digest", "file=@/no/such/file.bin"], ["/no/such/file.bin", "no such file"]),
    (["submit", "digest", "file=@"], ["must follow @"]),
    (["submit", "digest", "file=@/"], ["not a readable file"]),
    (["submit", "bytes", "size=1", "-o", "out.bin"], ["--wait"]),
])
def test_file_usage_errors_exit_2_with_one_line(server, argv, words):
    """A missing or unreadable @file, or -o without --wait, exits 2 with one line; nothing is submitted."""
    code, out, err = run(*argv, url=server.url)
    assert code == 2 and out == ""
    assert_one_line(err, *words)


def test_o_naming_a_folder_or_a_missing_folder_is_refused_before_any_transfer(server, api, tmp_path):
    """`-o` naming a folder, or a file in a folder that does not exist, exits 2 with one line before the
    submit or the download: no job is made, and no partial file is left beside the folder."""
    (tmp_path / "out").mkdir()
    before = [j.id for j in api.list()]
    for target, words in ((tmp_path / "out", ["is a folder"]), (tmp_path / "nosuch" / "x.bin", ["no folder"])):
        code, out, err = run("submit", "bytes", "size=300001", "--wait", "-q", "-o", str(target), url=server.url)
        assert code == 2 and out == ""
        assert_one_line(err, str(target), *words)
        code, out, err = run("result", "some-job-id", "-o", str(target), url=server.url)
        assert code == 2 and out == ""
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and not any((tmp_path / "out").iterdir())
    assert [j.id for j in api.list()] == before


def test_a_failed_job_with_o_writes_nothing(server, tmp_path):
    """`submit fail --wait -o out` exits 1 with one line, and no file appears."""
    code, out, err = run("submit", "fail", "message=boom", "--wait", "-q", "-o", str(tmp_path / "out.bin"),
                         url=server.url)
    assert code == 1 and out == ""
    assert_one_line(err, "boom")
    assert list(tmp_path.iterdir()) == []
