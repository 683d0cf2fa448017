"""``asyncjobs serve --processes N``: N processes on one port, each a node of its own, one command.

The parent binds the port with ``SO_REUSEPORT`` (so port 0 becomes one free port all children share),
then starts N children, each ``asyncjobs serve`` with the same arguments on that port and ``reuse_port``;
the kernel spreads new connections over them. The parent serves nothing itself: it says where the service
listens once a child accepts, forwards SIGINT/SIGTERM to every child (each drains as one server would),
starts again a child that dies on its own, and exits when they have all stopped. Only a store that many
processes can share (PostgreSQL) allows it.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import socket
import subprocess
import sys
import time
from types import FrameType

from .config import Config, url_host
from .errors import ConfigError

log = logging.getLogger("asyncjobs")

READY_TIMEOUT_S = 60.0
PR_SET_PDEATHSIG = 1  # prctl(2)
RESTART_DELAY_S = 1.0


def _child_argv(argv: list[str], port: int) -> list[str]:
    """The children's command: these arguments without ``--processes``, on ``port``, sharing it."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--processes", "--port"):
            skip = True
            continue
        if arg.startswith(("--processes=", "--port=")):
            continue
        out.append(arg)
    return [sys.executable, "-m", "asyncjobs", *out, "--port", str(port), "--reuse-port"]


def _die_with_parent() -> None:
    """In a child, before it runs: be sent SIGTERM when the parent dies (Linux), even by SIGKILL, so no
    child outlives its supervisor."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the parent's signal handlers are what there is
        pass


def _spawn(command: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, preexec_fn=_die_with_parent)


def _reserve(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) to the port with SO_REUSEPORT: port 0 becomes one port for all."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _accepting(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def supervise(argv: list[str], config: Config, count: int) -> int:
    """Run ``count`` serve processes on one port until SIGINT/SIGTERM; their worst exit status."""
    if count < 1:
        raise ConfigError(f"--processes: expected a number of processes >= 1, got {count}")
    if not config.store.url:
        raise ConfigError("--processes: several processes need a store they can share: set store.url (or --db) to"
                          " a postgresql:// URL; a SQLite file belongs to one process")
    host = config.server.host
    reserved = _reserve(host, config.server.port)
    port = reserved.getsockname()[1]
    command = _child_argv(argv, port)
    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    children = [_spawn(command) for _ in range(count)]
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not stopping and not _accepting(host, port):
            if time.monotonic() > deadline or all(c.poll() is not None for c in children):
                log.error("no process of %d started; see their messages above", count)
                stop(signal.SIGTERM, None)
                break
            time.sleep(0.05)
        else:
            if not stopping:
                log.info("asyncjobs listening on http://%s:%d (%d processes)", url_host(host), port, count)
        worst = 0
        while True:
            for i, child in enumerate(children):
                code = child.poll()
                if code is None:
                    continue
                if stopping:
                    worst = max(worst, abs(code))
                    continue
                log.error("process %d exited with %s; starting it again", child.pid, code)
                time.sleep(RESTART_DELAY_S)
                if not stopping:  # a SIGTERM during the delay: the child it would start would never be told
                    children[i] = _spawn(command)
            if stopping and all(c.poll() is not None for c in children):
                return worst
            time.sleep(0.1)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
        reserved.close()
