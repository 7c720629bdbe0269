"""What the pages share: who is signed in and what their role allows, and the
running-job summary.

The signed-in user lives in `st.session_state["user"]` as plain values
(`{"id", "name", "role"}`), never an ORM object; the role is read again from
the database on every run, so a change by an admin applies at the next click.
"""

import re

import streamlit as st

from core import users
from core.access import Actor, Permission, allows
from core.db import read_session, session_scope
from core.models import TrainingImage
from core.thumbnails import thumbnail

SESSION_KEY = "user"

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
    known = st.session_state.get(SESSION_KEY)
    if not known:
        return None
    with read_session() as session:
        user = users.current_user(known["id"], session=session)
    if user is None:
        st.session_state.pop(SESSION_KEY, None)
        return None
    return Actor(user.name, user.role)


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


def sign_in_form() -> None:
    """User name and password; failures are slowed down (core.users.sign_in)."""
    st.title("Sign in")
    with st.form("sign_in"):
        name = st.text_input("User name", key="sign_in_name")
        password = st.text_input("Password", type="password", key="sign_in_password")
        submitted = st.form_submit_button("Sign in", type="primary")
    if submitted:
        with session_scope() as session:
            outcome = users.sign_in(name, password, session=session, client=st.context.ip_address)
        if not outcome.ok:
            st.error(md(outcome.message))
            return
        st.session_state[SESSION_KEY] = {"id": outcome.user_id, "name": outcome.name, "role": outcome.role}
        st.rerun()
    st.caption(
        "First run? The password of the user `admin` is in `first_admin_password.txt` in the data folder (`make run` printed its path)."
    )


def sign_out() -> None:
    st.session_state.pop(SESSION_KEY, None)


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def show_thumbnail(image: TrainingImage) -> None:
    """The image's cached thumbnail, or a note when its file cannot be read."""
    try:
        path = thumbnail(image)
    except OSError as exc:
        st.caption(f"#{image.id}: file unreadable ({type(exc).__name__})")
    else:
        st.image(str(path), width="stretch")
