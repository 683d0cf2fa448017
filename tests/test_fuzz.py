"""A schema-driven fuzz run: schemathesis against a real server's /openapi.json, bounded in examples and time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from asyncjobs.tasks import TaskRegistry
from tests.conftest import TEST_MODULES

MAX_EXAMPLES = 25  # per operation and phase
RUN_TIMEOUT_S = 150  # the whole run takes ~30 s; this only stops a hang
# Excluded, each for a reason:
EXCLUDED = {
    # A stream that lasts until its job is terminal; a fuzzed submit may delay a job for years.
    "/jobs/{job_id}/events": "GET",
    # An upgrade to a WebSocket; a plain HTTP request can only meet its 400.
    "/ws": "GET",
}


def _st() -> list[str]:
    found = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    if found is None:
        pytest.fail("schemathesis is not installed (pip install '.[test]')")
    return [found]


def _config_text() -> str:
    """Every long wait bounded: 1 s long polls, and every task times out after 1 s."""
    lines = ["[server]", "max_wait = 1", "[queue]", "workers = 4", "[jobs]", "cancel_grace = 0.5",
             "[tasks]", f"modules = {TEST_MODULES!r}".replace("'", '"')]
    for name in TaskRegistry.from_modules(TEST_MODULES).names():
        lines += [f"[tasks.{name}]", "timeout = 1"]
    return "\n".join(lines) + "\n"


def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_schema(server_factory, tmp_path):
    """Generated requests to every described operation get no 5xx and only answers /openapi.json describes."""
    server = server_factory(config_text=_config_text())
    excludes = [arg for path in EXCLUDED for arg in ("--exclude-path", path)]
    env = {**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_HOOKS": ""}
    try:
        run = subprocess.run(
            [*_st(), "run", f"{server.url}/openapi.json", "--checks", "not_a_server_error,response_schema_conformance",
             "--max-examples", str(MAX_EXAMPLES), "--seed", "20261123", "--request-timeout", "10",
             "--generation-database", "none", "--workers", "1", *excludes],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the fuzz run took over {RUN_TIMEOUT_S} s:\n{exc.stdout}")
    report = run.stdout[-12000:] + run.stderr[-4000:]
    assert run.returncode == 0, f"schemathesis found problems:\n{report}\n\nserver log:\n{server.log()[-4000:]}"
    assert "Traceback" not in server.log(), server.log()[-4000:]
