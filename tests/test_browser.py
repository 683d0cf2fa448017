"""The pages in a real browser: Debian's headless Chromium, driven by Playwright, against `asyncjobs serve`.

Not skipped when something is missing: without Playwright this module fails to import, and without
``/usr/bin/chromium`` the fixture installs it where it may (root with apt) and fails otherwise. Screenshots go to
``tests/screenshots/`` (ignored by git).
"""

from __future__ import annotations

import hashlib
import json
import re
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from playwright.sync_api import BrowserContext, Page, expect, sync_playwright

from .conftest import ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = ROOT / "tests" / "screenshots"
TIMEOUT_MS = 20_000  # generous: a loaded two-core machine runs the server, the browser and pytest
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


def ensure_chromium() -> None:
    """Debian's chromium is a system package, not a pip one: install it if missing and we may, else fail.

    This keeps the README's one test command working on a fresh Debian machine (as root, as CI runs);
    elsewhere the failure says what to install. Bounded: apt gets ten minutes at most.
    """
    if Path(CHROMIUM).exists():
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
            subprocess.run(command, env=env, check=False, stdin=subprocess.DEVNULL, timeout=600,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install chromium)")


@pytest.fixture(scope="module")
def shots() -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    return SHOTS


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[BrowserContext]:
    ensure_chromium()
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport=DESKTOP)
        context.set_default_timeout(TIMEOUT_MS)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser: BrowserContext) -> Iterator[Page]:
    page = browser.pages[0] if browser.pages else browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture
def server(server_factory):
    return server_factory()


def api(server, method: str, path: str, body: Any = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def shoot(page: Page, shots: Path, name: str) -> Path:
    path = shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def progress_value(page: Page) -> float:
    return page.eval_on_selector("#progress", "bar => bar.hasAttribute('value') ? bar.value : -1")


def test_job_page_progress_advances_live_then_the_result_appears(page: Page, server, shots: Path):
    """A running sleep job's page: the bar moves without a reload, then the result shows; a reload is harmless."""
    job = api(server, "POST", "/jobs", {"task": "sleep", "params": {"seconds": 4, "steps": 8}})
    page.goto(f"{server.url}/jobs/{job['id']}")
    page.evaluate("window.__sameDocument = true")  # gone if the page reloads
    expect(page.locator("#status")).to_have_text("running")
    page.wait_for_function("() => document.getElementById('progress').value > 0")
    first = progress_value(page)
    assert 0 < first < 100
    page.wait_for_function(f"() => document.getElementById('progress').value > {first}")
    second = progress_value(page)
    assert second > first
    expect(page.locator("#progress-text")).to_contain_text(re.compile(r"step \d of 8"))
    shoot(page, shots, "job-running-desktop")
    page.set_viewport_size(PHONE)
    shoot(page, shots, "job-running-phone")
    page.set_viewport_size(DESKTOP)

    expect(page.locator("#status")).to_have_text("succeeded")
    expect(page.locator("#result")).to_contain_text('"slept": 4')
    expect(page.locator("#result-link")).to_have_attribute("href", f"/jobs/{job['id']}/result")
    expect(page.locator("#cancel")).to_be_hidden()
    assert progress_value(page) == 100
    assert page.evaluate("window.__sameDocument === true"), "the page reloaded"
    shoot(page, shots, "job-succeeded-desktop")

    page.reload()  # a finished job's page, opened afresh, shows the same
    expect(page.locator("#status")).to_have_text("succeeded")
    expect(page.locator("#result")).to_contain_text('"slept": 4')
    page.set_viewport_size(PHONE)
    shoot(page, shots, "job-succeeded-phone")


def test_dashboard_form_submits_a_job_and_lists_it(page: Page, server, shots: Path):
    """Pick a task, type JSON params, submit: the job appears in the list and goes live to succeeded."""
    api(server, "POST", "/jobs", {"task": "echo", "params": {"warm": "up"}})
    api(server, "POST", "/jobs", {"task": "fail", "params": {"message": "for the screenshot"}})
    page.goto(server.url + "/")
    expect(page.locator("#live")).to_contain_text("Live")
    expect(page.locator("#task-select option[value='sleep']")).to_have_count(1)
    page.get_by_label("Task", exact=True).select_option("sleep")
    page.get_by_label("Params (JSON object)").fill('{"seconds": 1.5, "steps": 3}')
    page.get_by_role("button", name="Submit").click()
    result = page.locator("#submit-result")
    expect(result).to_contain_text("Submitted")
    href = result.locator("a").get_attribute("href")
    job_id = href.rsplit("/", 1)[1]
    row = page.locator(f"#recent tr[data-job-id='{job_id}']")
    expect(row).to_be_visible()
    expect(row).to_contain_text("sleep")
    expect(row).to_have_attribute("data-status", "succeeded")  # pushed through the WebSocket
    expect(page.locator("#count-succeeded")).not_to_have_text("–")
    expect(page.locator("#runtimes tbody")).to_contain_text("sleep")
    assert api(server, "GET", f"/jobs/{job_id}?redirect=false")["status"] == "succeeded"
    shoot(page, shots, "dashboard-desktop")
    page.set_viewport_size(PHONE)
    shoot(page, shots, "dashboard-phone")

    # Bad params get the server's field errors, and nothing is listed.
    page.set_viewport_size(DESKTOP)
    page.get_by_label("Params (JSON object)").fill('{"seconds": "soon"}')
    page.get_by_role("button", name="Submit").click()
    expect(result).to_contain_text("Not submitted")
    expect(result).to_contain_text("params.seconds")
    page.get_by_label("Params (JSON object)").fill("[1, 2")
    page.get_by_role("button", name="Submit").click()
    expect(page.locator("#params-error")).to_contain_text("JSON object")


def test_dashboard_form_uploads_a_file_and_the_job_gets_its_digest(page: Page, server, shots: Path):
    """Pick `digest`: a file input appears; submit without a file is refused in the page, with one it is
    uploaded as multipart (progress shown), listed, and succeeds with the file's SHA-256. The client's
    file name shows as text on the job page, never as markup."""
    data = bytes(range(256)) * 8192  # 2 MiB
    name = "<img src=x onerror=alert(1)>.bin"
    page.goto(server.url + "/")
    expect(page.locator("#live")).to_contain_text("Live")
    expect(page.locator("#file-fields")).to_be_hidden()  # sleep, the default, takes no file
    page.get_by_label("Task", exact=True).select_option("digest")
    expect(page.locator("#file-fields")).to_be_visible()
    file_input = page.locator("#file-inputs input[type=file][data-param='file']")
    expect(file_input).to_have_count(1)
    expect(file_input).to_have_attribute("required", "")
    expect(page.locator("#file-inputs label")).to_contain_text("(required)")
    assert file_input.get_attribute("accept") is None  # the task takes any type

    page.get_by_role("button", name="Submit").click()  # no file yet: the page says so, nothing is sent
    expect(page.locator("#file-inputs .field-error")).to_contain_text("Choose a file")
    expect(file_input).to_be_focused()
    expect(page.locator("#recent tbody tr")).to_have_count(0)

    file_input.set_input_files(files=[{"name": name, "mimeType": "application/octet-stream", "buffer": data}])
    page.get_by_label("Params (JSON object)").fill('{"unexpected": 1}')  # the server's problem, shown
    page.get_by_role("button", name="Submit").click()
    result = page.locator("#submit-result")
    expect(result).to_contain_text("Not submitted")
    expect(result).to_contain_text("params")
    expect(page.locator("#recent tbody tr")).to_have_count(0)

    page.get_by_label("Params (JSON object)").fill("{}")
    page.get_by_role("button", name="Submit").click()
    expect(result).to_contain_text("Submitted")
    expect(page.locator("#upload")).to_be_visible()
    expect(page.locator("#upload-text")).to_contain_text("Uploaded 2.0 MiB")
    assert page.eval_on_selector("#upload-progress", "bar => bar.value") == 100
    job_id = result.locator("a").get_attribute("href").rsplit("/", 1)[1]
    row = page.locator(f"#recent tr[data-job-id='{job_id}']")
    expect(row).to_contain_text("digest")
    expect(row).to_have_attribute("data-status", "succeeded")  # pushed through the WebSocket
    job = api(server, "GET", f"/jobs/{job_id}?redirect=false")
    digest = hashlib.sha256(data).hexdigest()
    assert job["result"] == {"sha256": digest, "size": len(data)}
    assert job["files"]["inputs"]["file"] == {"name": name, "size": len(data),
                                              "content_type": "application/octet-stream", "sha256": digest}
    shoot(page, shots, "dashboard-upload-desktop")

    result.locator("a").click()
    expect(page.locator("#status")).to_have_text("succeeded")
    expect(page.locator("#result")).to_contain_text(digest)
    expect(page.locator("#files-section")).to_be_visible()
    item = page.locator("#input-files li[data-param='file']")
    expect(item.locator(".file-name")).to_have_text(name)
    expect(item).to_contain_text("2.0 MiB")
    expect(item).to_contain_text(digest)
    assert page.locator("main img").count() == 0
    shoot(page, shots, "job-upload-desktop")


def _bytes_task_output(size: int, seed: str) -> bytes:
    """What the built-in `bytes` task returns: block i is SHA-256 of "{seed}:{i}", concatenated and cut."""
    blocks = (size + 31) // 32
    return b"".join(hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(blocks))[:size]


def test_job_page_of_a_file_result_links_the_download(page: Page, server, shots: Path):
    """A `bytes` job opened while queued: on success the result file's name, size and type appear live,
    with a download link to the result resource that yields the file's bytes."""
    size = 5000
    job = api(server, "POST", "/jobs", {"task": "bytes", "params": {"size": size, "seed": "page"}, "delay": 3})
    page.goto(f"{server.url}/jobs/{job['id']}")
    page.evaluate("window.__sameDocument = true")  # gone if the page reloads
    first = page.evaluate("JSON.parse(document.getElementById('initial-job').textContent).status")
    assert first in ("queued", "running")
    expect(page.locator("#result-section")).to_be_hidden()
    expect(page.locator("#status")).to_have_text("succeeded")
    assert page.evaluate("window.__sameDocument === true"), "the page reloaded"

    expect(page.locator("#result-file-name")).to_have_text(f"bytes-{size}.bin")
    expect(page.locator("#result-file-size")).to_have_text("4.9 KiB (5,000 bytes)")
    expect(page.locator("#result-file-type")).to_have_text("application/octet-stream")
    link = page.locator("#result-download")
    expect(link).to_have_attribute("href", f"/jobs/{job['id']}/result")
    expect(link).to_have_attribute("download", f"bytes-{size}.bin")
    expect(page.locator("#files-section")).to_be_hidden()  # no input files
    shoot(page, shots, "job-file-result-desktop")

    with page.expect_download() as info:
        link.click()
    download = info.value
    assert download.suggested_filename == f"bytes-{size}.bin"
    assert Path(download.path()).read_bytes() == _bytes_task_output(size, "page")
    page.set_viewport_size(PHONE)
    shoot(page, shots, "job-file-result-phone")


def test_cancel_button_cancels_a_running_job(page: Page, server, shots: Path):
    job = api(server, "POST", "/jobs", {"task": "sleep", "params": {"seconds": 60, "steps": 60}})
    page.goto(f"{server.url}/jobs/{job['id']}")
    expect(page.locator("#status")).to_have_text("running")
    page.get_by_role("button", name="Cancel job").click()
    expect(page.locator("#status")).to_have_text("canceled")
    expect(page.locator("#error-section")).to_be_visible()
    expect(page.locator("#error-type")).to_contain_text("canceled")
    expect(page.locator("#cancel")).to_be_hidden()
    assert api(server, "GET", f"/jobs/{job['id']}")["status"] == "canceled"
    shoot(page, shots, "job-canceled-desktop")


def test_missing_job_is_a_404_page(page: Page, server, shots: Path):
    response = page.goto(f"{server.url}/jobs/no-such-job")
    assert response is not None and response.status == 404
    expect(page.get_by_role("heading", name="No such job")).to_be_visible()
    expect(page.get_by_role("link", name="Back to the dashboard")).to_be_visible()


# -- with auth on: sign in, work, sign out ---------------------------------------------------

ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789ab"
ROOT = "root-token-0123456789abc"


@pytest.fixture
def auth_server(server_factory):
    modules = json.dumps(["asyncjobs.builtin", "tests.sample_tasks"])
    return server_factory(config_text=(
        f"[tasks]\nmodules = {modules}\n[auth]\nadmins = [\"root\"]\n"
        f"[auth.tokens]\nalice = \"{ALICE}\"\nbob = \"{BOB}\"\nroot = \"{ROOT}\"\n"))


def api_as(server, token: str, method: str, path: str, body: Any = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, method=method, headers={
        "Content-Type": "application/json", "Accept": "application/json", "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def sign_in(page: Page, server, token: str, shots: Path | None = None) -> None:
    """From any page that needs a session: the sign-in page, then back where the browser was going."""
    page.goto(server.url + "/")
    expect(page).to_have_url(re.compile(r"/login\?next=%2F$"))
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.get_by_label("Access token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(server.url + "/")


def test_sign_in_work_and_sign_out(page: Page, auth_server, shots: Path):
    """Auth on: the dashboard sends the browser to sign in; signed in, a job is submitted from the form and
    watched live, another is cancelled from its page, a finished one runs again, another principal's job
    is a 404 page; after signing out the dashboard asks to sign in again."""
    server = auth_server
    page.goto(server.url + "/")
    expect(page).to_have_url(re.compile(r"/login\?next=%2F$"))
    shoot(page, shots, "login-desktop")
    page.get_by_label("Access token").fill("not-the-token-0123456789")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#login-error")).to_contain_text("not valid")
    expect(page.get_by_label("Access token")).to_have_attribute("aria-invalid", "true")
    page.get_by_label("Access token").fill(ALICE)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(server.url + "/")
    expect(page.locator("#principal")).to_have_text("alice")
    expect(page.locator("#live")).to_contain_text("Live")  # the WebSocket, authenticated by the cookie
    assert page.context.cookies()[0]["value"] != ALICE
    assert page.context.cookies()[0]["httpOnly"] and page.context.cookies()[0]["sameSite"] == "Strict"
    expect(page.locator("#charts")).to_be_hidden()  # service-wide figures are for admins
    expect(page.locator("#recent th.c-owner")).to_be_hidden()

    # Submit from the form (a POST with the CSRF header), then watch the job live on its page.
    page.get_by_label("Task", exact=True).select_option("sleep")
    page.get_by_label("Params (JSON object)").fill('{"seconds": 2, "steps": 4}')
    page.get_by_role("button", name="Submit").click()
    result = page.locator("#submit-result")
    expect(result).to_contain_text("Submitted")
    job_id = result.locator("a").get_attribute("href").rsplit("/", 1)[1]
    expect(page.locator(f"#recent tr[data-job-id='{job_id}']")).to_be_visible()
    result.locator("a").click()
    expect(page.locator("#status")).to_have_text("running")
    page.wait_for_function("() => document.getElementById('progress').value > 0")  # SSE with the cookie
    shoot(page, shots, "signed-in-job-running")
    expect(page.locator("#status")).to_have_text("succeeded")
    expect(page.locator("#result")).to_contain_text('"slept": 2')
    assert api_as(server, ALICE, "GET", f"/jobs/{job_id}?redirect=false")["owner"] == "alice"

    # Run again: a new job with the same task and params, and its page.
    expect(page.locator("#rerun")).to_be_visible()
    page.get_by_role("button", name="Run again").click()
    page.wait_for_url(re.compile(r"/jobs/(?!" + re.escape(job_id) + r")[^/]+$"))
    again_id = page.url.rsplit("/", 1)[1]
    expect(page.locator("#task")).to_have_text("sleep")
    again = api_as(server, ALICE, "GET", f"/jobs/{again_id}?redirect=false")
    assert again["task"] == "sleep" and again["owner"] == "alice"

    # Cancel another running job from its page.
    running = api_as(server, ALICE, "POST", "/jobs", {"task": "sleep", "params": {"seconds": 60, "steps": 60}})
    page.goto(f"{server.url}/jobs/{running['id']}")
    expect(page.locator("#status")).to_have_text("running")
    page.get_by_role("button", name="Cancel job").click()
    expect(page.locator("#status")).to_have_text("canceled")
    assert api_as(server, ALICE, "GET", f"/jobs/{running['id']}")["status"] == "canceled"

    # Another principal's job does not exist for alice.
    bobs = api_as(server, BOB, "POST", "/jobs", {"task": "noop"})
    response = page.goto(f"{server.url}/jobs/{bobs['id']}")
    assert response is not None and response.status == 404
    expect(page.get_by_role("heading", name="No such job")).to_be_visible()

    # Sign out: back to the sign-in page, and the dashboard asks again.
    page.goto(server.url + "/")
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"/login$"))
    page.goto(server.url + "/")
    expect(page).to_have_url(re.compile(r"/login\?next=%2F$"))
    shoot(page, shots, "signed-out")


def test_admin_dashboard_filters_every_owner_and_draws_the_last_hour(page: Page, auth_server, shots: Path):
    """root (an admin) sees every owner's jobs with an owner column, filters by owner and status, pages
    through them, and gets the charts of the last hour."""
    server = auth_server
    for i in range(21):  # more than a page of 20
        api_as(server, ALICE, "POST", "/jobs", {"task": "echo", "params": {"i": i}})
    api_as(server, BOB, "POST", "/jobs", {"task": "fail", "params": {"message": "for the chart"}})
    api_as(server, BOB, "POST", "/jobs", {"task": "sleep", "params": {"seconds": 30}, "delay": 30})
    sign_in(page, server, ROOT)
    expect(page.locator("#principal")).to_have_text("root")
    expect(page.locator("#live")).to_contain_text("Live")
    expect(page.locator("#recent th.c-owner")).to_be_visible()
    rows = page.locator("#recent tbody tr")
    expect(rows).to_have_count(20)
    expect(page.locator("#recent tbody td.c-owner", has_text="bob")).to_have_count(2)  # the newest two
    expect(page.locator("#page-info")).to_have_text("Page 1 (live)")
    page.get_by_role("button", name="Older").click()
    expect(page.locator("#page-info")).to_have_text("Page 2")
    expect(rows).to_have_count(3)
    expect(page.locator("#recent tbody td.c-owner", has_text="alice")).to_have_count(3)
    expect(page.get_by_role("button", name="Older")).to_be_disabled()
    page.get_by_role("button", name="Newer").click()
    expect(rows).to_have_count(20)
    expect(page.locator("#charts")).to_be_visible()
    expect(page.locator("#throughput-chart")).to_have_attribute("data-total", re.compile(r"^[1-9]"))
    expect(page.locator("#throughput-chart rect.bar-failed")).not_to_have_count(0)
    expect(page.locator("#throughput-summary")).to_contain_text("finished in the last hour")
    expect(page.locator("#depth-summary")).to_contain_text("queued")
    shoot(page, shots, "dashboard-admin-desktop")

    page.get_by_label("Filter by owner").fill("bob")
    page.get_by_role("button", name="Show").click()
    expect(rows).to_have_count(2)
    page.get_by_label("Filter by status").select_option("failed")
    expect(rows).to_have_count(1)
    expect(rows).to_have_attribute("data-status", "failed")
    page.get_by_role("button", name="Clear").click()
    expect(page.locator("#recent tbody td.c-owner", has_text="alice")).to_have_count(18)
    page.get_by_label("Filter by task").select_option("echo")
    expect(page.locator("#recent tbody td.c-owner", has_text="alice")).to_have_count(20)
    page.get_by_role("button", name="Older").click()
    expect(rows).to_have_count(1)
    page.set_viewport_size(PHONE)
    shoot(page, shots, "dashboard-admin-phone")
