"""What the pages share: who is signed in and what their role allows, links
into a page, and the running-job summary.

Who is signed in comes from the browser's session cookie (core/sessions.py),
read again on every run: a reload or a new tab stays signed in, signing out
(or an admin deactivating the user) ends it in every tab at its next run, and
a Streamlit session id presented without the cookie is worth nothing. The
role is read from the database on every run too, so a change by an admin
applies at the next click.
"""

import logging
import re
from urllib.parse import quote, urlencode

import pandas as pd
import streamlit as st
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
from streamlit.runtime.scriptrunner_utils.script_run_context import get_script_run_ctx

from core import sessions, users
from core.access import Actor, Permission, allows
from core.db import read_session, session_scope
from core.models import TrainingImage
from core.thumbnails import thumbnail

log = logging.getLogger(__name__)

# A run without a browser behind it (AppTest, which cannot send cookies)
# keeps its session token here instead; a browser's runs never read it.
TOKEN_KEY = "session_token"


def _has_browser() -> bool:
    # A websocket from a browser always comes with HTTP headers; AppTest has none.
    return bool(st.context.headers)


def _session_token() -> str | None:
    if _has_browser():
        return st.context.cookies.get(sessions.COOKIE_NAME)
    return st.session_state.get(TOKEN_KEY)


def _go_to(url: str) -> None:
    """Send the browser to `url`, an HTTP route of this server. Streamlit has
    no public call for it; this is the message `st.login` sends for the same
    purpose (the frontend sets `window.location`)."""
    message = ForwardMsg()
    message.auth_redirect.url = url
    get_script_run_ctx().enqueue(message)


# What turns typed text into something else in Streamlit's markdown: links and
# images (`[`), emphasis and code, raw HTML and `<url>` autolinks, `$` maths,
# tables, `:red[...]` directives (need `[`), bare URLs that GFM links by itself
# (`http://`, `www.`), and block markers at the start (heading, quote, list).
# Other punctuation stays as typed, so messages read (and match) as written.
_INLINE_MARKS = re.compile(r"([\\`*_~\[\]<>$|])")
_BARE_URL = re.compile(r"(?i)(?<=[a-z0-9])(:)(?=//)|(?<=\bwww)(\.)")
_BLOCK_START = re.compile(r"^(\s*)([#>+=-])|^(\s*[0-9]+)([.)])")


def md(text: object) -> str:
    """`text` (anything users or phones typed: category names, labels, user
    names, device ids, notes, reasons, error messages quoting them) made safe
    to put in markdown: shown as typed, never a link, image or formatting.
    Hand-written because neither Streamlit nor the standard library has one;
    a backslash before ASCII punctuation is CommonMark's escape."""
    escaped = _INLINE_MARKS.sub(r"\\\1", str(text).replace("\n", " "))
    escaped = _BARE_URL.sub(lambda m: "\\" + m.group(0), escaped)
    return _BLOCK_START.sub(lambda m: "\\".join(part for part in m.groups() if part is not None), escaped)


def signed_in() -> Actor | None:
    """The signed-in, still active user, or None."""
    with read_session() as session:
        user = sessions.session_user(_session_token(), session=session)
    return None if user is None else Actor(user.name, user.role)


def current_user() -> Actor:
    """The person acting (recorded on reviews, training requests, promotions
    and in the audit trail). A page run without one stops here."""
    actor = signed_in()
    if actor is None:
        st.info("Sign in to use the dashboard.")
        st.stop()
    return actor


def can(permission: Permission) -> bool:
    """Whether the signed-in user's role allows `permission` (to hide or disable
    controls; the core functions check again)."""
    actor = signed_in()
    return actor is not None and allows(actor.role, permission)


def require_page(permission: Permission) -> Actor:
    """The signed-in user, if their role may use this page; otherwise say so and stop."""
    actor = current_user()
    if not allows(actor.role, permission):
        st.warning(f"Your role ({actor.role}) may not use this page.")
        st.stop()
    return actor


def _try_sign_in() -> None:
    """The form's callback (it may change the fields): a failure empties the
    password field, so a wrong password is not left in it, and says why; a
    success leaves a one-time ticket for the run to exchange for the cookie."""
    name = st.session_state["sign_in_name"]
    try:
        with session_scope() as session:
            outcome = users.sign_in(
                name, st.session_state["sign_in_password"], session=session, client=st.context.ip_address
            )
            ticket = sessions.start_session(outcome.user_id, session=session) if outcome.ok else None
    except Exception:
        # The traceback (paths, source lines) is for the server's log, not the visitor.
        log.exception("sign-in of %r failed", name)
        st.session_state["sign_in_password"] = ""
        st.session_state["sign_in_error"] = (
            "Signing in failed because of an error on the server. Try again; if it persists, tell an admin."
        )
        return
    if ticket is None:
        st.session_state["sign_in_password"] = ""
        st.session_state["sign_in_error"] = outcome.message
    else:
        st.session_state["sign_in_ticket"] = ticket


def sign_in_form(next_page: str = "/") -> None:
    """User name and password; failures are slowed down (core.users.sign_in).
    After signing in, the browser opens `next_page` (the page and query the
    address asked for)."""
    st.title("Sign in")
    with st.form("sign_in"):
        st.text_input("User name", key="sign_in_name")
        st.text_input("Password", type="password", key="sign_in_password")
        st.form_submit_button("Sign in", type="primary", on_click=_try_sign_in)
    if failed := st.session_state.pop("sign_in_error", None):
        st.error(md(failed))
    if ticket := st.session_state.pop("sign_in_ticket", None):
        if _has_browser():
            # Only an HTTP response can set the cookie: /session/start exchanges the ticket for it.
            _go_to(f"/session/start?ticket={ticket}&next={quote(next_page, safe='')}")
            st.stop()
        with session_scope() as session:
            st.session_state[TOKEN_KEY] = sessions.claim_ticket(ticket, session=session).token
        st.rerun()
    st.caption(
        "First run? The password of the user `admin` is in `first_admin_password.txt` in the data folder (`make run` printed its path)."
    )


def sign_out() -> None:
    """End this session in every tab (the run that follows shows the sign-in
    form and drops the cookie: `drop_ended_session`)."""
    with session_scope() as session:
        sessions.end_session(_session_token(), session=session)
    st.session_state.pop(TOKEN_KEY, None)


def drop_ended_session(next_page: str) -> None:
    """On a run that found no live session but a session cookie (signed out
    here or in another tab, expired, revoked by an admin), send the browser
    to `/session/end`, which deletes the cookie and comes back to `next_page`.

    Sent on every such run, not once from Sign out: Streamlit empties its
    outgoing queue when a run starts, keeping only its own lifecycle
    messages, so a redirect still queued when the next run begins (a
    fragment's timed refresh, which comes every 2 s) is dropped. That is why
    Sign out, which sent it once, stopped reaching the sign-in page when the
    sidebar refreshed every 2 s."""
    if _has_browser() and st.context.cookies.get(sessions.COOKIE_NAME):
        _go_to(f"/session/end?next={quote(next_page, safe='')}")


def page_address(page) -> str:
    """The address of `page` (an `st.Page`) with this run's query, e.g. `/metrics?round=3`."""
    query = urlencode(st.query_params.to_dict())
    return f"/{page.url_path}" + (f"?{query}" if query else "")


def linked(name: str, choices: list, parse=str):
    """The choice that the address's `?name=` links to (`/metrics?round=3`),
    or None without one; a value that names none of `choices` is reported
    and ignored."""
    raw = st.query_params.get(name)
    if raw is None:
        return None
    try:
        value = parse(raw)
    except ValueError:
        value = None
    if value in choices:
        return value
    # Not echoed: the address is anyone's text, and st.warning renders markdown.
    st.warning(f"The link names a {name} that does not exist here; showing the default instead.")
    return None


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def frame_of(rows: list[dict]) -> pd.DataFrame:
    """Rows for `st.dataframe`, where a missing text shows as a blank cell rather than "None".
    A yes/no column with gaps (e.g. "near chance" of a version recorded before
    the counts) keeps them: "" among booleans cannot be sent to the browser."""
    frame = pd.DataFrame(rows)
    text = [c for c in frame.select_dtypes("object").columns if not frame[c].map(lambda v: isinstance(v, bool)).any()]
    frame[text] = frame[text].fillna("")
    return frame


def when(*columns: str) -> dict:
    """Column settings that show these timestamp columns as dates and times
    in UTC ("2026-11-30 10:27"), not as raw ISO text with "+00:00"."""
    return {c: st.column_config.DatetimeColumn(c, format="YYYY-MM-DD HH:mm", timezone="UTC") for c in columns}


def show_thumbnail(image: TrainingImage) -> None:
    """The image's cached thumbnail, or a note when its file cannot be read."""
    try:
        path = thumbnail(image)
    except OSError as exc:
        st.caption(f"#{image.id}: file unreadable ({type(exc).__name__})")
    else:
        st.image(str(path), width="stretch")


def pick_page(total: int, size: int, key: str) -> tuple[int, int]:
    """The page of `total` rows, `size` a page, that the paginator under `key`
    shows (the paginator only when there is more than one), and how many
    pages there are; the caller reads that page's rows with OFFSET/LIMIT."""
    pages = max(1, -(-total // size))
    return (st.pagination(pages, key=key) if pages > 1 else 1), pages
