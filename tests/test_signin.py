"""Browser sign-in (PROTOCOL "Browser sign-in"): /login, the session cookie, /logout, CSRF, and isolation
through sessions, against a real server (aiohttp's test server; cookies sent by hand, no cookie jar)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import time
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from itsdangerous import TimestampSigner
from multidict import CIMultiDict

from asyncjobs.web import session as session_module
from asyncjobs.web.common import SESSIONS_KEY
from asyncjobs.web.session import COOKIE_NAME, cookie_attributes, cookie_key, is_https, safe_next, same_origin

from .conftest import recv, recv_until, wait_status

BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
PROBLEM = "application/problem+json"
ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789ab"
ROOT = "root-token-0123456789abc"
TOKENS = {"alice": ALICE, "bob": BOB, "root": ROOT}
FORM = "application/x-www-form-urlencoded"


# -- helpers -----------------------------------------------------------------------

@pytest.fixture
def start(app_factory, aiohttp_client):
    """An App with alice, bob and root (an admin), behind a real test server whose client keeps no cookies."""

    async def start_(tokens: dict[str, str] | None = None, admins: list[str] | None = None, **auth: Any):
        app = app_factory(auth={"tokens": TOKENS if tokens is None else tokens,
                                "admins": ["root"] if admins is None else admins, **auth},
                          queue={"shutdown_grace": 0.2})
        client = await aiohttp_client(app.web, cookie_jar=aiohttp.DummyCookieJar())
        return client, app

    return start_


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def cookie(value: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE_NAME}={value}"}


def set_cookie(resp: aiohttp.ClientResponse) -> tuple[str, dict[str, str], str]:
    """The session cookie a response sets: (value, attributes by lower-case name, the raw header)."""
    headers = [h for h in resp.headers.getall("Set-Cookie", []) if h.startswith(COOKIE_NAME + "=")]
    assert len(headers) == 1, resp.headers.getall("Set-Cookie", [])
    raw = headers[0]
    parsed = SimpleCookie()
    parsed.load(raw)
    morsel = parsed[COOKIE_NAME]
    flags = {part.strip().split("=")[0].lower(): (part.strip().split("=", 1) + [""])[1]
             for part in raw.split(";")[1:]}
    return morsel.value, flags, raw


async def login(client, token: str, next_path: str = "/", headers: dict[str, str] | None = None):
    return await client.post("/login", data={"token": token, "next": next_path}, allow_redirects=False,
                             headers=headers)


async def sign_in(client, token: str) -> tuple[str, str]:
    """Sign in: (the cookie value, the CSRF token its pages carry)."""
    resp = await login(client, token)
    assert resp.status == 303, await resp.text()
    value, _, _ = set_cookie(resp)
    return value, await csrf_of(client, value)


async def csrf_of(client, value: str) -> str:
    resp = await client.get("/", headers={**cookie(value), "Accept": BROWSER}, allow_redirects=False)
    assert resp.status == 200, (resp.status, await resp.text())
    match = re.search(r'<meta name="csrf-token" content="([^"]*)">', await resp.text())
    assert match, "no csrf-token meta"
    return match.group(1)


def with_csrf(value: str, csrf: str) -> dict[str, str]:
    return {**cookie(value), "X-CSRF-Token": csrf}


async def assert_problem(resp: aiohttp.ClientResponse, status: int, what: str = "") -> dict:
    text = await resp.text()
    assert resp.status == status, f"{what}: {resp.status} {text}"
    assert resp.content_type == PROBLEM, f"{what}: {resp.content_type}"
    return json.loads(text)


async def assert_refused(client, value: str, what: str) -> None:
    """A cookie that does not authenticate: 401 problem for the API, 303 to sign in for a page."""
    resp = await client.get("/jobs", headers=cookie(value))
    await assert_problem(resp, 401, f"{what}: API")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    resp = await client.get("/", headers={**cookie(value), "Accept": BROWSER}, allow_redirects=False)
    assert resp.status == 303, f"{what}: page {resp.status}"
    assert resp.headers["Location"] == "/login?next=%2F"


async def submit_as(client, headers: dict[str, str], task: str, params: dict | None = None) -> dict:
    resp = await client.post("/jobs", json={"task": task, "params": params or {}}, headers=headers)
    assert resp.status == 202, await resp.text()
    return await resp.json()


# -- signing in --------------------------------------------------------------------

async def test_login_page_has_one_token_field_and_next_hidden(start):
    client, _ = await start()
    resp = await client.get("/login?next=/jobs/abc%3Fx%3D1")
    assert resp.status == 200 and resp.content_type == "text/html"
    text = await resp.text()
    assert len(re.findall(r"<input[^>]*name=\"token\"", text)) == 1
    assert re.search(r'<input type="hidden" name="next" value="/jobs/abc\?x=1">', text), text
    assert 'type="password"' in text and 'action="/login"' in text and 'method="post"' in text
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    # An off-site next never even reaches the form; markup in it is never markup.
    for bad in ("//evil.example", "/\"><script>alert(1)</script>"):
        text = await (await client.get("/login", params={"next": bad})).text()
        assert 'name="next" value="/"' in text, bad
        assert "<script>" not in text
    # The page's own files load without a session.
    for name in ("style.css", "icon.svg"):
        assert (await client.get(f"/static/{name}")).status == 200


async def test_login_sets_the_session_cookie_with_every_attribute(start):
    client, _ = await start(session_ttl=3600)
    resp = await login(client, ALICE, "/jobs?status=queued")
    assert resp.status == 303, await resp.text()
    assert resp.headers["Location"] == "/jobs?status=queued"
    assert resp.headers["Cache-Control"] == "no-store"
    value, flags, raw = set_cookie(resp)
    assert "httponly" in flags, raw
    assert flags.get("samesite") == "Strict", raw
    assert flags.get("path") == "/", raw
    assert flags.get("max-age") == "3600", raw
    assert "secure" not in flags, raw  # plain HTTP here
    assert "domain" not in flags, raw  # host-only
    # The cookie is not the token, and does not carry it in any encoding.
    assert ALICE not in raw
    assert base64.urlsafe_b64encode(ALICE.encode()).decode().rstrip("=") not in raw
    assert hashlib.sha256(ALICE.encode()).hexdigest() not in raw
    # It authenticates as alice: the redirect's target answers.
    follow = await client.get(resp.headers["Location"], headers=cookie(value))
    assert follow.status == 200 and (await follow.json())["jobs"] == []
    job = await submit_as(client, bearer(ALICE), "noop")
    listed = await (await client.get("/jobs", headers=cookie(value))).json()
    assert [j["id"] for j in listed["jobs"]] == [job["id"]] and listed["jobs"][0]["owner"] == "alice"


async def test_each_sign_in_is_a_new_session_and_the_previous_one_ends(start):
    client, _ = await start()
    first, _ = await sign_in(client, ALICE)
    resp = await login(client, ALICE, headers=cookie(first))
    assert resp.status == 303
    second, _, _ = set_cookie(resp)
    assert second != first
    await assert_refused(client, first, "the session before signing in again")
    assert (await client.get("/jobs", headers=cookie(second))).status == 200


def test_secure_is_decided_by_https():
    """Secure when the connection is TLS, or a proxy says the browser used https; never dropped by a header."""
    assert is_https(True, CIMultiDict())
    assert is_https(True, CIMultiDict({"X-Forwarded-Proto": "http"}))
    assert not is_https(False, CIMultiDict())
    assert not is_https(False, CIMultiDict({"X-Forwarded-Proto": "http"}))
    assert is_https(False, CIMultiDict({"X-Forwarded-Proto": "https"}))
    assert is_https(False, CIMultiDict({"X-Forwarded-Proto": "HTTPS, http"}))
    assert is_https(False, CIMultiDict({"Forwarded": 'for=192.0.2.1;proto=https;host="a.example"'}))
    assert not is_https(False, CIMultiDict({"Forwarded": "for=192.0.2.1;proto=http"}))
    assert cookie_attributes(max_age_s=60, secure=True) == {
        "max_age": 60, "path": "/", "httponly": True, "samesite": "Strict", "secure": True}
    assert cookie_attributes(max_age_s=0.4, secure=False)["max_age"] == 1  # never 0: that deletes it


async def test_secure_cookie_when_the_proxy_says_https(start):
    client, _ = await start()
    resp = await login(client, ALICE, headers={"X-Forwarded-Proto": "https"})
    assert resp.status == 303
    _, flags, raw = set_cookie(resp)
    assert "secure" in flags and flags["samesite"] == "Strict" and "httponly" in flags, raw
    resp = await client.post("/logout", headers={"X-Forwarded-Proto": "https"}, allow_redirects=False)
    _, flags, raw = set_cookie(resp)
    assert "secure" in flags and flags["max-age"] == "0", raw


async def test_wrong_token_gets_the_page_again_with_401_and_no_session(start):
    client, _ = await start()
    for token in ("mallory-token-0123456789", ALICE[:-1], ALICE + "x", "", " ", BOB.upper()):
        resp = await login(client, token, "/jobs/abc")
        assert resp.status == 401, token
        assert resp.content_type == "text/html"
        assert not resp.headers.getall("Set-Cookie", [])
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        text = await resp.text()
        assert 'name="token"' in text and 'role="alert"' in text
        assert 'name="next" value="/jobs/abc"' in text  # kept for the next try
    resp = await client.post("/login", json={"token": ALICE}, allow_redirects=False)
    await assert_problem(resp, 415, "a JSON sign-in")
    assert not resp.headers.getall("Set-Cookie", [])


@pytest.mark.parametrize("next_value", [
    "//evil.example", "//evil.example/jobs", "https://evil.example", "http://evil.example/", "/\\evil.example",
    "\\\\evil.example", "\\/evil.example", "javascript:alert(1)", "JavaScript:alert(1)", "evil.example",
    "/\t/evil.example", "/\n/evil.example", " //evil.example", "", "/jobs\r\nSet-Cookie: x=1",
    "data:text/html,<script>alert(1)</script>", "///evil.example", "/%0a",
])
async def test_next_off_site_always_goes_home(start, next_value):
    client, _ = await start()
    resp = await login(client, ALICE, next_value)
    assert resp.status == 303
    location = resp.headers["Location"]
    assert location == ("/%0a" if next_value == "/%0a" else "/"), location  # "/%0a" is a local path


@pytest.mark.parametrize("value", ["/", "/jobs", "/jobs/abc?redirect=false", "/jobs?status=queued&limit=5", "/%2F%2Fx"])
def test_local_next_is_kept(value):
    assert safe_next(value) == value


@pytest.mark.parametrize("value", ["//x", "/\\x", "\\\\x", "https://x", "javascript:x", "/a\\b", "/\x7f", "/é",
                                   None, 42, "x" * 5000])
def test_other_next_is_home(value):
    assert safe_next(value) == "/"


async def test_sign_in_from_another_origin_is_refused(start):
    """Login CSRF: a foreign page's form cannot sign the browser in (as the attacker)."""
    client, _ = await start()
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
        resp = await login(client, ALICE, headers=headers)
        await assert_problem(resp, 403, str(headers))
        assert not resp.headers.getall("Set-Cookie", [])
    host = client.server.host + ":" + str(client.server.port)
    resp = await login(client, ALICE, headers={"Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin"})
    assert resp.status == 303


async def test_a_burst_of_wrong_sign_ins_each_gets_401_and_the_server_goes_on(start):
    client, _ = await start()
    answers = await asyncio.gather(*(login(client, f"guess-{i:04d}-0123456789abcdef") for i in range(50)))
    assert [r.status for r in answers] == [401] * 50
    assert all(not r.headers.getall("Set-Cookie", []) for r in answers)
    assert (await client.get("/healthz")).status == 200
    value, _ = await sign_in(client, ALICE)
    assert (await client.get("/jobs", headers=cookie(value))).status == 200


@pytest.mark.parametrize("body, charset, status", [(b"token=\xff&next=/", "", 400),
                                                   (b"token=x&next=/", "; charset=no-such-charset", 415)],
                         ids=["not UTF-8", "unknown charset"])
async def test_a_form_that_cannot_be_read_is_a_4xx_problem_on_every_form_route(start, body, charset, status):
    """A sign-in form, and a logout or cancel form sent with the cookie, whose bytes are not text in its
    charset (or whose charset is unknown): 400 or 415, never a 500, and nothing done."""
    client, _ = await start()
    headers = {"Content-Type": FORM + charset}
    resp = await client.post("/login", data=body, headers=headers, allow_redirects=False)
    await assert_problem(resp, status, "login")
    assert not resp.headers.getall("Set-Cookie", [])
    value, _ = await sign_in(client, ALICE)
    job = await submit_as(client, bearer(ALICE), "block", {"seconds": 30})
    form = body.replace(b"token", b"csrf_token")
    for path in (f"/jobs/{job['id']}/cancel", "/logout"):
        resp = await client.post(path, data=form, headers={**headers, **cookie(value)}, allow_redirects=False)
        await assert_problem(resp, status, path)
    assert (await client.get(f"/jobs/{job['id']}", headers=bearer(ALICE))).status == 200
    assert (await client.get("/jobs", headers=cookie(value))).status == 200  # still signed in
    assert (await client.post(f"/jobs/{job['id']}/cancel", headers=bearer(ALICE))).status == 200


# -- which cookies are refused -----------------------------------------------------------

def _resign(value: str, key: bytes) -> str:
    payload = value.rsplit(".", 2)[0]
    return TimestampSigner(key, salt=session_module.SIGNER_SALT, key_derivation="hmac",
                           digest_method=hashlib.sha256).sign(payload).decode()


def _signed_at(offset_s: int, key: bytes, payload: str) -> str:
    """``payload`` signed with ``key`` by a clock ``offset_s`` seconds off this one."""

    class Skewed(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) + offset_s

    return Skewed(key, salt=session_module.SIGNER_SALT, key_derivation="hmac",
                  digest_method=hashlib.sha256).sign(payload).decode()


async def test_forged_truncated_resigned_and_foreign_cookies_are_refused(start):
    client, _ = await start(session_ttl=3600)
    value, _ = await sign_in(client, ALICE)
    bob_value, _ = await sign_in(client, BOB)
    encoded, session_id, stamp, signature = value.split(".")
    bob_encoded = bob_value.split(".")[0]
    right_key = cookie_key("alice", ALICE.encode())
    payload = f"{encoded}.{session_id}"
    bad = {
        "garbage": "garbage",
        "empty": "",
        "the token itself": ALICE,
        "truncated signature": value[:-4],
        "no signature": f"{encoded}.{session_id}",
        "truncated session id": f"{encoded}.{session_id[:-2]}.{stamp}.{signature}",
        "another session id": f"{encoded}.{'A' * len(session_id)}.{stamp}.{signature}",
        "another principal's name": f"{bob_encoded}.{session_id}.{stamp}.{signature}",
        "bob's signature on alice's session": f"{encoded}.{session_id}.{stamp}.{bob_value.split('.')[3]}",
        "re-signed with another key": _resign(value, b"not the key" * 3),
        "re-signed with bob's key for alice": _resign(value, cookie_key("bob", BOB.encode())),
        "right key, unknown session": _resign(f"{encoded}.{'B' * 43}.x.y", right_key),
        "right key, signed two hours ago": _signed_at(-7200, right_key, payload),
        "right key, signed two hours ahead": _signed_at(7200, right_key, payload),
        "very long": value + "A" * 5000,
    }
    for what, forged in bad.items():
        await assert_refused(client, forged, what)
    # Still fine: the real ones, and one signed by a node whose clock is half a minute ahead or behind.
    assert (await client.get("/jobs", headers=cookie(value))).status == 200
    for offset_s in (30, -30):
        assert (await client.get("/jobs", headers=cookie(_signed_at(offset_s, right_key, payload)))).status == 200
    assert (await client.get("/jobs", headers=cookie(bob_value))).status == 200


async def test_an_expired_session_is_refused(start):
    client, _ = await start(session_ttl=1)
    value, _ = await sign_in(client, ALICE)
    assert (await client.get("/jobs", headers=cookie(value))).status == 200
    await asyncio.sleep(1.3)
    await assert_refused(client, value, "after session_ttl")


async def test_logout_ends_the_session_on_the_server(start):
    client, _ = await start()
    value, csrf = await sign_in(client, ALICE)
    other, _ = await sign_in(client, ALICE)  # another browser of alice's
    # Without its CSRF token, or with another session's, the logout is refused and nothing ends.
    for data, headers in (({}, {}), ({"csrf_token": "wrong"}, {}), ({}, {"X-CSRF-Token": await csrf_of(client, other)})):
        resp = await client.post("/logout", data=data, headers={**cookie(value), **headers}, allow_redirects=False)
        await assert_problem(resp, 403, f"logout with {data} {headers}")
    assert (await client.get("/jobs", headers=cookie(value))).status == 200
    # The form's way: csrf_token in an urlencoded body.
    resp = await client.post("/logout", data={"csrf_token": csrf}, headers=cookie(value), allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/login"
    cleared, flags, raw = set_cookie(resp)
    assert cleared == "" and flags.get("max-age") == "0" and flags.get("path") == "/", raw
    await assert_refused(client, value, "after logout")
    assert (await client.get("/jobs", headers=cookie(other))).status == 200  # only that session ended
    # The header's way, too; and a logout without a session just goes to the sign-in page.
    resp = await client.post("/logout", headers=with_csrf(other, await csrf_of(client, other)), allow_redirects=False)
    assert resp.status == 303
    await assert_refused(client, other, "after the second logout")
    resp = await client.post("/logout", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/login"


async def test_sessions_survive_a_restart_but_not_the_removal_or_change_of_their_token(start):
    client, _ = await start()
    alice, _ = await sign_in(client, ALICE)
    bob, _ = await sign_in(client, BOB)
    job = await submit_as(client, bearer(ALICE), "noop")
    await client.close()

    # Restarted on the same store without bob: alice's session goes on, bob's is refused.
    client, _ = await start(tokens={"alice": ALICE, "root": ROOT})
    resp = await client.get(f"/jobs/{job['id']}?redirect=false", headers=cookie(alice))
    assert resp.status == 200, await resp.text()
    await assert_refused(client, bob, "bob's session once bob's token is gone")
    await client.close()

    # Bob is back with another token: his old session stays dead; alice's token changes: hers dies too.
    client, _ = await start(tokens={"alice": "alice-new-token-0123456789", "bob": "bob-new-token-0123456789",
                                    "root": ROOT})
    await assert_refused(client, bob, "bob's session under a new token")
    await assert_refused(client, alice, "alice's session under a new token")


# -- redirects and the page's token ------------------------------------------------------

async def test_pages_without_a_session_redirect_to_sign_in_and_api_clients_get_401(start):
    client, _ = await start()
    job = await submit_as(client, bearer(ALICE), "noop")
    for path in ("/", f"/jobs/{job['id']}", f"/jobs/{job['id']}?redirect=false&x=%C3%A9", "/jobs?status=queued"):
        resp = await client.get(path, headers={"Accept": BROWSER}, allow_redirects=False)
        assert resp.status == 303, path
        location = resp.headers["Location"]
        assert parse_qs(urlsplit(location).query)["next"] == [path], (path, location)
        assert location.startswith("/login?next=%2F")
        assert "Accept" in resp.headers["Vary"]
        resp = await client.get(path, allow_redirects=False)
        body = await assert_problem(resp, 401, path)
        assert body["status"] == 401 and "Accept" in resp.headers.get("Vary", "")
    # A browser's POST is not a page: 401 problem, not a redirect.
    resp = await client.post("/jobs", json={"task": "noop"}, headers={"Accept": BROWSER}, allow_redirects=False)
    await assert_problem(resp, 401, "POST from a browser")


async def test_every_page_carries_the_sessions_csrf_token_and_only_with_a_session(start):
    client, _ = await start()
    value, csrf = await sign_in(client, ALICE)
    assert len(csrf) >= 32
    job = await submit_as(client, bearer(ALICE), "noop")
    for path in ("/", f"/jobs/{job['id']}", "/jobs/no-such-job"):
        text = await (await client.get(path, headers={**cookie(value), "Accept": BROWSER})).text()
        assert f'<meta name="csrf-token" content="{csrf}">' in text, path
        assert 'action="/logout"' in text and f'name="csrf_token" value="{csrf}"' in text, path
        assert "Signed in as" in text and ">alice<" in text, path
        text = await (await client.get(path, headers={**bearer(ALICE), "Accept": BROWSER})).text()
        assert '<meta name="csrf-token" content="">' in text, path
        assert 'action="/logout"' not in text, path
    _, other_csrf = await sign_in(client, ALICE)
    assert other_csrf != csrf  # one token per session


# -- CSRF -----------------------------------------------------------------------------------

async def test_state_changing_cookie_requests_need_the_csrf_token(start):
    client, _ = await start()
    value, csrf = await sign_in(client, ALICE)
    _, other_csrf = await sign_in(client, ALICE)
    _, bob_csrf = await sign_in(client, BOB)
    running = await submit_as(client, bearer(ALICE), "block", {"seconds": 30})
    await wait_status(client, running["id"], "running", headers=bearer(ALICE))
    body = {"task": "echo", "params": {"n": 1}}
    refused = {
        "no token": {},
        "an empty token": {"X-CSRF-Token": ""},
        "a wrong token": {"X-CSRF-Token": "x" * 43},
        "a prefix of the token": {"X-CSRF-Token": csrf[:-1]},
        "another session's token": {"X-CSRF-Token": other_csrf},
        "another principal's token": {"X-CSRF-Token": bob_csrf},
        "the session cookie's value": {"X-CSRF-Token": value},
    }
    for what, headers in refused.items():
        for method, path, kwargs in (("POST", "/jobs", {"json": body}),
                                     ("POST", f"/jobs/{running['id']}/cancel", {}),
                                     ("DELETE", f"/jobs/{running['id']}", {}),
                                     ("POST", "/thumbnails", {"json": {"url": "http://example.com/a.png"}}),
                                     ("DELETE", "/items/abc", {})):
            resp = await client.request(method, path, headers={**cookie(value), **headers}, **kwargs)
            problem = await assert_problem(resp, 403, f"{method} {path} with {what}")
            assert "CSRF" in problem["detail"]
    # An urlencoded csrf_token is a plain form's way, for the routes a form posts to; not for a submit.
    resp = await client.post("/jobs", data={"csrf_token": csrf, "task": "noop"}, headers=cookie(value))
    await assert_problem(resp, 403, "POST /jobs with a form field")
    # Nothing happened.
    listed = await (await client.get("/jobs", headers=bearer(ALICE))).json()
    assert [j["id"] for j in listed["jobs"]] == [running["id"]]
    assert listed["jobs"][0]["status"] == "running"
    # With the right token: submitted, cancelled (the form field is accepted on cancel), deleted.
    resp = await client.post("/jobs", json=body, headers=with_csrf(value, csrf))
    assert resp.status == 202, await resp.text()
    assert (await resp.json())["owner"] == "alice"
    resp = await client.post(f"/jobs/{running['id']}/cancel", data={"csrf_token": csrf}, headers=cookie(value))
    assert resp.status == 200 and (await resp.json())["status"] == "canceled", await resp.text()
    resp = await client.delete(f"/jobs/{running['id']}", headers=with_csrf(value, csrf))
    assert resp.status == 204
    # Reading needs no token; a bearer request needs none for anything.
    assert (await client.get("/jobs", headers=cookie(value))).status == 200
    resp = await client.post("/jobs", json=body, headers=bearer(ALICE))
    assert resp.status == 202
    # A bearer token decides alone, even with a cookie and no CSRF token.
    resp = await client.post("/jobs", json=body, headers={**bearer(BOB), **cookie(value)})
    assert resp.status == 202 and (await resp.json())["owner"] == "bob"


async def test_a_task_mounted_on_get_needs_the_csrf_token_with_the_cookie(app_factory, aiohttp_client):
    """A GET task route submits a job: with the cookie it needs the CSRF token as a POST does (an image tag
    on a sibling site cannot submit); the other GETs need none."""
    app = app_factory(auth={"tokens": TOKENS}, queue={"shutdown_grace": 0.2},
                      tasks={"modules": ["asyncjobs.builtin", "tests.get_route_tasks"]})
    client = await aiohttp_client(app.web, cookie_jar=aiohttp.DummyCookieJar())
    value, csrf = await sign_in(client, ALICE)
    resp = await client.get("/lookups/k1", headers=cookie(value))
    await assert_problem(resp, 403, "GET /lookups/k1 with the cookie and no CSRF token")
    assert (await (await client.get("/jobs", headers=cookie(value))).json())["jobs"] == []
    resp = await client.get("/lookups/k1", headers=with_csrf(value, csrf))
    assert resp.status == 202 and (await resp.json())["owner"] == "alice"
    assert (await client.get("/lookups/k2", headers=bearer(ALICE))).status == 202


async def test_a_cookie_request_from_another_origin_is_refused(start):
    client, _ = await start()
    value, csrf = await sign_in(client, ALICE)
    host = f"{client.server.host}:{client.server.port}"
    for origin in ("http://evil.example", f"http://sub.{host}", "null", f"https://{host}.evil.example"):
        resp = await client.post("/jobs", json={"task": "noop"}, headers={**with_csrf(value, csrf), "Origin": origin})
        await assert_problem(resp, 403, origin)
        resp = await client.get("/jobs", headers={**cookie(value), "Origin": origin})
        await assert_problem(resp, 403, origin)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect("/ws", headers={**cookie(value), "Origin": origin})
        assert refused.value.status == 403
    resp = await client.post("/jobs", json={"task": "noop"}, headers={**with_csrf(value, csrf), "Origin": f"http://{host}"})
    assert resp.status == 202, await resp.text()
    # Behind a proxy that rewrites Host, the forwarded host is this origin too.
    resp = await client.get("/jobs", headers={**cookie(value), "Origin": "https://jobs.example.com",
                                              "X-Forwarded-Host": "jobs.example.com"})
    assert resp.status == 200
    ws = await client.ws_connect("/ws", headers={**cookie(value), "Origin": f"http://{host}"})
    await ws.send_json({"op": "subscribe", "jobs": "*"})
    assert (await recv(ws))["type"] == "subscribed"
    await ws.close()


def test_same_origin_rules():
    assert same_origin("http://a.example:8080", ["a.example:8080"])
    assert same_origin("https://a.example", ["a.example:443"])
    assert same_origin("https://A.example", ["a.example"])
    assert not same_origin("http://a.example:8081", ["a.example:8080"])
    assert not same_origin("null", ["a.example"])
    assert not same_origin("http://b.a.example", ["a.example"])
    assert not same_origin("ftp://a.example", ["a.example"])
    assert not same_origin("", ["a.example"])


# -- isolation through sessions --------------------------------------------------------------

async def test_a_session_never_sees_another_principals_jobs_and_admins_see_all(start):
    client, _ = await start()
    alice, alice_csrf = await sign_in(client, ALICE)
    root, root_csrf = await sign_in(client, ROOT)
    bobs_running = await submit_as(client, bearer(BOB), "block", {"seconds": 30})
    bobs_done = await submit_as(client, bearer(BOB), "echo", {"secret": "bob's"})
    alices = await submit_as(client, with_csrf(alice, alice_csrf), "echo", {"mine": True})
    await wait_status(client, bobs_running["id"], "running", headers=bearer(BOB))
    await wait_status(client, bobs_done["id"], "succeeded", headers=bearer(BOB))
    await wait_status(client, alices["id"], "succeeded", headers=bearer(ALICE))

    for job in (bobs_running, bobs_done):
        jid = job["id"]
        for method, path in (("GET", f"/jobs/{jid}"), ("GET", f"/jobs/{jid}/result"), ("GET", f"/jobs/{jid}/events"),
                             ("POST", f"/jobs/{jid}/cancel"), ("DELETE", f"/jobs/{jid}")):
            resp = await client.request(method, path, headers=with_csrf(alice, alice_csrf), allow_redirects=False)
            body = await assert_problem(resp, 404, f"alice {method} {path}")
            assert "bob" not in json.dumps(body)
        resp = await client.get(f"/jobs/{jid}", headers={**cookie(alice), "Accept": BROWSER})
        assert resp.status == 404 and resp.content_type == "text/html"
        assert "bob's" not in await resp.text()
    listed = await (await client.get("/jobs", headers=cookie(alice))).json()
    assert [j["id"] for j in listed["jobs"]] == [alices["id"]]
    listed = await (await client.get("/jobs?owner=bob", headers=cookie(alice))).json()
    assert listed["jobs"] == []
    ws = await client.ws_connect("/ws", headers=cookie(alice))
    await ws.send_json({"op": "subscribe", "jobs": [bobs_running["id"], alices["id"]]})
    frames = await recv_until(ws, lambda f: f.get("type") == "job")
    assert frames[0] == {"type": "subscribed", "jobs": [alices["id"]]}
    errors = [f for f in frames if f.get("type") == "error"]
    assert errors and errors[0]["status"] == 404 and errors[0]["id"] == bobs_running["id"]
    await ws.close()
    # Bob's jobs are as they were.
    assert (await wait_status(client, bobs_running["id"], "running", headers=bearer(BOB)))["status"] == "running"

    # root, an admin, sees and manages every job, through its session too.
    listed = await (await client.get("/jobs", headers=cookie(root))).json()
    assert {j["id"] for j in listed["jobs"]} == {bobs_running["id"], bobs_done["id"], alices["id"]}
    assert {j["owner"] for j in listed["jobs"]} == {"alice", "bob"}
    listed = await (await client.get("/jobs?owner=alice", headers=cookie(root))).json()
    assert [j["id"] for j in listed["jobs"]] == [alices["id"]]
    resp = await client.get(f"/jobs/{bobs_done['id']}/result", headers=cookie(root))
    assert resp.status == 200 and await resp.json() == {"secret": "bob's"}
    ws = await client.ws_connect("/ws", headers=cookie(root))
    await ws.send_json({"op": "subscribe", "jobs": "*"})
    assert (await recv(ws))["type"] == "subscribed"
    resp = await client.post(f"/jobs/{bobs_running['id']}/cancel", headers=with_csrf(root, root_csrf))
    assert resp.status == 200 and (await resp.json())["status"] == "canceled", await resp.text()
    frames = await recv_until(ws, lambda f: f.get("type") == "job" and f["job"]["id"] == bobs_running["id"]
                              and f["job"]["status"] == "canceled")
    late = await submit_as(client, with_csrf(alice, alice_csrf), "noop")
    frames = await recv_until(ws, lambda f: f.get("type") == "job" and f["job"]["id"] == late["id"]
                              and f["job"]["status"] == "succeeded")
    assert frames[-1]["job"]["owner"] == "alice"
    await ws.close()
    resp = await client.delete(f"/jobs/{alices['id']}", headers=with_csrf(root, root_csrf))
    assert resp.status == 204
    resp = await client.get(f"/jobs/{alices['id']}", headers=cookie(alice))
    await assert_problem(resp, 404, "alice's job after root deleted it")


async def test_the_event_stream_and_the_socket_work_with_the_cookie(start):
    client, _ = await start()
    alice, alice_csrf = await sign_in(client, ALICE)
    job = await submit_as(client, with_csrf(alice, alice_csrf), "sleep", {"seconds": 0.3, "steps": 3})
    resp = await client.get(f"/jobs/{job['id']}/events", headers=cookie(alice))
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    text = (await asyncio.wait_for(resp.text(), 10))
    assert '"status":"succeeded"' in text.replace(" ", "")


async def _sse_open(client, headers: dict[str, str], job_id: str) -> aiohttp.ClientResponse:
    resp = await client.get(f"/jobs/{job_id}/events", headers=headers)
    assert resp.status == 200
    assert b"event: status" in await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
    return resp


async def _still_open(ws) -> None:
    await ws.send_json({"op": "subscribe", "jobs": []})
    assert (await ws.receive_json(timeout=5))["type"] == "subscribed"


async def test_logout_ends_the_event_streams_and_sockets_its_session_opened(start):
    """Signed out, a session's open event stream ends and its WebSocket is closed (1008) at once; another
    session's socket, and one opened with the bearer token, stay open."""
    client, _ = await start()
    value, csrf = await sign_in(client, ALICE)
    other, _ = await sign_in(client, ALICE)
    job = await submit_as(client, bearer(ALICE), "block", {"seconds": 60})
    stream = await _sse_open(client, cookie(value), job["id"])
    ws, ws_other, ws_token = [await client.ws_connect("/ws", headers=h)
                              for h in (cookie(value), cookie(other), bearer(ALICE))]
    for socket in (ws, ws_other, ws_token):
        await _still_open(socket)
    resp = await client.post("/logout", headers=with_csrf(value, csrf), allow_redirects=False)
    assert resp.status == 303
    rest = await asyncio.wait_for(stream.content.read(), 5)  # returns at its end (the job runs on)
    assert stream.content.at_eof() and b"succeeded" not in rest
    closed = await ws.receive(timeout=5)
    assert closed.type is aiohttp.WSMsgType.CLOSE and closed.data == 1008, closed
    for socket in (ws_other, ws_token):
        await _still_open(socket)
        await socket.close()


async def test_a_session_that_runs_out_ends_its_event_streams_and_sockets(start):
    """A session past ``session_ttl`` (or ended on another node: the store says so) ends what it opened
    within the session re-check, while a token's socket stays open."""
    client, app = await start(session_ttl=2)
    app.web[SESSIONS_KEY].recheck_s = 0.2
    value, _ = await sign_in(client, ALICE)
    job = await submit_as(client, bearer(ALICE), "block", {"seconds": 60})
    stream = await _sse_open(client, cookie(value), job["id"])
    ws, ws_token = [await client.ws_connect("/ws", headers=h) for h in (cookie(value), bearer(ALICE))]
    await _still_open(ws)
    rest = await asyncio.wait_for(stream.content.read(), 10)
    assert stream.content.at_eof() and b"succeeded" not in rest
    closed = await ws.receive(timeout=10)
    assert closed.type is aiohttp.WSMsgType.CLOSE and closed.data == 1008, closed
    await _still_open(ws_token)
    await ws_token.close()


# -- what the pages get -----------------------------------------------------------------------

def _embedded(text: str) -> dict:
    match = re.search(r'<script type="application/json" id="initial-job">(.*?)</script>', text, re.S)
    assert match
    return json.loads(match.group(1))


async def test_run_again_data_is_on_the_owners_page_only(start):
    client, _ = await start()
    alice, alice_csrf = await sign_in(client, ALICE)
    root, _ = await sign_in(client, ROOT)
    job = await submit_as(client, with_csrf(alice, alice_csrf), "echo", {"word": "</script><b>"})
    await wait_status(client, job["id"], "succeeded", headers=bearer(ALICE))
    text = await (await client.get(f"/jobs/{job['id']}", headers={**cookie(alice), "Accept": BROWSER})).text()
    assert _embedded(text)["rerun"] == {"task": "echo", "params": {"word": "</script><b>"}, "priority": 0}
    assert "<b>" not in text
    text = await (await client.get(f"/jobs/{job['id']}", headers={**cookie(root), "Accept": BROWSER})).text()
    assert _embedded(text)["rerun"] is None  # an admin sees the job, not its params
    api = await (await client.get(f"/jobs/{job['id']}?redirect=false", headers=cookie(alice))).json()
    assert "params" not in api and "rerun" not in api  # the API's representation is unchanged
    # "Run again" is a plain submit with Cache-Control: no-cache: a new job.
    resp = await client.post("/jobs", json={"task": "echo", "params": {"word": "</script><b>"}},
                             headers={**with_csrf(alice, alice_csrf), "Cache-Control": "no-cache"})
    assert resp.status == 202 and (await resp.json())["id"] != job["id"]


async def test_the_summary_history_is_for_admins(start):
    client, _ = await start()
    for token in (ALICE, ROOT):
        job = await submit_as(client, bearer(token), "noop")
        await wait_status(client, job["id"], "succeeded", headers=bearer(token))
    body = await (await client.get("/", headers=bearer(ROOT))).json()
    history = body["history"]
    assert len(history) == 60
    assert all(set(h) == {"t", "completed", "failed", "queued"} for h in history)
    assert sum(h["completed"] for h in history[-2:]) >= 2 and isinstance(history[-1]["queued"], int)
    assert history == sorted(history, key=lambda h: h["t"])
    body = await (await client.get("/", headers=bearer(ALICE))).json()
    assert body["history"] is None
    html_admin = await (await client.get("/", headers={**bearer(ROOT), "Accept": BROWSER})).text()
    assert 'data-admin="true"' in html_admin and 'data-owners="true"' in html_admin
    html_user = await (await client.get("/", headers={**bearer(ALICE), "Accept": BROWSER})).text()
    assert 'data-admin="false"' in html_user and 'data-owners="false"' in html_user
