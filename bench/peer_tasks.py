"""No-op tasks for bench/peers.py, importable by the peers' own consumer processes.

    huey:  PEERS_HUEY_DB=/tmp/x/huey.db PYTHONPATH=bench huey_consumer peer_tasks.huey -w 8 -k thread -n -q
    arq:   python bench/peer_tasks.py PORT MAX_JOBS      (an arq Worker on 127.0.0.1:PORT)
"""

from __future__ import annotations

import os
import sys
from typing import Any

from huey import SqliteHuey
from huey.api import TaskWrapper


def make_huey(filename: str) -> SqliteHuey:
    """SqliteHuey at its most durable: WAL, and fsync=True, which SqliteStorage turns into
    `PRAGMA synchronous=2` (FULL) on its connection. store_none=True so a no-op's None result
    is stored, which is how peers.py confirms completion."""
    return SqliteHuey("peers", filename=filename, journal_mode="wal", fsync=True, store_none=True)


def _huey_noop() -> None:
    return None


def register(h: SqliteHuey) -> TaskWrapper:
    """The same task (module peer_tasks, name huey_noop) on any huey instance."""
    return h.task(name="huey_noop")(_huey_noop)


huey: SqliteHuey | None = None
huey_noop: TaskWrapper | None = None
if os.environ.get("PEERS_HUEY_DB"):
    huey = make_huey(os.environ["PEERS_HUEY_DB"])
    huey_noop = register(huey)


async def arq_noop(ctx: dict[str, Any]) -> None:
    return None


def run_arq_worker(port: int, max_jobs: int) -> None:
    """An arq Worker with its defaults (poll_delay 0.5 s, keep_result 3600 s) but max_jobs.
    No logging is configured, so arq's per-job INFO lines are not emitted."""
    from arq.connections import RedisSettings
    from arq.worker import Worker

    Worker(functions=[arq_noop], redis_settings=RedisSettings(host="127.0.0.1", port=port),
           max_jobs=max_jobs).run()


if __name__ == "__main__":
    run_arq_worker(int(sys.argv[1]), int(sys.argv[2]))
