"""What the pages share: who is acting, and the running-job summary.

There is no sign-in yet: the person acting is the name typed in the sidebar.
`current_user` is the one place a later sign-in replaces.
"""

import streamlit as st

from core.models import TrainingImage
from core.thumbnails import thumbnail

DEFAULT_USER = "dashboard user"


def current_user() -> str:
    """The name recorded on reviews, training requests and promotions."""
    return (st.session_state.get("user_name") or "").strip() or DEFAULT_USER


def user_name_input() -> None:
    """The sidebar field that sets `current_user` for this browser session."""
    st.session_state.setdefault("user_name", DEFAULT_USER)
    st.text_input("Your name", key="user_name", help="Recorded with your reviews, training jobs and promotions.")


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
