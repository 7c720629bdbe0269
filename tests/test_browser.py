"""End to end in a real browser: the app started as `make run` starts it
(`python -m cli serve`: the web server and a Huey consumer), driven by
Debian's chromium through Playwright.

`SCREENSHOTS=1` also refreshes docs/screenshots/<page>.png.
"""

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import pytest
from sqlmodel import Session, select

from core.db import get_engine
from tests.conftest import ROOT, _clear_caches, wait_for
from tests.factories import add_fake_version, add_user
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


PASSWORD = "correct horse battery"  # of the three users below (tests/factories.add_user)
CURATOR, OPERATOR, VIEWER = "cora", "otto", "vera"


@dataclass(frozen=True)
class Site:
    url: str
    admin_password: str


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """One `python -m cli serve` for the whole walk-through, on a free port
    and a fresh data folder, stopped (web server and worker) with Ctrl-C, as a
    person would. This test process reaches the same database (DATA_DIR), to
    add a user per role as an admin would."""
    folder = tmp_path_factory.mktemp("site")
    data = folder / "data"
    data.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DATA_DIR", str(data))
        patch.delenv("DATABASE_URL", raising=False)
        _clear_caches()
        # A one-epoch first model may be too close to chance for the gate to put
        # it in production by itself (tests/test_gate.py); the walk-through needs one there.
        server = start_app(data, folder / "serve.log", AUTO_PROMOTE="always", DATABASE_URL=None)
        proc = server.proc
        try:
            # What a newcomer reads on the console: where the first admin's password is.
            printed = re.search(r"sign in as 'admin' with the password in (\S+)", (folder / "serve.log").read_text())
            assert printed, (folder / "serve.log").read_text()
            with Session(get_engine(), expire_on_commit=False) as session:
                for name, role in ((CURATOR, "curator"), (OPERATOR, "operator"), (VIEWER, "viewer")):
                    add_user(session, name, role, PASSWORD)
            yield Site(server.url, Path(printed.group(1)).read_text().strip())
        finally:
            _clear_caches(bind_queue=False)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                # `serve` gives the web server and the worker 15 s each to stop.
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.stop()
                pytest.fail("python -m cli serve was still running a minute after Ctrl-C")
            # Nothing the server started may outlive it (a child that has just
            # exited gets a moment to be reaped).
            deadline = time.monotonic() + 15
            while server.group_alive() and time.monotonic() < deadline:
                time.sleep(0.2)
            if server.group_alive():
                server.stop()
                pytest.fail("the web server or the worker was still running after Ctrl-C")


@pytest.fixture(scope="module")
def browser(site):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A tab in a browser of its own (its own cookies): one person."""
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    if os.environ.get("BROWSER_DEBUG"):
        page.screenshot(path=os.environ["BROWSER_DEBUG"])
    context.close()


@pytest.fixture
def demo(site):
    """The demo dataset, loaded by the curator's walk-through (or here, when
    a walk-through runs on its own)."""
    from core.demo import load_demo_dataset
    from core.models import TrainingImage

    with Session(get_engine()) as session:
        if session.exec(select(TrainingImage)).first() is None:
            load_demo_dataset(session=session)
            session.commit()


@pytest.fixture
def version(site) -> str:
    """The version in production: the operator's walk-through trained it (or,
    when the viewer's runs on its own, a finished one is made here, untrained)."""
    from core.registry import production_version

    with Session(get_engine(), expire_on_commit=False) as session:
        production = production_version(session=session)
        return production.version if production else add_fake_version(session, "1.0.0").version


def version_formats(version: str) -> list[str]:
    from core.registry import get_version

    with Session(get_engine()) as session:
        return [a["format"] for a in get_version(version, session=session).artifacts]


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


def sign_in(page, name: str, password: str) -> None:
    page.get_by_role("heading", name="Sign in").wait_for()
    settle(page)
    page.get_by_label("User name", exact=True).fill(name)
    page.get_by_label("Password", exact=True).fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text(f"Signed in as {name}").wait_for()
    settle(page)


PAGES = ("Overview", "Review images", "Train", "Live metrics", "Models", "Audit trail", "Users and tokens")


def menu(page) -> set[str]:
    """The pages the sidebar offers."""
    return {title for title in PAGES if page.get_by_role("link", name=title, exact=True).count()}


def sign_out(page) -> None:
    page.get_by_role("button", name="Sign out").click()
    page.get_by_role("heading", name="Sign in").wait_for()
    # The cookie goes once the browser has been to /session/end.
    wait_for(lambda: not [c for c in page.context.cookies() if c["name"] == "dashboard_session"], timeout=30)


# The walk-throughs run in this order (the curator loads the demo the operator
# trains on, the viewer looks at the version the operator made), each in a
# browser of its own; the fixtures make up for a walk-through run alone.


def test_curator_opens_a_link_loads_the_demo_and_reviews_across_a_reload(site, page):
    from playwright.sync_api import expect

    # A link opened before signing in: the sign-in form, then the linked page.
    page.goto(f"{site.url}/review")
    page.get_by_role("heading", name="Sign in").wait_for()
    settle(page)
    shoot(page, "sign_in")
    sign_in(page, CURATOR, PASSWORD)
    page.get_by_role("heading", name="Review images", exact=True).wait_for()
    assert page.url.endswith("/review")
    assert menu(page) == {"Overview", "Review images", "Live metrics", "Models"}

    go(page, "Overview")
    page.get_by_role("button", name="Load the demo dataset").click()
    page.get_by_text("Validated images").first.wait_for(timeout=120_000)
    settle(page)
    expect(page.get_by_text("No model yet")).to_be_visible()

    go(page, "Review images")
    expect(page.locator('[data-testid="stImage"]')).to_have_count(48, timeout=60_000)
    shoot(page, "review")
    thumbnail = urljoin(page.url, page.locator('[data-testid="stImage"] img').first.get_attribute("src"))
    assert "/media/" in thumbnail and page.request.get(thumbnail).status == 200
    page.locator('[data-testid="stCheckbox"]').first.click()
    settle(page)
    page.get_by_role("button", name="Reject (1)").click()
    page.get_by_text("1 image(s) rejected.").wait_for()
    rejected = page.get_by_test_id("stMetric").filter(has_text="Rejected")
    expect(rejected).to_contain_text(re.compile(r"Rejected\s*1(?!\d)"))

    # A reload keeps the session and the page; the decision was saved.
    page.reload()
    page.get_by_role("heading", name="Review images", exact=True).wait_for()
    settle(page)
    expect(page.get_by_role("heading", name="Sign in")).to_have_count(0)
    expect(rejected).to_contain_text(re.compile(r"Rejected\s*1(?!\d)"), timeout=60_000)
    cookie = next(c for c in page.context.cookies() if c["name"] == "dashboard_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"

    sign_out(page)
    assert page.request.get(thumbnail).status == 403


def test_operator_opens_a_link_trains_and_follows_the_round_across_a_reload(site, demo, page):
    from playwright.sync_api import expect

    page.goto(f"{site.url}/train")
    sign_in(page, OPERATOR, PASSWORD)
    page.get_by_role("heading", name="Train", exact=True).wait_for()
    assert page.url.endswith("/train")
    assert menu(page) == {"Overview", "Review images", "Train", "Live metrics", "Models", "Audit trail"}

    # Auto is the recommended default; this walk-through trains one epoch by hand.
    page.get_by_text("Full: train every layer").click()
    # The rerun redraws the form without Auto's budget; until it has ended, the
    # old "Manual parameters" stands beside the new one (a slow machine may
    # start the rerun after settle's first look, so wait for its own signs).
    expect(page.get_by_label("Time budget (minutes)", exact=True)).to_have_count(0, timeout=60_000)
    expect(page.get_by_text("Manual parameters", exact=True)).to_have_count(1, timeout=60_000)
    settle(page)
    if not page.get_by_label("Epochs", exact=True).is_visible():
        page.get_by_text("Manual parameters", exact=True).click()
    page.get_by_label("Epochs", exact=True).wait_for(state="visible")
    fill_number(page, "Epochs", "1")
    fill_number(page, "Batch size", "16")
    fill_number(page, "Image size (px)", "32")
    page.get_by_text("The parameters and the dataset meet the rules").wait_for()
    page.get_by_role("button", name="Train", exact=True).click()
    queued = page.get_by_text(re.compile(r"Round \d+ \(job \S+\) is"))
    queued.wait_for()
    round_id, job_id = re.search(r"Round (\d+) \(job (\S+)\)", queued.inner_text()).groups()
    assert "epochs 1, batch size 16" in queued.inner_text()  # the banner lists what was queued
    # The worker picks it up: the sidebar shows it running, by phase.
    page.get_by_text(re.compile(rf"Job {job_id[:8]}: (preparing|training|exporting)")).wait_for(timeout=120_000)
    shoot(page, "train")

    # A reload keeps the session, and the form this operator's last parameters.
    page.reload()
    page.get_by_role("heading", name="Train", exact=True).wait_for()
    settle(page)
    expect(page.get_by_label("Epochs", exact=True)).to_have_value("1")
    expect(page.get_by_label("Batch size", exact=True)).to_have_value("16")

    go(page, "Live metrics")
    model = page.get_by_role("heading", name=re.compile(r"^Model \d+\.\d+\.\d+$"))
    model.wait_for(timeout=600_000)
    settle(page)
    made = model.inner_text().removeprefix("Model ")
    expect(page.get_by_text("Confusion matrix")).to_be_visible()
    shoot(page, "metrics")
    # The address names the round shown, and opening it (a link, a new tab) shows it again.
    assert page.url.endswith(f"/metrics?round={round_id}")
    tab = page.context.new_page()
    tab.goto(f"{site.url}/metrics?round={round_id}")
    tab.get_by_role("heading", name=f"Model {made}").wait_for()
    tab.close()

    # The .pte joins the version once made and checked, after the .ptl.
    wait_for(lambda: len(version_formats(made)) == 2, timeout=600, interval=1, message="the .pte of " + made)
    go(page, "Models")
    page.get_by_text(f"In production now: {made}").wait_for()
    expect(page.get_by_role("button", name="Download .ptl")).to_be_visible()
    expect(page.get_by_role("button", name="Download .pte")).to_be_visible()
    shoot(page, "models")
    sign_out(page)


def test_viewer_opens_a_link_to_a_version_and_sees_the_dashboards_only(site, version, page):
    from playwright.sync_api import expect

    page.goto(f"{site.url}/models?version={version}")
    sign_in(page, VIEWER, PASSWORD)
    page.get_by_text(f"In production now: {version}").wait_for()
    assert page.url.endswith(f"/models?version={version}")
    assert menu(page) == {"Overview", "Live metrics", "Models"}
    expect(page.get_by_text("Operators and admins promote and roll back models.")).to_be_visible()
    expect(page.get_by_role("button", name="Promote…")).to_have_count(0)

    page.reload()
    page.get_by_text(f"In production now: {version}").wait_for()
    expect(page.get_by_role("heading", name="Sign in")).to_have_count(0)
    assert page.url.endswith(f"/models?version={version}")

    go(page, "Overview")
    expect(page.get_by_text("Accuracy of every version")).to_be_visible()
    shoot(page, "overview")
    sign_out(page)


def test_admin_signs_in_with_the_printed_password_and_sign_out_reaches_every_tab(site, page):
    from playwright.sync_api import expect

    page.goto(site.url)
    page.get_by_role("heading", name="Sign in").wait_for()
    settle(page)
    page.get_by_label("User name", exact=True).fill("admin")
    page.get_by_label("Password", exact=True).fill("not the password")
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text("Wrong user name or password.").wait_for()
    expect(page.get_by_label("Password", exact=True)).to_have_value("")  # not left in the field
    sign_in(page, "admin", site.admin_password)
    page.reload()
    page.get_by_text("Signed in as admin").wait_for()
    settle(page)

    go(page, "Audit trail")
    expect(page.get_by_text(re.compile(r"\d+ event\(s\), newest first"))).to_be_visible()
    shoot(page, "audit")
    go(page, "Users and tokens")
    page.locator('[data-testid="stDataFrame"]').first.wait_for()
    shoot(page, "admin")

    other_tab = page.context.new_page()
    other_tab.goto(f"{site.url}/models")
    other_tab.get_by_role("heading", name="Models", exact=True).wait_for()
    sign_out(page)
    # The other tab, left alone, is signed out too at its sidebar's next refresh
    # (every 2 s), and stays on its page to sign in again.
    other_tab.get_by_role("heading", name="Sign in").wait_for(timeout=30_000)
    expect(other_tab.get_by_role("heading", name="Models", exact=True)).to_have_count(0)
    assert other_tab.url.endswith("/models")
    other_tab.close()


def test_sign_in_failures_behind_a_trusted_proxy_count_the_forwarded_address(site, browser):
    """The server trusts a proxy on loopback (FORWARDED_ALLOW_IPS' default), so
    each visitor's X-Forwarded-For address has its own failure budget."""
    url = site.url

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

    # Four names from one address: its fourth failure starts the wait.
    first = try_names(browser, "203.0.113.9", ["ana", "bea", "cy", "dan"])
    assert all("wait" not in m for m in first[:3]) and "wait 1 s" in first[3], first
    # Another visitor behind the same proxy is not slowed down by them.
    assert "wait" not in try_names(browser, "203.0.113.10", ["eve"])[0]
