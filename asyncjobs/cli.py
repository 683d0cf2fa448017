"""The ``asyncjobs`` command line: ``serve`` runs the service; every other command is the client's."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from aiohttp import web

from . import config as config_module
from .app import App, is_server_url
from .config import url_host
from .errors import ConfigError, StoreError
from .web import ProblemRunner
from .web.ops import access_log_options

log = logging.getLogger("asyncjobs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asyncjobs", description="Asynchronous request-reply jobs over HTTP.",
                                     allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    # Only whole option names: --processes' children are started without it, so '--proc 2' must not mean it.
    serve = commands.add_parser("serve", help="run the service", allow_abbrev=False)
    serve.add_argument("--config", help="config file (default: ./config.toml if it exists)")
    serve.add_argument("--host", help="address to listen on")
    serve.add_argument("--port", type=int, help="port to listen on (0: any free port)")
    serve.add_argument("--db", help="the store: a SQLite file, or a postgresql:// URL (store.url)")
    serve.add_argument("--workers", type=int, help="worker coroutines")
    serve.add_argument("--processes", type=int, default=1,
                       help="processes sharing the port, each a node with its own workers (PostgreSQL only)")
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # a child of --processes
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    for name, text in CLIENT_COMMANDS.items():  # listed for --help; main() hands them to the client
        commands.add_parser(name, help=text, add_help=False)
    return parser


CLIENT_COMMANDS = {
    "submit": "submit a job (--wait: follow it and print its result)", "status": "show a job",
    "wait": "follow a job, then print its result", "result": "print a job's result", "cancel": "cancel a job",
    "delete": "cancel a job if needed, then forget it", "list": "list jobs", "tasks": "list the registered tasks",
}


def _is_client_command(argv: list[str]) -> bool:
    """Anything but ``serve`` and a bare ``--help`` is a client command (its options may come first)."""
    return bool(argv) and argv[0] != "serve" and argv[0] not in ("-h", "--help")


def _flag_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    pairs = {("server", "host"): args.host, ("server", "port"): args.port, ("queue", "workers"): args.workers}
    if args.db:  # --db wins over the file: a URL names a server, anything else is a SQLite file
        pairs[("store", "url")] = args.db if is_server_url(args.db) else ""
        if not is_server_url(args.db):
            pairs[("store", "path")] = args.db
    out: dict[str, dict[str, Any]] = {}
    for (section, key), value in pairs.items():
        if value is not None:
            out.setdefault(section, {})[key] = value
    return out


GC_YOUNG_THRESHOLD = 20_000  # Python's default is 700


def tune_gc() -> None:
    """Garbage collection for a serving process, once it has started: what startup built (modules, the app,
    the store) is frozen out of every collection, and the youngest generation is collected after 20,000
    new container objects instead of 700. A job makes hundreds of short-lived objects, nearly all freed by
    reference counting, so the default collected every few jobs, for 3% of a job's instructions
    (bench/RESULTS.md); reference cycles now wait a little longer to be freed. The process's choice, so
    ``asyncjobs serve`` makes it, not the App (which may be embedded in another program)."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20  # above asyncio's read buffer (256 KiB)
TRIM_THRESHOLD = 8 << 20


def tune_malloc() -> bool:
    """Keep the event loop's read buffers in the heap. asyncio reads a socket with ``recv(256 KiB)``, and
    glibc serves an allocation that large with a fresh ``mmap``; the bytes object is then shrunk to what
    arrived (``mremap``) and freed (``munmap``), so each read costs three system calls and a page fault, the
    bigger part of a small request's kernel time. Raising glibc's mmap threshold above the buffer (and its
    trim threshold, so that the freed buffer is not handed back at once) reuses heap memory instead. A
    no-op away from glibc. The process's choice, like ``tune_gc``. True if it was applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


async def serve(app: App, *, reuse_port: bool = False) -> None:
    """Run until SIGINT/SIGTERM, then drain: 503 for submits, running jobs get the grace period."""
    # Handlers are cancelled when their client goes away (a long poll frees its waiter at once);
    # at shutdown, waiters still open after a short while are cut.
    runner = ProblemRunner(app.web, **access_log_options(app.config.server.access_log), handle_signals=False,
                           handler_cancellation=True, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, app.config.server.host, app.config.server.port, reuse_port=reuse_port or None)
        await site.start()
        host, port = runner.addresses[0][:2]
        tune_gc()
        tune_malloc()
        loop = asyncio.get_running_loop()
        log.info("asyncjobs listening on http://%s:%d (%s event loop)", url_host(host), port,
                 type(loop).__module__.partition(".")[0])
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        app.on_start_failure = stop.set  # (a start that waited for the database, then failed)
        if app.start_failure is not None:  # (already)
            stop.set()
        await stop.wait()
        if app.start_failure is None:
            log.info("shutting down: no new jobs; running jobs get %.0fs", app.config.queue.shutdown_grace)
        await app.drain()
    finally:
        await runner.cleanup()
    if app.start_failure is not None:
        raise app.start_failure  # the exit it would have had, failing at once


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop ``server.loop`` names (None: asyncio's own). "auto" takes uvloop when it is installed:
    measured faster on both submits and end to end (bench/RESULTS.md), and asyncio otherwise."""
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if name == "auto":
            return None
        raise ConfigError('server.loop = "uvloop" needs the uvloop package: pip install \'asyncjobs[speed]\'') from None
    return uvloop.new_event_loop


def _exit_now(abandoned: int) -> None:
    """Exit without joining the threads of handlers that ignored the stop (the interpreter would wait for them,
    however long they run): their jobs are back in the queue, and the store is closed."""
    log.warning("exiting without waiting for %d handler thread(s) that ignored the stop", abandoned)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if _is_client_command(argv):
        from .client import cli as client_cli

        return client_cli.main(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_module.load(args.config, overrides=_flag_overrides(args))
        if args.processes != 1:
            from .processes import supervise

            return supervise(argv, cfg, args.processes)
        app = App(cfg)
        with asyncio.Runner(loop_factory=loop_factory(cfg.server.loop)) as runner:
            runner.run(serve(app, reuse_port=args.reuse_port))
        if app.workers.abandoned:
            _exit_now(app.workers.abandoned)
    except ConfigError as exc:
        print(f"asyncjobs: configuration error: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"asyncjobs: store error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"asyncjobs: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
