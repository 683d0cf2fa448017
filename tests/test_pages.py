"""The browser views without a browser: content negotiation, status codes, static files, no CDN."""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import html
import io
import json
import re
import tomllib

import aiohttp

import pytest
from aiohttp.test_utils import make_mocked_request

from asyncjobs.web import pages

from .conftest import ROOT, submit, wait_status

BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
STATIC = ROOT / "asyncjobs" / "web" / "static"


def _wants(accept: str | None) -> bool:
    headers = {} if accept is None else {"Accept": accept}
    return pages.wants_html(make_mocked_request("GET", "/jobs/x", headers=headers))


@pytest.mark.parametrize("accept", [
    BROWSER,
    "text/html",
    "text/*, application/json;q=0.5",
    "application/json;q=0.9, text/html",
])
def test_browsers_get_html(accept):
    assert _wants(accept)


@pytest.mark.parametrize("accept", [
    None,
    "",
    "*/*",
    "application/json",
    "application/json, text/html",  # equal preference: JSON, the API's own type, wins
    "text/html;q=0.5, application/json",
    "text/html;q=0, */*",
    "application/*, text/html;q=0.9",
    "image/png",
    "text/plain, */*;q=0.5",
    "garbage;;;, ,/",
])
def test_api_clients_get_json(accept):
    assert not _wants(accept)


async def test_running_job_page_is_html_with_the_job(client):
    job = await submit(client, "sleep", {"seconds": 5, "steps": 5})
    resp = await client.get(f"/jobs/{job['id']}", headers={"Accept": BROWSER})
    assert resp.status == 200
    assert resp.content_type == "text/html"
    assert resp.headers["Cache-Control"] == "no-store"
    assert "Accept" in resp.headers["Vary"]
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    page_etag = resp.headers["ETag"]  # every response about a job has one; the page's is not the JSON's
    text = await resp.text()
    assert job["id"] in text and "sleep" in text
    assert 'id="cancel"' in text and "<progress" in text and 'aria-live="polite"' in text
    # The same URL still answers JSON to an API client.
    resp = await client.get(f"/jobs/{job['id']}")
    assert resp.status == 200 and resp.content_type == "application/json"
    assert (await resp.json())["id"] == job["id"]
    assert page_etag.startswith('W/"') and page_etag != resp.headers["ETag"]
    await client.post(f"/jobs/{job['id']}/cancel")


async def test_the_pages_links_to_the_job_as_json_give_json_to_the_browser(client):
    """A link cannot set `Accept`: the job page's "Job as JSON" links (and the one for a browser without
    JavaScript) ask for JSON with `format=json`, and a browser following them gets the job, not the page."""
    job = await submit(client, "sleep", {"seconds": 5, "steps": 5})
    text = await (await client.get(f"/jobs/{job['id']}", headers={"Accept": BROWSER})).text()
    links = [html.unescape(h) for h in re.findall(r'href="([^"]*)">(?:Job as JSON|the job as JSON)<', text)]
    assert len(links) == 2, links
    for link in links:
        resp = await client.get(link, headers={"Accept": BROWSER}, allow_redirects=False)
        assert resp.status == 200 and resp.content_type == "application/json", link
        assert (await resp.json())["id"] == job["id"]
    await client.post(f"/jobs/{job['id']}/cancel")


async def test_an_accept_on_two_field_lines_is_one_list(client):
    """RFC 9110 5.3: `Accept: image/webp` then `Accept: text/html` asks for the page as one line would."""
    job = await submit(client, "echo", {"word": "hello"})
    resp = await client.get(f"/jobs/{job['id']}", headers=[("Accept", "image/webp"), ("Accept", "text/html")],
                            allow_redirects=False)
    assert resp.status == 200 and resp.content_type == "text/html"


async def test_succeeded_job_page_is_200_not_a_redirect(client):
    job = await submit(client, "echo", {"word": "hello"})
    await wait_status(client, job["id"], "succeeded")
    resp = await client.get(f"/jobs/{job['id']}", headers={"Accept": BROWSER}, allow_redirects=False)
    assert resp.status == 200 and resp.content_type == "text/html"
    text = await resp.text()
    assert f"/jobs/{job['id']}/result" in text and "hello" in text
    # A browser that holds the page's ETag is told it has not changed; the JSON's tag does not match it.
    page_etag = resp.headers["ETag"]
    same = await client.get(f"/jobs/{job['id']}", headers={"Accept": BROWSER, "If-None-Match": page_etag})
    assert same.status == 304 and same.headers["ETag"] == page_etag and await same.read() == b""
    json_etag = (await client.get(f"/jobs/{job['id']}", allow_redirects=False)).headers["ETag"]
    other = await client.get(f"/jobs/{job['id']}", headers={"Accept": BROWSER, "If-None-Match": json_etag})
    assert other.status == 200 and other.content_type == "text/html"
    resp = await client.get(f"/jobs/{job['id']}", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == f"/jobs/{job['id']}/result"


async def test_failed_job_page_carries_the_error(client):
    job = await submit(client, "fail", {"message": "broke on purpose"})
    await wait_status(client, job["id"], "failed")
    resp = await client.get(f"/jobs/{job['id']}", headers={"Accept": BROWSER})
    assert resp.status == 200
    assert "broke on purpose" in await resp.text()


async def test_embedded_job_cannot_break_out_of_its_script_element(client):
    evil = "</script><script>alert(1)</script><!--"
    job = await submit(client, "echo", {"x": evil})
    await wait_status(client, job["id"], "succeeded")
    text = await (await client.get(f"/jobs/{job['id']}", headers={"Accept": BROWSER})).text()
    assert evil not in text
    assert "<script>" not in text
    assert text.count("</script>") == 2  # app.js and the JSON data block, nothing else


def _embedded_job(text: str) -> dict:
    """The job a page carries in its ``<script type="application/json" id="initial-job">`` block."""
    match = re.search(r'<script type="application/json" id="initial-job">(.*?)</script>', text, re.S)
    assert match, "no embedded job"
    return json.loads(match.group(1))


async def test_succeeded_file_job_page_embeds_the_job_with_its_files(client):
    """A gzip job (an upload in, a file out): the page carries both files' facts for app.js to show,
    the file name only inside the escaped JSON block, never as markup."""
    data = b"the same line again\n" * 5000
    name = "<img src=x onerror=alert(1)>.txt"  # names come from clients
    body = aiohttp.MultipartWriter("form-data")
    part = body.append(json.dumps({"task": "gzip", "params": {"level": 9}}), {"Content-Type": "application/json"})
    part.set_content_disposition("form-data", name="job")
    part = body.append(io.BytesIO(data), {"Content-Type": "text/plain"})
    part.set_content_disposition("form-data", quote_fields=False, name="file", filename=name)
    resp = await client.post("/jobs", data=body)
    assert resp.status == 202, await resp.text()
    job = await wait_status(client, (await resp.json())["id"], "succeeded")

    resp = await client.get(f"/jobs/{job['id']}", headers={"Accept": BROWSER}, allow_redirects=False)
    assert resp.status == 200 and resp.content_type == "text/html"
    text = await resp.text()
    embedded = _embedded_job(text)
    assert embedded["status"] == "succeeded" and embedded["result"] is None
    assert embedded["files"] == job["files"]
    assert embedded["files"]["inputs"]["file"] == {"name": name, "size": len(data), "content_type": "text/plain",
                                                   "sha256": hashlib.sha256(data).hexdigest()}
    result = embedded["files"]["result"]
    assert result["name"] == name + ".gz" and result["content_type"] == "application/gzip"
    assert 0 < result["size"] < len(data)
    assert embedded["links"]["result"] == f"/jobs/{job['id']}/result"
    # The page has the places app.js fills, and the name appears nowhere as markup.
    assert 'id="files-section"' in text and 'id="input-files"' in text and 'id="result-section"' in text
    assert name not in text and html.escape(name) not in text and "<img" not in text
    # The result resource is the download the page links to.
    resp = await client.get(embedded["links"]["result"])
    assert resp.status == 200 and resp.headers["Content-Disposition"].startswith("attachment")
    assert len(await resp.read()) == result["size"]


async def test_unknown_job_is_a_404_page(client):
    resp = await client.get("/jobs/no-such-job", headers={"Accept": BROWSER})
    assert resp.status == 404 and resp.content_type == "text/html"
    assert "No such job" in await resp.text()
    resp = await client.get("/jobs/no-such-job")
    assert resp.status == 404 and resp.content_type == "application/problem+json"


async def test_expired_job_is_a_410_page(make_client):
    client, _ = await make_client(jobs={"max_age": 0.2})
    job = await submit(client, "sleep", {"seconds": 1}, delay=30)
    await asyncio.sleep(0.4)
    resp = await client.get(f"/jobs/{job['id']}", headers={"Accept": BROWSER})
    assert resp.status == 410 and resp.content_type == "text/html"
    assert "expired" in (await resp.text()).lower()


async def test_flow_style_keeps_202_while_pending(make_client):
    client, _ = await make_client(protocol={"monitor": "flow"})
    job = await submit(client, "sleep", {"seconds": 1}, delay=30)
    resp = await client.get(f"/jobs/{job['id']}", headers={"Accept": BROWSER}, allow_redirects=False)
    assert resp.status == 202 and resp.content_type == "text/html"
    assert "Location" not in resp.headers  # a browser would not follow it anyway; the page polls


async def test_head_of_a_job_page(client):
    job = await submit(client, "noop")
    resp = await client.head(f"/jobs/{job['id']}", headers={"Accept": BROWSER})
    assert resp.status in (200,) and resp.content_type == "text/html"


async def test_dashboard_for_browsers_index_for_the_rest(client):
    resp = await client.get("/", headers={"Accept": BROWSER})
    assert resp.status == 200 and resp.content_type == "text/html"
    text = await resp.text()
    for needle in ('id="submit-form"', '<label for="task-select">', '<label for="params">', 'id="recent"',
                   'id="runtimes"', 'id="counts"', 'name="viewport"', 'lang="en"'):
        assert needle in text, needle
    job = await submit(client, "echo", {"a": 1})
    await wait_status(client, job["id"], "succeeded")
    resp = await client.get("/")
    assert resp.status == 200 and resp.content_type == "application/json"
    body = await resp.json()
    assert body["links"]["jobs"] == "/jobs" and body["links"]["tasks"] == "/tasks"
    assert set(body["counts"]) == {"queued", "running", "succeeded", "failed", "canceled"}
    assert body["counts"]["succeeded"] >= 1
    figures = body["run_times"]["echo"]
    assert figures["succeeded"] == 1 and figures["mean_s"] is not None and figures["max_s"] >= 0
    assert "sleep" in body["tasks"]


async def test_dashboard_counts_only_the_callers_jobs_with_auth(make_client):
    client, _ = await make_client(auth={"tokens": {"alice": "a" * 32, "bob": "b" * 32}})
    alice = {"Authorization": "Bearer " + "a" * 32}
    bob = {"Authorization": "Bearer " + "b" * 32}
    resp = await client.post("/jobs", json={"task": "noop"}, headers=alice)
    assert resp.status == 202
    job = await resp.json()
    for _ in range(200):
        body = await (await client.get("/", headers=alice)).json()
        if body["counts"]["succeeded"] == 1:
            break
        await asyncio.sleep(0.02)
    assert body["counts"]["succeeded"] == 1
    assert sum((await (await client.get("/", headers=bob)).json())["counts"].values()) == 0
    resp = await client.get(f"/jobs/{job['id']}", headers={**bob, "Accept": BROWSER})
    assert resp.status == 404  # another principal's job does not exist for bob, page or not


@pytest.mark.parametrize("name,content_type", [
    ("app.js", "text/javascript"), ("style.css", "text/css"), ("icon.svg", "image/svg+xml")])
async def test_static_files_are_served(client, name, content_type):
    resp = await client.get(f"/static/{name}")
    assert resp.status == 200
    assert resp.content_type == content_type
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert await resp.read() == (STATIC / name).read_bytes()


@pytest.mark.parametrize("name", ["job.html", "nope.js", "..%2Fpages.py", "%2E%2E%2Fpages.py", "APP.JS"])
async def test_only_assets_are_served_from_static(client, name):
    resp = await client.get(f"/static/{name}")
    assert resp.status == 404


def _urls(text: str) -> list[str]:
    return re.findall(r"""(?:src|href|action)\s*=\s*["']([^"']*)["']""", text) + \
        re.findall(r"""url\(\s*["']?([^"')]*)""", text) + re.findall(r"""@import\s+["']([^"']+)""", text)


async def test_no_cdn_everything_from_this_origin(client):
    job = await submit(client, "noop")
    pages_text = [await (await client.get(path, headers={"Accept": BROWSER})).text()
                  for path in ("/", f"/jobs/{job['id']}", "/jobs/missing")]
    files = [p.read_text() for p in STATIC.iterdir() if p.is_file()]
    for text in pages_text + files:
        for url in _urls(text):
            assert not re.match(r"^(?:[a-z][a-z0-9+.-]*:)?//", url, re.I) or url.startswith("http://www.w3.org/"), url
    js = (STATIC / "app.js").read_text()
    assert "import " not in js and "require(" not in js and "eval(" not in js
    for text in pages_text:  # no inline code: the CSP forbids it, and the only script elements are these
        for attrs, body in re.findall(r"<script([^>]*)>(.*?)</script>", text, re.S):
            assert 'src="/static/app.js"' in attrs or ('type="application/json"' in attrs), attrs
        assert not re.search(r"\son[a-z]+\s*=", text), "inline event handler"


def test_static_files_ship_with_the_package():
    """pyproject's package data covers every file of web/static (checked for real with a built wheel)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["asyncjobs.web"]
    files = [p.relative_to(STATIC.parent).as_posix() for p in STATIC.rglob("*") if p.is_file()]
    assert files
    assert all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files), files


async def test_pages_carry_an_empty_csrf_token_and_no_sign_in_with_auth_off(client):
    """Auth off: no session, so the token meta is empty, there is no sign-out, and no sign-in routes."""
    job = await submit(client, "noop")
    for path in ("/", f"/jobs/{job['id']}", "/jobs/missing"):
        text = await (await client.get(path, headers={"Accept": BROWSER})).text()
        assert '<meta name="csrf-token" content="">' in text, path
        assert 'action="/logout"' not in text and "Signed in" not in text, path
    assert (await client.get("/login")).status == 404
    assert (await client.post("/logout")).status == 404


async def test_sign_in_page_is_plain_html_under_the_same_policy(make_client):
    client, _ = await make_client(auth={"tokens": {"alice": "a" * 32}})
    resp = await client.get("/login?next=/jobs", headers={"Accept": BROWSER})
    assert resp.status == 200 and resp.content_type == "text/html"
    assert resp.headers["Cache-Control"] == "no-store"
    assert "form-action 'self'" in resp.headers["Content-Security-Policy"]
    text = await resp.text()
    assert "<script" not in text and not re.search(r"\son[a-z]+\s*=", text)
    assert '<label for="token">' in text and 'autocomplete="current-password"' in text
    for url in _urls(text):
        assert url.startswith("/"), url


async def test_the_dashboard_has_filters_pages_and_charts(client):
    text = await (await client.get("/", headers={"Accept": BROWSER})).text()
    for needle in ('id="filters"', 'for="filter-status"', 'for="filter-task"', 'for="filter-owner"',
                   'id="page-older"', 'id="page-newer"', 'id="charts"', 'id="throughput-chart"', 'id="depth-chart"',
                   'data-admin="true"', 'data-owners="false"'):  # auth off: every job, no owners
        assert needle in text, needle
    body = await (await client.get("/")).json()
    assert len(body["history"]) == 60
