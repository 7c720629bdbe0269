"""Browser sessions (core/sessions.py, api/browser.py): the cookie that keeps
a browser signed in, its expiry and revocation, and what it guards, checked
in core and against the real web server (`streamlit run server.py`) over
HTTP and Streamlit's own websocket protocol."""

import re
from datetime import timedelta

import httpx
import pytest
from sqlmodel import select
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

from api.browser import local_path
from core import sessions, users
from core.config import get_settings
from core.db import session_scope
from core.models import BrowserSession, utcnow
from tests.conftest import ROOT
from tests.factories import add_images, add_user, as_actor
from tests.servers import start_web


def signed_in_token(session, user) -> str:
    return sessions.claim_ticket(sessions.start_session(user.id, session=session), session=session).token


# --- core ------------------------------------------------------------------------


def test_a_ticket_is_exchanged_once_for_a_token_that_names_the_user(session):
    ana = add_user(session, "ana", "curator")
    ticket = sessions.start_session(ana.id, session=session)
    cookie = sessions.claim_ticket(ticket, session=session)
    assert sessions.session_user(cookie.token, session=session).name == "ana"
    assert sessions.claim_ticket(ticket, session=session) is None
    assert sessions.session_user(ticket, session=session) is None
    hours = (cookie.expires_at - utcnow()).total_seconds() / 3600
    assert 11.9 < hours <= 12


def test_a_ticket_older_than_a_minute_is_refused(session):
    ana = add_user(session, "ana", "curator")
    ticket = sessions.start_session(ana.id, session=session)
    row = session.exec(select(BrowserSession)).one()
    row.created_at = utcnow() - timedelta(seconds=61)
    session.add(row)
    assert sessions.claim_ticket(ticket, session=session) is None


def test_a_session_expires_after_session_hours(session, monkeypatch):
    monkeypatch.setenv("SESSION_HOURS", "0.5")
    get_settings.cache_clear()
    ana = add_user(session, "ana", "curator")
    token = signed_in_token(session, ana)
    row = session.exec(select(BrowserSession)).one()
    assert abs((row.expires_at - row.created_at).total_seconds() - 1800) < 1
    assert sessions.session_user(token, session=session) is not None
    row.expires_at = utcnow() - timedelta(seconds=1)
    session.add(row)
    assert sessions.session_user(token, session=session) is None


def test_signing_out_ends_that_session_only_and_ended_sessions_are_cleared_later(session):
    ana = add_user(session, "ana", "curator")
    laptop, phone = signed_in_token(session, ana), signed_in_token(session, ana)
    sessions.end_session(laptop, session=session)
    assert sessions.session_user(laptop, session=session) is None
    assert sessions.session_user(phone, session=session).name == "ana"
    assert len(session.exec(select(BrowserSession)).all()) == 2
    signed_in_token(session, ana)  # the next sign-in clears the ended session's row
    assert len(session.exec(select(BrowserSession)).all()) == 2
    assert sessions.session_user(phone, session=session).name == "ana"


@pytest.mark.parametrize(
    "change",
    [
        lambda s: users.set_active("ana", False, session=s, actor=as_actor()),
        lambda s: users.reset_password("ana", session=s, actor=as_actor()),
    ],
    ids=["deactivate", "reset-password"],
)
def test_deactivating_or_resetting_a_password_signs_the_user_out_everywhere(session, change):
    ana = add_user(session, "ana", "curator")
    bea = add_user(session, "bea", "curator")
    tokens = [signed_in_token(session, ana) for _ in range(2)]
    other = signed_in_token(session, bea)
    change(session)
    session.commit()
    users.set_active("ana", True, session=session, actor=as_actor())
    # Reactivating does not bring the old sessions back.
    assert [sessions.session_user(t, session=session) for t in tokens] == [None, None]
    assert sessions.session_user(other, session=session).name == "bea"


@pytest.mark.parametrize(
    ("asked", "opened"),
    [
        ("/metrics?round=3", "/metrics?round=3"),
        ("/models?version=1.2.0", "/models?version=1.2.0"),
        ("https://evil.example/x", "/"),
        ("//evil.example/x", "/"),
        ("/\\evil.example", "/"),
        ("javascript:alert(1)", "/"),
        ("", "/"),
    ],
)
def test_after_sign_in_the_browser_only_goes_to_a_page_of_this_site(asked, opened):
    assert local_path(asked) == opened


def test_the_cookie_is_marked_secure_when_session_cookie_secure_is_set(session, monkeypatch):
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from api.browser import routes

    monkeypatch.setenv("SESSION_COOKIE_SECURE", "true")
    get_settings.cache_clear()
    add_user(session, "ana", "curator")
    with session_scope() as s:
        ticket = sessions.start_session(users.get_user("ana", session=s).id, session=s)
    client = TestClient(Starlette(routes=routes), base_url="https://dashboard.example")
    answer = client.get("/session/start", params={"ticket": ticket}, follow_redirects=False)
    assert answer.status_code == 303 and "Secure" in answer.headers["set-cookie"]


# --- the real web server ------------------------------------------------------------


@pytest.fixture
def web(data_dir, tmp_path):
    """`streamlit run server.py` (as `python -m cli serve` starts it) on a free port."""
    server = start_web(tmp_path / "web.log")
    try:
        yield server.url
    finally:
        server.stop()


def cookie_for(url: str, name: str) -> str:
    """Sign in as the sign-in form does (password checked, ticket issued),
    then let /session/start turn the ticket into the cookie."""
    with session_scope() as s:
        outcome = users.sign_in(name, "correct horse battery", session=s)
        ticket = sessions.start_session(outcome.user_id, session=s)
    answer = httpx.get(f"{url}/session/start", params={"ticket": ticket, "next": "/metrics?round=3"})
    assert answer.status_code == 303 and answer.headers["location"] == "/metrics?round=3"
    set_cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=lax" in set_cookie and "Secure" not in set_cookie
    return answer.cookies[sessions.COOKIE_NAME]


def run_page(url: str, page: str = "", cookie: str | None = None, session_id: str = "") -> tuple[str, bytes]:
    """Open Streamlit's websocket as a browser tab does (optionally presenting
    an existing session id), run `page` once; returns the session id and
    everything the server sent."""
    from websockets.sync.client import connect

    headers = {"Cookie": f"{sessions.COOKIE_NAME}={cookie}"} if cookie else {}
    protocols = ["streamlit", "no-xsrf-token", session_id] if session_id else ["streamlit"]
    received, new_session = b"", ""
    with connect(
        url.replace("http", "ws") + "/_stcore/stream", subprotocols=protocols, additional_headers=headers
    ) as ws:
        back = BackMsg()
        back.rerun_script.page_name = page
        back.rerun_script.context_info.url = f"{url}/{page}"
        ws.send(back.SerializeToString())
        while True:
            data = ws.recv(timeout=60)
            message = ForwardMsg()
            message.ParseFromString(data)
            received += data
            if message.WhichOneof("type") == "new_session":
                new_session = message.new_session.initialize.session_id
            if message.WhichOneof("type") == "script_finished":
                return new_session, received


def test_a_session_cookie_signs_in_every_tab_and_a_session_id_alone_does_not(web, session):
    add_user(session, "ana", "curator")
    cookie = cookie_for(web, "ana")
    session_id, shown = run_page(web, cookie=cookie)
    assert b"Signed in as **ana**" in shown
    # A new tab (a new connection with the same cookie) is signed in too.
    assert b"Signed in as **ana**" in run_page(web, cookie=cookie)[1]

    # Presenting only that session id, without the cookie, resumes nothing.
    resumed_id, shown = run_page(web, session_id=session_id)
    assert resumed_id == session_id  # Streamlit did reattach the session ...
    assert b"Signed in as" not in shown and b"Sign in" in shown  # ... but the identity stayed with the cookie


def test_media_needs_a_live_session_cookie(web, session):
    # The server's first visitor, opening a link to a page: the dashboard's
    # sign-in form (the link opens after signing in), not the page file alone.
    _, shown = run_page(web, "review")
    assert b"Password" in shown and b"Sign in to use the dashboard." not in shown
    add_user(session, "ana", "curator")
    add_images(session, {"cat": 2, "dog": 2})
    cookie = cookie_for(web, "ana")
    _, shown = run_page(web, "review", cookie=cookie)
    media = re.search(rb"/media/[0-9a-f]+\.\w+", shown)
    assert media, "the review page showed no thumbnail"
    address = web + media.group().decode()
    assert httpx.get(address, cookies={sessions.COOKIE_NAME: cookie}).status_code == 200
    refused = httpx.get(address)
    assert refused.status_code == 403 and "Sign in" in refused.text
    assert httpx.get(address, cookies={sessions.COOKIE_NAME: "made-up"}).status_code == 403

    # Sign out (what the dashboard's button does), then /session/end drops the cookie.
    with session_scope() as s:
        sessions.end_session(cookie, session=s)
    assert httpx.get(address, cookies={sessions.COOKIE_NAME: cookie}).status_code == 403
    # Every run that finds the ended session's cookie (a tab left open, its next refresh)
    # shows the sign-in form and sends the browser to /session/end, to drop the cookie and
    # come back to the same page (here Overview, "/").
    for _ in range(2):
        _, shown = run_page(web, cookie=cookie)
        assert b"Signed in as" not in shown and b"Password" in shown
        assert re.search(rb"/session/end\?next=%2F(?![\w%])", shown)
    ended = httpx.get(f"{web}/session/end", params={"next": "/models"}, cookies={sessions.COOKIE_NAME: cookie})
    assert ended.status_code == 303 and f'{sessions.COOKIE_NAME}=""' in ended.headers["set-cookie"]
    assert ended.headers["location"] == "/models"


def test_session_end_keeps_a_live_sessions_cookie_and_a_used_ticket_opens_nothing(web, session):
    add_user(session, "ana", "curator")
    cookie = cookie_for(web, "ana")
    # A link from elsewhere to /session/end signs nobody out.
    kept = httpx.get(
        f"{web}/session/end", params={"next": "//elsewhere.example/"}, cookies={sessions.COOKIE_NAME: cookie}
    )
    assert kept.status_code == 303 and "set-cookie" not in kept.headers and kept.headers["location"] == "/"
    with session_scope() as s:
        assert sessions.session_user(cookie, session=s).name == "ana"
    stale = httpx.get(f"{web}/session/start", params={"ticket": "not-a-ticket", "next": "/train"})
    assert stale.status_code == 303 and stale.headers["location"] == "/" and "set-cookie" not in stale.headers


# --- pages (AppTest: it cannot send cookies, so it carries the token in session state) ---


def dashboard(token: str | None = None):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "dashboard.py"), default_timeout=60)
    if token:
        at.session_state["session_token"] = token
    return at


def test_signing_out_in_one_tab_signs_every_tab_out(session):
    add_user(session, "ana", "curator", password="right password")
    first = dashboard().run()
    first.text_input(key="sign_in_name").input("ana")
    first.text_input(key="sign_in_password").input("right password")
    first.get("form_submit_button")[0].click().run()
    token = first.session_state["session_token"]
    second = dashboard(token).run()  # another tab of the same browser
    assert any("**ana** · curator" in m.value for m in second.sidebar.markdown)

    first.sidebar.button(key="sign_out").click().run()
    with session_scope() as s:
        assert sessions.session_user(token, session=s) is None
    second.run()
    # (AppTest reruns the page last shown rather than the frame: that page stops, asking to sign in.)
    assert "Sign in" in second.info[0].value and not second.sidebar.button and not second.title


def test_a_link_to_a_round_opens_that_round_and_the_address_follows_the_choice(session):
    from streamlit.testing.v1 import AppTest

    from core.models import RoundStatus, TrainingRound
    from tests.factories import sign_in

    rounds = [TrainingRound(parameters={"epochs": 1}, status=RoundStatus.failed) for _ in range(3)]
    session.add_all(rounds)
    session.commit()
    first, newest = rounds[0].id, rounds[-1].id
    at = AppTest.from_file(str(ROOT / "pages/metrics.py"), default_timeout=60)
    sign_in(at, add_user(session, "olga", "operator"))
    at.query_params["round"] = str(first)
    at.run()
    assert at.selectbox(key="round_id").value == first and not at.exception
    at.selectbox(key="round_id").select(newest).run()
    assert at.query_params["round"] == str(newest)

    at = AppTest.from_file(str(ROOT / "pages/metrics.py"), default_timeout=60)
    sign_in(at, add_user(session, "oleg", "operator"))
    at.query_params["round"] = "999"
    at.run()
    assert at.selectbox(key="round_id").value == newest  # the default: the newest round
    assert "does not exist" in at.warning[0].value


def test_a_link_to_a_version_opens_it_in_compare_and_downloads(session):
    from streamlit.testing.v1 import AppTest

    from tests.factories import add_fake_version, sign_in

    for version in ("1.0.0", "1.1.0", "1.2.0"):
        add_fake_version(session, version, production=version == "1.2.0")
    at = AppTest.from_file(str(ROOT / "pages/models.py"), default_timeout=60)
    sign_in(at, add_user(session, "vic", "viewer"))
    at.query_params["version"] = "1.0.0"
    at.run()
    assert not at.exception
    assert at.selectbox(key="compare_b").value == "1.0.0" and at.selectbox(key="compare_a").value != "1.0.0"
    assert at.selectbox(key="download_version").value == "1.0.0"


def test_an_error_while_signing_in_shows_a_short_message_and_logs_the_rest(session, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise OverflowError("date value out of range")

    monkeypatch.setattr(users, "sign_in", broken)
    at = dashboard().run()
    at.text_input(key="sign_in_name").input("ana")
    at.text_input(key="sign_in_password").input("whatever password")
    at.get("form_submit_button")[0].click().run()
    assert not at.exception
    assert at.error[0].value.startswith("Signing in failed because of an error on the server.")
    assert "Traceback" not in at.error[0].value and "date value out of range" not in at.error[0].value
    assert "OverflowError: date value out of range" in caplog.text


def test_an_unexpected_error_reaches_the_browser_without_its_traceback(web, session, tmp_path):
    from tests.factories import add_fake_version

    add_user(session, "ana", "curator")
    # A production version whose metrics are damaged (a list, not a mapping) breaks the sidebar.
    version = add_fake_version(session, "1.0.0")
    version.metrics = ["damaged"]
    session.add(version)
    session.commit()
    _, shown = run_page(web, cookie=cookie_for(web, "ana"))
    assert b"This app has encountered an error" in shown
    assert b"AttributeError" not in shown and b'File "' not in shown and b", line " not in shown
    log = re.sub(r"\x1b\[[0-9;]*m", "", (tmp_path / "web.log").read_text())  # without the colours
    assert "AttributeError: 'list' object has no attribute 'get'" in log  # the server's log has it all
