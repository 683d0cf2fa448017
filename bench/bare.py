"""The W1 ceiling: a bare aiohttp app that answers `POST /jobs` like asyncjobs but stores nothing.

    python bench/bare.py --port 8081

It reads and parses the JSON body with orjson, checks it names a task, and
answers `202 Accepted` with the same headers as asyncjobs (Location,
Content-Location, Retry-After, ETag, Cache-Control, Vary) and a job-shaped
JSON body. No store, no queue, no workers: what aiohttp itself costs for the
same exchange on this machine. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import secrets
import time
from datetime import datetime, timezone

import orjson
from aiohttp import web


def isotime(ts: float | None) -> str | None:
    if ts is None:
        return None
    dt = datetime.fromtimestamp(ts, tz=timezone.utc)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{dt.microsecond // 1000:03d}Z"


async def submit(request: web.Request) -> web.Response:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return web.Response(status=400, content_type="application/problem+json",
                            body=b'{"type":"about:blank","title":"Bad Request","status":400}')
    if not isinstance(body, dict) or not isinstance(body.get("task"), str):
        return web.Response(status=400, content_type="application/problem+json",
                            body=b'{"type":"about:blank","title":"Bad Request","status":400}')
    job_id = secrets.token_urlsafe(16)
    url = f"/jobs/{job_id}"
    now = time.time()
    job = {
        "id": job_id, "task": body["task"], "status": "queued",
        "created_at": isotime(now), "started_at": None, "finished_at": None,
        "expires_at": isotime(now + 86400), "attempts": 0, "priority": body.get("priority", 0),
        "version": 1, "progress": None, "eta": None, "queue_position": 1, "run_at": isotime(now),
        "result": None, "error": None,
        "links": {"self": url, "result": f"{url}/result", "events": f"{url}/events",
                  "cancel": {"href": f"{url}/cancel", "method": "POST"},
                  "delete": {"href": url, "method": "DELETE"}},
    }
    return web.Response(
        status=202, body=orjson.dumps(job), content_type="application/json",
        headers={"Location": url, "Content-Location": url, "Retry-After": "1", "ETag": 'W/"1"',
                 "Cache-Control": "no-store", "Vary": "Prefer"},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"])
    args = parser.parse_args()
    app = web.Application()
    app.router.add_post("/jobs", submit)
    print(f"bare listening on http://127.0.0.1:{args.port}", flush=True)
    loop = None
    if args.loop == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
