"""The OpenAPI 3.1 description of the protocol, built from the task registry (task routes included)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from ..models import Status
from ..protocol import MAX_LIST_LIMIT
from ..tasks import TaskSpec

PROTOCOL_VERSION = "1.4"  # the version of PROTOCOL.md this service answers by
JSON = "application/json"
PROBLEM = "application/problem+json"
MULTIPART = "multipart/form-data"
_BINARY = {"type": "string", "format": "binary"}
_JOB_OR_PAGE = {JSON: {"schema": {"$ref": "#/components/schemas/Job"}}, "text/html": {"schema": {"type": "string"}}}

_NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
_LINK = {"type": "object", "required": ["href", "method"],
         "properties": {"href": {"type": "string"}, "method": {"type": "string"}}}

SCHEMAS: dict[str, Any] = {
    "Status": {"type": "string", "enum": [s.value for s in Status],
               "description": "succeeded, failed and canceled are terminal."},
    "Job": {
        "type": "object",
        "required": ["id", "task", "status", "created_at", "started_at", "finished_at", "expires_at", "attempts",
                     "priority", "version", "progress", "eta", "queue_position", "result", "error", "links"],
        "properties": {
            "id": {"type": "string", "description": "Opaque, URL-safe, unguessable."},
            "task": {"type": "string"},
            "status": {"$ref": "#/components/schemas/Status"},
            "created_at": {"type": "string", "format": "date-time"},
            "started_at": _NULLABLE_TIME,
            "finished_at": _NULLABLE_TIME,
            "expires_at": {"type": "string", "format": "date-time"},
            "run_at": {**_NULLABLE_TIME, "description": "When a queued job becomes due; null otherwise."},
            "attempts": {"type": "integer", "minimum": 0},
            "priority": {"type": "integer"},
            "owner": {"type": ["string", "null"],
                      "description": "With auth on: the principal that submitted the job; null with auth off."},
            "version": {"type": "integer", "minimum": 1, "description": "Grows by one at every change; the ETag."},
            "progress": {"type": ["object", "null"], "properties": {
                "fraction": {"type": ["number", "null"]}, "message": {"type": ["string", "null"]}}},
            "eta": {**_NULLABLE_TIME, "description": "Estimated finish of a queued or running job."},
            "queue_position": {"type": ["integer", "null"], "minimum": 0},
            "result": {"description": "The handler's return value when succeeded (or a reference to a bytes "
                                      "result: content_type, size, href); null otherwise."},
            "error": {"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/JobError"}]},
            "files": {"description": "null for a job without files; else its uploads and its file result",
                      "oneOf": [{"type": "null"}, {"type": "object", "required": ["inputs", "result"], "properties": {
                          "inputs": {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/File"}},
                          "result": {"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/File"}]}}}]},
            "links": {
                "type": "object", "required": ["self", "result", "events", "cancel", "delete"],
                "properties": {"self": {"type": "string"}, "result": {"type": "string"},
                               "events": {"type": "string"}, "cancel": _LINK, "delete": _LINK},
            },
        },
    },
    "File": {
        "type": "object", "required": ["name", "size", "content_type", "sha256"],
        "properties": {"name": {"type": "string", "description": "The client's file name, sanitised; display only"},
                       "size": {"type": "integer", "minimum": 0}, "content_type": {"type": "string"},
                       "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
    },
    "JobError": {
        "type": "object", "required": ["type", "message"],
        "properties": {"type": {"type": "string", "description": "exception, timeout, interrupted, canceled, or a "
                                                                   "handler-chosen name"},
                       "message": {"type": "string"}},
    },
    "JobList": {
        "type": "object", "required": ["jobs", "next"],
        "properties": {"jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}},
                       "next": {"type": ["string", "null"], "description": "The next page, or null on the last."}},
    },
    "Problem": {
        "type": "object", "required": ["type", "title", "status", "detail"],
        "description": "RFC 9457 problem details.",
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string"},
            "errors": {"type": "array", "items": {
                "type": "object", "required": ["field", "message"],
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}}}},
            "job_status": {"$ref": "#/components/schemas/Status"},
            "error": {"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/JobError"}]},
        },
    },
    "Task": {
        "type": "object",
        "required": ["name", "description", "route", "params_schema", "timeout", "retries", "concurrency", "unique"],
        "properties": {
            "name": {"type": "string"},
            "description": {"type": "string"},
            "route": {"oneOf": [{"type": "null"}, {"type": "object", "required": ["method", "path"], "properties": {
                "method": {"type": "string"}, "path": {"type": "string"}}}]},
            "params_schema": {"type": "object"},
            "timeout": {"type": ["number", "null"]},
            "retries": {"type": "integer", "minimum": 0},
            "concurrency": {"type": ["integer", "null"]},
            "unique": {"type": "boolean"},
            "file_params": {"type": "object", "description": "File params by name (sent as files, not in params)",
                            "additionalProperties": {"type": "object", "properties": {
                                "required": {"type": "boolean"},
                                "content_types": {"type": "array", "items": {"type": "string"}}}}},
        },
    },
    "JobEvent": {
        "type": "object", "required": ["event", "data", "id"],
        "description": "One Server-Sent Event; its id is the job's version.",
        "properties": {"event": {"enum": ["status", "progress"]}, "id": {"type": "string", "pattern": "^[0-9]+$"},
                       "data": {"type": "string", "contentMediaType": JSON,
                                "contentSchema": {"$ref": "#/components/schemas/Job"}}},
    },
    "Health": {
        "type": "object", "required": ["status", "node", "store", "feed", "waiting"],
        "properties": {"status": {"enum": ["ok", "unavailable"]}, "node": {"type": "string"},
                       "store": {"enum": ["up", "down"]}, "feed": {"enum": ["up", "down"]}, "waiting": {
            "type": "object", "required": ["long_polls", "event_streams", "websockets"],
            "properties": {k: {"type": "integer", "minimum": 0}
                           for k in ("long_polls", "event_streams", "websockets")}}},
    },
}

_HEADERS = {
    "Location": {"schema": {"type": "string"}},
    "Content-Location": {"schema": {"type": "string"}},
    "Retry-After": {"schema": {"type": "integer", "minimum": 1}, "description": "Seconds until the next poll."},
    "ETag": {"schema": {"type": "string"}},
    "Preference-Applied": {"schema": {"type": "string"}},
    "Idempotent-Replayed": {"schema": {"const": "true"}},
    "Link": {"schema": {"type": "string"}},
}

_PARAMS: dict[str, dict[str, Any]] = {
    "job_id": {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}},
    "wait": {"name": "wait", "in": "query", "schema": {"type": "number", "minimum": 0},
             "description": "Long poll: hold up to N seconds (clamped to the server's max_wait)."},
    "redirect": {"name": "redirect", "in": "query", "schema": {"type": "boolean", "default": True},
                 "description": "false: 200 with the job instead of the 303 of a succeeded job."},
    "prefer": {"name": "Prefer", "in": "header", "schema": {"type": "string"},
               "description": "RFC 7240; wait=N holds the request; unknown preferences are ignored."},
    "if_none_match": {"name": "If-None-Match", "in": "header", "schema": {"type": "string"}},
    "idempotency_key": {"name": "Idempotency-Key", "in": "header",
                        "schema": {"type": "string", "minLength": 1, "maxLength": 255}},
    "last_event_id": {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}},
    "status": {"name": "status", "in": "query", "schema": {"$ref": "#/components/schemas/Status"}},
    "task": {"name": "task", "in": "query", "schema": {"type": "string"}},
    "limit": {"name": "limit", "in": "query",
              "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT, "default": 50}},
    "cursor": {"name": "cursor", "in": "query", "schema": {"type": "integer", "minimum": 1},
               "description": "From the `next` link of the previous page."},
    "owner": {"name": "owner", "in": "query", "schema": {"type": "string"},
              "description": "With auth on: an admin's filter by principal (for others, their own jobs or none)."},
}

_PROBLEM_TEXT = {
    400: "Malformed request, or invalid params (with `errors`)",
    401: "Auth is on and the bearer token (or sign-in session) is missing or wrong",
    403: "Made with the sign-in cookie without the page's CSRF token, or from another origin",
    404: "No such job, deleted, or not visible to this caller",
    405: "Method not allowed",
    408: "An upload stalled past files.read_timeout; nothing was kept",
    409: "Conflict with the job's state",
    410: "The job existed but has expired",
    412: "If-Match or If-Unmodified-Since does not hold for the file result",
    413: "The body, or a file, is over the configured limit",
    415: "The body is not JSON, or a file's type is not accepted, or a raw body to a task without one file",
    416: "A range that is malformed, multiple, reversed or past the end (Content-Range: bytes */size)",
    417: "An Expect header other than 100-continue",
    422: "The Idempotency-Key was used with a different body",
    431: "A request line or header is too long",
    500: "A bug; logged, never a traceback",
    507: "The files would exceed files.max_total_bytes, or the disk filled up; nothing was kept",
    503: "The queue is full, the server is shutting down, or the store is unavailable",
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _problem(status: int, text: str | None = None, *headers: str) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": text or _PROBLEM_TEXT[status],
                              "content": {PROBLEM: {"schema": _ref("Problem")}}}
    if headers:
        answer["headers"] = {h: _HEADERS[h] for h in headers}
    return answer


def _problem_or_page(status: int) -> dict[str, Any]:
    """A problem, or for a browser (``Accept`` preferring ``text/html``) a small page with the same status."""
    answer = _problem(status)
    answer["content"] = {**answer["content"], "text/html": {"schema": {"type": "string"}}}
    return answer


def _job(text: str, *headers: str) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": text, "content": {JSON: {"schema": _ref("Job")}}}
    if headers:
        answer["headers"] = {h: _HEADERS[h] for h in headers}
    return answer


def _common_problems(*extra: int) -> dict[str, Any]:
    return {str(s): _problem(s) for s in sorted({400, 401, 405, 417, 431, 500, 503, *extra})}


def _submit_answers() -> dict[str, Any]:
    return {
        "200": _job("`Prefer: wait=N` and the job failed or was canceled within N seconds",
                    "Content-Location", "ETag", "Preference-Applied"),
        "201": _job("`Prefer: wait=N` and the job succeeded within N seconds",
                    "Location", "Content-Location", "ETag", "Preference-Applied"),
        "202": _job("Accepted: committed to the store; watch it at Location",
                    "Location", "Content-Location", "Retry-After", "ETag"),
        "303": _job("An equal job answers this submit (unique, or reuse within N seconds): it is at Location",
                    "Location", "ETag"),
        **_common_problems(403, 408, 413, 415, 422, 507),
        "429": _problem(429, "Over the caller's queued-job quota or submit rate (Retry-After; RateLimit fields)",
                        "Retry-After"),
        "503": _problem(503, None, "Retry-After"),
    }


def _submit_headers() -> list[dict[str, Any]]:
    return [_PARAMS["idempotency_key"], _PARAMS["prefer"]]


def _submit_body(specs: Iterable[TaskSpec]) -> dict[str, Any]:
    variants = [{"type": "object", "required": ["task"], "additionalProperties": False, "properties": {
        "task": {"const": spec.name}, "params": spec.schema or {"type": "object"},
        "priority": {"type": "integer", "minimum": -2**31, "maximum": 2**31 - 1, "default": 0},
        "delay": {"type": "number", "minimum": 0, "maximum": 10**9},
        "callback_url": {"type": "string", "format": "uri", "maxLength": 2000}}} for spec in specs]
    content: dict[str, Any] = {JSON: {"schema": {"oneOf": variants} if variants else {"type": "object"}}}
    with_files = [spec for spec in specs if spec.files]
    if with_files:
        content[MULTIPART] = {"schema": {"type": "object", "required": ["job"], "properties": {
            "job": {"type": "object", "description": "The JSON submit body; its part comes first"},
            **{f.name: _BINARY for spec in with_files for f in spec.files}}},
            "encoding": {"job": {"contentType": JSON}}}
    return {"required": True, "content": content}


def _file_body(spec: TaskSpec, params: dict[str, Any]) -> dict[str, Any]:
    """A task with file params takes multipart (form fields as params), and with one file a raw body."""
    content: dict[str, Any] = {MULTIPART: {"schema": {
        "type": "object", "required": [f.name for f in spec.files if f.required],
        "properties": {**params.get("properties", {}), **{f.name: _BINARY for f in spec.files}}}}}
    if len(spec.files) == 1:
        content["*/*"] = {"schema": _BINARY}
    return content


def _path_names(path: str) -> list[str]:
    return re.findall(r"{([^}:]+)(?::[^}]*)?}", path)


def _task_operation(spec: TaskSpec) -> dict[str, Any]:
    """A task on its own route: path parameters and the JSON body object become its params."""
    names = _path_names(spec.route[1]) if spec.route else []
    schema = dict(spec.schema or {"type": "object"})
    if names and "properties" in schema:  # the path gives these; the body may omit them
        schema["required"] = [r for r in schema.get("required", []) if r not in names]
        schema["properties"] = {k: v for k, v in schema["properties"].items() if k not in names}
    return {
        "summary": f"Submit a job of task {spec.name!r}",
        "description": spec.description or f"Runs task {spec.name!r}; answers as POST /jobs.",
        "operationId": f"task_{spec.name}",
        "tags": ["tasks"],
        "parameters": [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names]
        + _submit_headers(),
        "requestBody": {"required": False, "content": _file_body(spec, schema) if spec.files else {
            JSON: {"schema": schema}}},
        "responses": {**_submit_answers(), **({"404": _problem(404, "No such route")} if names else {})},
    }


def _job_answers(*extra: int) -> dict[str, Any]:
    return {**_common_problems(404, 410, *extra)}


def _paths(specs: list[TaskSpec]) -> dict[str, Any]:
    job_id = _PARAMS["job_id"]
    paths: dict[str, Any] = {
        "/jobs": {
            "post": {"summary": "Submit a job", "operationId": "submit", "tags": ["jobs"],
                     "parameters": _submit_headers(), "requestBody": _submit_body(specs),
                     "responses": _submit_answers()},
            "get": {"summary": "List jobs, newest first", "operationId": "list_jobs", "tags": ["jobs"],
                    "parameters": [_PARAMS[p] for p in ("status", "task", "limit", "cursor", "owner")],
                    "responses": {"200": {"description": "A page of jobs", "headers": {"Link": _HEADERS["Link"]},
                                          "content": {JSON: {"schema": _ref("JobList")}}},
                                  **_common_problems()}},
        },
        "/jobs/{job_id}": {
            "get": {"summary": "The status monitor (with wait: a long poll)", "operationId": "monitor",
                    "tags": ["jobs"],
                    "parameters": [job_id, _PARAMS["wait"], _PARAMS["redirect"], _PARAMS["prefer"],
                                   _PARAMS["if_none_match"]],
                    "responses": {
                        "200": {**_job("Queued or running (with Retry-After), failed or canceled, or succeeded "
                                       "with redirect=false", "Retry-After", "ETag", "Preference-Applied"),
                                "content": _JOB_OR_PAGE},
                        "202": {**_job("Monitor style flow: queued or running", "Location", "Retry-After", "ETag"),
                                "content": _JOB_OR_PAGE},
                        "303": _job("Succeeded: the result is at Location", "Location", "ETag"),
                        "304": {"description": "If-None-Match matched: no change (after the wait, if any)",
                                "headers": {"ETag": _HEADERS["ETag"]}},
                        **_job_answers(),
                        # A browser asking for a missing or expired job gets a page with the same status.
                        **{str(s): _problem_or_page(s) for s in (404, 410)}}},
            "delete": {"summary": "Cancel if needed, then forget", "operationId": "delete", "tags": ["jobs"],
                       "parameters": [job_id],
                       "responses": {"204": {"description": "Forgotten"},
                                     "202": _job("Still stopping after the cancel grace; forgotten once stopped",
                                                 "ETag"),
                                     **_job_answers(403)}},
        },
        "/jobs/{job_id}/result": {
            "get": {"summary": "The result resource", "operationId": "result", "tags": ["jobs"],
                    "parameters": [job_id],
                    "responses": {
                        "200": {"description": "Succeeded: the result (JSON, or bytes with the handler's type; a "
                                               "file result with Content-Disposition, a strong ETag, Repr-Digest)",
                                "headers": {"ETag": _HEADERS["ETag"]},
                                "content": {JSON: {"schema": {}}, "*/*": {"schema": _BINARY}}},
                        "206": {"description": "One range of a file result (Content-Range)",
                                "content": {"*/*": {"schema": _BINARY}}},
                        "304": {"description": "If-None-Match or If-Modified-Since: the file result has not"
                                               " changed"},
                        **_job_answers(409, 412, 416),
                        "404": _problem(404, "No such job; or queued or running (with job_status and Retry-After)",
                                        "Retry-After"),
                        "409": _problem(409, "Failed or canceled: no result, ever (with job_status and error)")}},
        },
        "/jobs/{job_id}/cancel": {
            "post": {"summary": "Cancel, keep the record", "operationId": "cancel", "tags": ["jobs"],
                     "parameters": [job_id],
                     "responses": {"200": _job("Canceled (or already canceled)", "ETag"),
                                   "202": _job("Still stopping after the cancel grace", "ETag"),
                                   **_job_answers(403, 409),
                                   "409": _problem(409, "Already succeeded or failed (with job_status)")}},
        },
        "/jobs/{job_id}/events": {
            "get": {"summary": "Server-Sent Events: the job now, then each change, ending after the terminal one",
                    "operationId": "events", "tags": ["push"], "parameters": [job_id, _PARAMS["last_event_id"]],
                    "responses": {"200": {"description": "event: status | progress; data: the job; id: its version",
                                          "content": {"text/event-stream": {"schema": _ref("JobEvent")}}},
                                  **_job_answers()}},
        },
        "/ws": {
            "get": {"summary": "WebSocket push channel (subscribe / unsubscribe; job, subscribed, error frames)",
                    "operationId": "websocket", "tags": ["push"],
                    "responses": {"101": {"description": "Switching Protocols"}, **_common_problems()}},
        },
        "/tasks": {
            "get": {"summary": "Registered tasks", "operationId": "list_tasks", "tags": ["operations"],
                    "responses": {"200": {"description": "The tasks", "content": {JSON: {"schema": {
                        "type": "object", "required": ["tasks"],
                        "properties": {"tasks": {"type": "array", "items": _ref("Task")}}}}}},
                                  **_common_problems()}},
        },
        "/healthz": {
            "get": {"summary": "Liveness, and how many clients wait on each channel", "operationId": "healthz",
                    "tags": ["operations"], "security": [],
                    "responses": {"200": {"description": "Alive", "content": {JSON: {"schema": _ref("Health")}}},
                                  **_common_problems(),
                                  "503": {"description": "The store does not answer (Retry-After)",
                                          "content": {JSON: {"schema": _ref("Health")}}}}},
        },
        "/metrics": {
            "get": {"summary": "Prometheus metrics (text exposition format)", "operationId": "metrics",
                    "tags": ["operations"],
                    "responses": {"200": {"description": "Jobs by status, counters and histograms by task, waiting "
                                                         "clients, store commit latency",
                                          "content": {"text/plain": {"schema": {"type": "string"}}}},
                                  **_common_problems()}},
        },
        "/openapi.json": {
            "get": {"summary": "This document", "operationId": "openapi", "tags": ["operations"],
                    "responses": {"200": {"description": "OpenAPI 3.1",
                                          "content": {JSON: {"schema": {"type": "object"}}}},
                                  **_common_problems()}},
        },
        "/": {
            "get": {"summary": "The dashboard for a browser (Accept: text/html); for others a JSON index",
                    "operationId": "index", "tags": ["pages"],
                    "responses": {"200": {"description": "Links, counts by status, workers, tasks, run-time figures",
                                          "content": {JSON: {"schema": {
                                              "type": "object", "required": ["service", "links", "counts"],
                                              "properties": {"service": {"const": "asyncjobs"},
                                                             "links": {"type": "object"},
                                                             "counts": {"type": "object"}}}},
                                                      "text/html": {"schema": {"type": "string"}}}},
                                  **_common_problems()}},
        },
        "/static/{name}": {
            "get": {"summary": "A stylesheet, script or icon of the pages", "operationId": "static_file",
                    "tags": ["pages"],
                    "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {"200": {"description": "The file", "content": {"*/*": {"schema": {}}}},
                                  "304": {"description": "Not modified"},
                                  **_common_problems(404)}},
        },
    }
    for spec in specs:
        if spec.route is not None:
            method, path = spec.route
            openapi_path = re.sub(r"{([^}:]+):[^}]*}", r"{\1}", path)
            paths.setdefault(openapi_path, {})[method.lower()] = _task_operation(spec)
    return paths


_HTML = {"text/html": {"schema": {"type": "string"}}}
_FORM = "application/x-www-form-urlencoded"
SIGN_IN_PATHS: dict[str, Any] = {  # served with auth on (PROTOCOL.md, "Browser sign-in")
    "/login": {
        "get": {"summary": "The sign-in page: one field for a bearer token", "operationId": "login_page",
                "tags": ["pages"], "security": [],
                "parameters": [{"name": "next", "in": "query", "schema": {"type": "string"},
                                "description": "A local path to go to once signed in"}],
                "responses": {"200": {"description": "The page", "content": _HTML}, **_common_problems()}},
        "post": {"summary": "Sign in: a valid token sets the session cookie", "operationId": "login",
                 "tags": ["pages"], "security": [],
                 "requestBody": {"required": True, "content": {_FORM: {"schema": {
                     "type": "object", "required": ["token"],
                     "properties": {"token": {"type": "string"}, "next": {"type": "string"}}}}}},
                 "responses": {"303": {"description": "Signed in (Set-Cookie): to next if local, else to /",
                                       "headers": {"Location": _HEADERS["Location"]}},
                               **_common_problems(403, 415),
                               "401": {"description": "A wrong token: the page again, and no session",
                                       "content": _HTML}}},
    },
    "/logout": {
        "post": {"summary": "Sign out: the session ends and its cookie is cleared (CSRF token required)",
                 "operationId": "logout", "tags": ["pages"],
                 "requestBody": {"required": False, "content": {_FORM: {"schema": {
                     "type": "object", "properties": {"csrf_token": {"type": "string"}}}}}},
                 "responses": {"303": {"description": "Signed out: to /login",
                                       "headers": {"Location": _HEADERS["Location"]}},
                               **_common_problems(403)}},
    },
}


def build_document(specs: Iterable[TaskSpec], *, version: str, sign_in: bool = False) -> dict[str, Any]:
    """The whole protocol as OpenAPI 3.1, with one submit variant (and route) per registered task, and with
    ``sign_in`` (auth on) the browser sign-in routes."""
    specs = list(specs)
    paths = _paths(specs)
    if sign_in:
        paths.update(SIGN_IN_PATHS)
    return {
        "openapi": "3.1.0",
        "info": {"title": "asyncjobs", "version": version,
                 "description": "Asynchronous request-reply over HTTP: submit, get 202 and a Location, then poll, "
                                f"long-poll, or be pushed the job. Protocol version {PROTOCOL_VERSION}."},
        "servers": [{"url": "/"}],
        "security": [{}, {"bearer": []}],
        "tags": [{"name": n} for n in ("jobs", "push", "tasks", "operations", "pages")],
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "Required on every path but /healthz when auth is on"}},
        },
    }
