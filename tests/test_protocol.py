"""The protocol's HTTP decisions, as pure functions (no server)."""

import pytest

from asyncjobs import codec, protocol
from asyncjobs.errors import InvalidRequest
from asyncjobs.models import Job, Status


def make_job(status: Status, **changes) -> Job:
    base = dict(id="abc", task="echo", params=b"{}", status=status, priority=0, created_at=100.0,
                expires_at=1000.0, run_at=100.0, max_attempts=1, version=3)
    return Job(**{**base, **changes})


@pytest.mark.parametrize("status,style,redirect,code,location", [
    (Status.QUEUED, "rest", True, 200, None),
    (Status.RUNNING, "rest", True, 200, None),
    (Status.SUCCEEDED, "rest", True, 303, "/jobs/abc/result"),
    (Status.SUCCEEDED, "rest", False, 200, None),
    (Status.FAILED, "rest", True, 200, None),
    (Status.CANCELED, "rest", True, 200, None),
    (Status.QUEUED, "flow", True, 202, "/jobs/abc"),
    (Status.RUNNING, "flow", True, 202, "/jobs/abc"),
    (Status.SUCCEEDED, "flow", True, 200, None),
    (Status.FAILED, "flow", True, 200, None),
])
def test_monitor_answer(status, style, redirect, code, location):
    """The monitor's status code and Location for each status, in both styles."""
    answer = protocol.monitor_answer(make_job(status), eta=None, now=100.0, style=style, redirect=redirect)
    assert answer.status == code
    assert answer.headers.get("Location") == location
    assert answer.headers["ETag"] == 'W/"3"' and answer.headers["Cache-Control"] == "no-store"
    assert ("Retry-After" in answer.headers) == (status in (Status.QUEUED, Status.RUNNING))


@pytest.mark.parametrize("status,code", [
    (Status.QUEUED, 404), (Status.RUNNING, 404), (Status.SUCCEEDED, 200),
    (Status.FAILED, 409), (Status.CANCELED, 409),
])
def test_result_answer(status, code):
    """The result resource: 200 when succeeded, 404 + Retry-After while pending, 409 when it never will."""
    answer = protocol.result_answer(make_job(status), eta=None, now=100.0)
    assert answer.status == code
    assert ("Retry-After" in answer.headers) == (code == 404)


def test_a_succeeded_result_whose_etag_the_client_holds_is_304():
    """RFC 9110 13.1.2: If-None-Match naming the result's ETag (or ``*``) answers 304; only a result has one."""
    done = make_job(Status.SUCCEEDED)
    for held in ('W/"3"', '"3"', '"9", W/"3"', "*"):
        assert protocol.result_answer(done, eta=None, now=100.0, if_none_match=held).status == 304, held
    assert protocol.result_answer(done, eta=None, now=100.0, if_none_match='W/"2"').status == 200
    assert protocol.result_answer(make_job(Status.RUNNING), eta=None, now=100.0, if_none_match="*").status == 404


def test_preference_applied_writes_the_wait_without_exponents():
    """``wait=N`` as asked (clamped): whole seconds as an integer, a fraction in plain decimals."""
    assert [protocol.wait_headers(s)["Preference-Applied"] for s in (20.0, 0.5, 1e-07, 1e-05, 0.0)] == [
        "wait=20", "wait=0.5", "wait=0.0000001", "wait=0.00001", "wait=0"]


def test_submit_answer_headers():
    """202 carries Location, Content-Location, Retry-After, ETag and no-store."""
    answer = protocol.submit_answer(make_job(Status.QUEUED), eta=None, now=0)
    assert answer.status == 202
    assert answer.headers["Location"] == answer.headers["Content-Location"] == "/jobs/abc"
    assert answer.headers["Retry-After"] == "1"


@pytest.mark.parametrize("eta,now,expected", [
    (None, 10.0, 1), (10.2, 10.0, 1), (13.5, 10.0, 4), (5.0, 10.0, 1), (10_000.0, 10.0, 60),
])
def test_retry_after_from_eta(eta, now, expected):
    """Retry-After is the seconds to the ETA, rounded up, at least 1 and at most 60."""
    assert protocol.retry_after_s(eta, now) == expected


@pytest.mark.parametrize("header,matches", [
    (None, False), ("", False), ('W/"3"', True), ('"3"', True), ('"2", W/"3"', True), ("*", True),
    ('"4"', False), ('garbage', False),
])
def test_etag_weak_comparison(header, matches):
    """If-None-Match uses the weak comparison of RFC 9110 over a list of tags."""
    assert protocol.etag_matches(header, 'W/"3"') is matches


@pytest.mark.parametrize("content_type,ok", [
    ("application/json", True), ("application/json; charset=utf-8", True), ("APPLICATION/JSON", True),
    ("application/merge-patch+json", True), ("text/plain", False), (None, False), ("", False),
    ("application/jsonx", False),
])
def test_json_content_types(content_type, ok):
    """JSON bodies are application/json or a +json type, with any parameters."""
    assert protocol.is_json_content_type(content_type) is ok


def test_job_body_fields():
    """The representation carries every field of the protocol, with nulls where they do not apply."""
    job = make_job(Status.SUCCEEDED, result=b'{"a":1}', finished_at=101.0)
    body = codec.loads(codec.dumps(protocol.job_body(job)))
    assert set(body) >= {"id", "task", "status", "created_at", "started_at", "finished_at", "expires_at",
                         "attempts", "priority", "version", "progress", "eta", "queue_position",
                         "result", "error", "links"}
    assert body["result"] == {"a": 1} and body["error"] is None and body["eta"] is None
    assert body["created_at"].endswith("Z")
    assert body["links"]["cancel"] == {"href": "/jobs/abc/cancel", "method": "POST"}


def test_job_body_bytes_result_is_described():
    """A bytes result is described (type, size, href), not inlined."""
    job = make_job(Status.SUCCEEDED, result=b"\x00\x01", result_type="image/png")
    assert protocol.job_body(job)["result"] == {"content_type": "image/png", "size": 2,
                                                "href": "/jobs/abc/result"}


@pytest.mark.parametrize("body,field", [
    ([], ""), ({"task": "x", "priority": "high"}, "priority"), ({"task": "x", "priority": True}, "priority"),
    ({"task": "x", "delay": -1}, "delay"), ({"task": "x", "bogus": 1}, "bogus"),
])
def test_parse_submit_rejects(body, field):
    """A submit body of the wrong shape is a 400 naming the field."""
    with pytest.raises(InvalidRequest) as info:
        protocol.parse_submit(body)
    assert any(e["field"] == field for e in info.value.errors)


def test_parse_submit_defaults():
    """params defaults to {}, priority to 0, delay to 0."""
    assert protocol.parse_submit({"task": "noop"}) == protocol.Submit("noop", {}, 0, 0.0, None)


@pytest.mark.parametrize("query,field", [
    ({"status": "done"}, "status"), ({"limit": "0"}, "limit"), ({"limit": "501"}, "limit"),
    ({"limit": "x"}, "limit"), ({"cursor": "-3"}, "cursor"), ({"cursor": "abc"}, "cursor"),
    ({"cursor": str(2**63)}, "cursor"),
])
def test_list_query_rejects(query, field):
    """Bad list filters are a 400 naming the field."""
    with pytest.raises(InvalidRequest) as info:
        protocol.parse_list_query(query)
    assert info.value.errors[0]["field"] == field


def test_next_page_url():
    """The next page keeps the filters and carries the cursor; no cursor, no next page."""
    assert protocol.next_page_url(status="queued", task=None, limit=3, cursor=7) == \
        "/jobs?status=queued&limit=3&cursor=7"
    assert protocol.next_page_url(status=None, task=None, limit=3, cursor=None) is None


@pytest.mark.parametrize("text, deep", [
    ('{"x": ' + "[" * 63 + "]" * 63 + "}", False),  # 64 levels: the limit
    ('{"x": ' + "[" * 64 + "]" * 64 + "}", True),
    ('{"x": "' + "[{" * 100 + '"}', False),  # brackets in a string nest nothing
    ("[" + ", ".join(["[]"] * 100) + "]", False),  # many brackets, two levels
    ('{"task": "noop", "params": {"a": [1, {"b": 2}]}}', False),
])
def test_too_deep_counts_levels_not_brackets(text: str, deep: bool) -> None:
    raw = text.encode()
    assert protocol.too_deep(raw, codec.loads(raw)) is deep
    assert protocol.too_deep(raw, codec.loads(raw)) is (protocol.json_depth(codec.loads(raw)) > protocol.MAX_JSON_DEPTH)


def test_a_refusal_about_a_job_carries_its_etag():
    """Every response about a job carries ETag: a domain error that names the job's version (cancel's 409, a
    410 whose record was still read) gets the same tag as the job's own answers; one that names none, none."""
    from asyncjobs.errors import JobGone, StateConflict
    from asyncjobs.web import problems

    for error, status in ((StateConflict("already succeeded", job_status="succeeded", job_version=4), 409),
                          (JobGone("expired", job_status="canceled", job_version=7), 410)):
        body, headers = problems.answer(error)
        assert body["status"] == status and body["job_status"] == error.job_status
        assert headers["ETag"] == protocol.version_etag(error.job_version or 0) == f'W/"{error.job_version}"'
    assert "ETag" not in problems.answer(JobGone("expired"))[1]
