"""End to end in a real browser: the app started as `make run` starts it
(`python -m cli serve`: the web server and a Huey consumer), driven by
Debian's chromium through Playwright.

`SCREENSHOTS=1` also refreshes docs/screenshots/<page>.png.
"""

import os
import re
import signal
import subprocess
from pathlib import Path
from urllib.parse import urljoin

import pytest

from tests.conftest import ROOT
from tests.servers import start_app

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "docs" / "screenshots"
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"
    ),
]


@pytest.fixture
def server(tmp_path):
    """`python -m cli serve` on a free port and a fresh data folder; stopped
    (web server and worker) with Ctrl-C, as a person would."""
    data = tmp_path / "data"
    data.mkdir()
    # A one-epoch first model may be too close to chance for the gate to put
    # it in production by itself (tests/test_gate.py); the walk-through needs one there.
    server = start_app(data, tmp_path / "serve.log", AUTO_PROMOTE="always", DATABASE_URL=None)
    proc, url = server.proc, server.url
    try:
        # What a newcomer reads on the console: where the first admin's password is.
        printed = re.search(r"sign in as 'admin' with the password in (\S+)", (tmp_path / "serve.log").read_text())
        assert printed, (tmp_path / "serve.log").read_text()
        yield url, Path(printed.group(1)).read_text().strip()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # Nothing the server started may outlive it.
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            pass
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the web server or the worker was still running after Ctrl-C")


@pytest.fixture
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        context = browser.new_context(viewport={"width": 1440, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(60_000)
        yield page
        if os.environ.get("BROWSER_DEBUG"):
            page.screenshot(path=os.environ["BROWSER_DEBUG"])
        browser.close()


def settle(page) -> None:
    """Wait until Streamlit has finished the rerun a click or an edit started."""
    page.wait_for_timeout(300)
    page.locator('[data-testid="stApp"][data-test-script-state="notRunning"]').wait_for(timeout=60_000)


def go(page, title: str) -> None:
    page.get_by_role("link", name=title, exact=True).click()
    page.get_by_role("heading", name=title).first.wait_for()
    settle(page)


def shoot(page, name: str) -> None:
    if os.environ.get("SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        # The page scrolls inside Streamlit's main block, not the window: make
        # the window as tall as the content so the picture shows all of it.
        height = page.evaluate("document.querySelector('[data-testid=\"stMainBlockContainer\"]').scrollHeight")
        page.set_viewport_size({"width": 1440, "height": min(4000, height + 120)})
        page.wait_for_timeout(1500)  # let charts and images finish drawing
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))
        page.set_viewport_size({"width": 1440, "height": 1000})


def fill_number(page, label: str, value: str) -> None:
    field = page.get_by_label(label, exact=True)
    field.fill(value)
    field.press("Enter")
    settle(page)


def test_sign_in_with_the_printed_password_load_demo_train_and_see_the_new_model(server, page):
    from playwright.sync_api import expect

    url, password = server
    page.goto(url)
    page.get_by_role("heading", name="Sign in").wait_for()
    settle(page)
    shoot(page, "sign_in")
    page.get_by_label("User name", exact=True).fill("admin")
    page.get_by_label("Password", exact=True).fill("not the password")
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text("Wrong user name or password.").wait_for()
    page.get_by_label("Password", exact=True).fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text("No images yet").wait_for()
    # A reload keeps the session (the HttpOnly cookie /session/start set).
    page.reload()
    page.get_by_text("No images yet").wait_for()
    expect(page.get_by_role("heading", name="Sign in")).to_have_count(0)
    cookie = next(c for c in page.context.cookies() if c["name"] == "dashboard_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    page.get_by_role("button", name="Load the demo dataset").click()
    page.get_by_text("Validated images").first.wait_for(timeout=120_000)
    settle(page)
    expect(page.get_by_text("No model yet")).to_be_visible()

    go(page, "Review images")
    expect(page.locator('[data-testid="stImage"]')).to_have_count(48, timeout=60_000)
    shoot(page, "review")
    thumbnail = urljoin(page.url, page.locator('[data-testid="stImage"] img').first.get_attribute("src"))
    assert "/media/" in thumbnail
    assert page.request.get(thumbnail).status == 200

    go(page, "Train")
    # Auto is the recommended default; this walk-through trains one epoch by hand.
    page.get_by_text("Full: train every layer").click()
    if not page.get_by_label("Epochs").is_visible():
        page.get_by_text("Manual parameters").click()
    fill_number(page, "Epochs", "1")
    fill_number(page, "Batch size", "16")
    fill_number(page, "Image size (px)", "32")
    page.get_by_text("The parameters and the dataset meet the rules").wait_for()
    page.get_by_role("button", name="Train", exact=True).click()
    queued = page.get_by_text(re.compile(r"Round \d+ \(job \S+\) is"))
    queued.wait_for()
    job_id = re.search(r"\(job (\S+)\)", queued.inner_text()).group(1)
    assert "epochs 1, batch size 16" in queued.inner_text()  # the banner lists what was queued
    # The worker picks it up: the sidebar shows it running, by phase.
    page.get_by_text(re.compile(rf"Job {job_id[:8]}: (preparing|training|exporting)")).wait_for(timeout=120_000)
    shoot(page, "train")

    go(page, "Live metrics")
    page.get_by_role("heading", name="Model 1.0.0").wait_for(timeout=600_000)
    settle(page)
    expect(page.get_by_text("Confusion matrix")).to_be_visible()
    shoot(page, "metrics")
    # The address names the round shown, and opening it (a link, a new tab) shows it again.
    assert page.url.endswith("/metrics?round=1")
    tab = page.context.new_page()
    tab.goto(f"{url}/metrics?round=1")
    tab.get_by_role("heading", name="Model 1.0.0").wait_for()
    tab.close()

    go(page, "Models")
    page.get_by_text("In production now: 1.0.0").wait_for()
    expect(page.get_by_role("button", name="Download .ptl")).to_be_visible()
    expect(page.get_by_role("button", name="Download .pte")).to_be_visible()
    shoot(page, "models")

    go(page, "Overview")
    expect(page.get_by_text("Accuracy of every version")).to_be_visible()
    shoot(page, "overview")

    go(page, "Audit trail")
    expect(page.get_by_text(re.compile(r"\d+ event\(s\), newest first"))).to_be_visible()
    shoot(page, "audit")
    go(page, "Users and tokens")
    shoot(page, "admin")

    other_tab = page.context.new_page()
    other_tab.goto(f"{url}/models")
    other_tab.get_by_text("In production now: 1.0.0").wait_for()
    page.get_by_role("button", name="Sign out").click()
    page.get_by_role("heading", name="Sign in").wait_for()
    # The other tab, left alone, is signed out too (its sidebar checks every 5 seconds).
    other_tab.get_by_role("heading", name="Sign in").wait_for(timeout=30_000)
    expect(other_tab.get_by_text("In production now")).to_have_count(0)
    other_tab.close()
    assert not [c for c in page.context.cookies() if c["name"] == "dashboard_session"]
    assert page.request.get(thumbnail).status == 403

    # A link opened while signed out: the sign-in form, then the linked page and version.
    page.goto(f"{url}/models?version=1.0.0")
    page.get_by_role("heading", name="Sign in").wait_for()
    settle(page)
    page.get_by_label("User name", exact=True).fill("admin")
    page.get_by_label("Password", exact=True).fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text("In production now: 1.0.0").wait_for()
    assert page.url.endswith("/models?version=1.0.0")


def test_sign_in_failures_behind_a_trusted_proxy_count_the_forwarded_address(server):
    """The server trusts a proxy on loopback (FORWARDED_ALLOW_IPS' default), so
    each visitor's X-Forwarded-For address has its own failure budget."""
    from playwright.sync_api import sync_playwright

    url, _ = server

    def try_names(browser, address: str, names: list[str]) -> list[str]:
        context = browser.new_context(extra_http_headers={"X-Forwarded-For": address})
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(url)
        page.get_by_role("heading", name="Sign in").wait_for()
        messages = []
        for name in names:
            page.get_by_label("User name", exact=True).fill(name)
            page.get_by_label("Password", exact=True).fill("a wrong guess")
            page.get_by_role("button", name="Sign in").click()
            settle(page)
            alert = page.get_by_role("alert").filter(has_text="Wrong user name or password.")
            alert.wait_for()
            messages.append(alert.inner_text())
        context.close()
        return messages

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        # Four names from one address: its fourth failure starts the wait.
        first = try_names(browser, "203.0.113.9", ["ana", "bea", "cy", "dan"])
        assert all("wait" not in m for m in first[:3]) and "wait 1 s" in first[3], first
        # Another visitor behind the same proxy is not slowed down by them.
        assert "wait" not in try_names(browser, "203.0.113.10", ["eve"])[0]
        browser.close()
