"""The dashboard frame: page config, the sign-in gate, sidebar (who, production
model, queue), navigation with the pages the user's role may use."""

import streamlit as st

from core import quality_views, registry, round_views
from core.access import Permission, allows
from core.db import read_session
from pages._common import drop_ended_session, format_seconds, md, page_address, sign_in_form, sign_out, signed_in

st.set_page_config(page_title="Training dashboard", page_icon=":material/model_training:", layout="wide")

# (section, page, permission needed to see it)
PAGES = [
    ("Stakeholders", st.Page("pages/overview.py", title="Overview", icon=":material/dashboard:", default=True), None),
    ("Curators", st.Page("pages/review.py", title="Review images", icon=":material/photo_library:"),
     Permission.review_images),
    ("Operators", st.Page("pages/train.py", title="Train", icon=":material/play_circle:"), Permission.train),
    ("Operators", st.Page("pages/metrics.py", title="Live metrics", icon=":material/monitoring:"), None),
    ("Operators", st.Page("pages/models.py", title="Models", icon=":material/deployed_code:"), None),
    ("Administration", st.Page("pages/audit.py", title="Audit trail", icon=":material/history:"),
     Permission.read_audit),
    ("Administration", st.Page("pages/admin.py", title="Users and tokens", icon=":material/group:"),
     Permission.manage_users),
]  # fmt: skip

user = signed_in()
if user is None:
    # Nothing else renders (or runs) until someone signs in, whichever page
    # the address asks for. The form holds "/" (Overview's address); the other
    # pages are known (hidden), so a link such as /metrics?round=3 keeps its
    # address and opens after signing in.
    form = st.Page(sign_in_form, title="Sign in", icon=":material/login:", default=True)
    asked = st.navigation([form, *(page for _, page, _ in PAGES if page.url_path)], position="hidden")
    drop_ended_session(next_page=page_address(asked))
    sign_in_form(next_page=page_address(asked))
    st.stop()

sections: dict[str, list] = {}
for section, page, permission in PAGES:
    if permission is None or allows(user.role, permission):
        sections.setdefault(section, []).append(page)
pages = st.navigation(sections)


# As often as Live metrics refreshes, so both show the same numbers.
@st.fragment(run_every=2)
def queue_status() -> None:
    if signed_in() is None:
        # Signed out in another tab, or deactivated: show the sign-in form.
        st.rerun()
    with read_session() as session:
        production = registry.production_version(session=session)
        running = round_views.current_round(session=session)
        queued = round_views.queued_count(session=session)
        typical = round_views.typical_phases(session=session)
    if production:
        st.metric("Production model", production.version, help="The version the mobile apps download.")
        st.caption(f"test accuracy {quality_views.accuracy_text(production.metrics)}")
    else:
        st.metric("Production model", "none yet")
    if running is not None and running.status == "in_progress":
        _, left = round_views.round_timing(running, typical=typical)
        st.progress(
            min(1.0, running.progress),
            text=f"Job {running.job_id[:8]}: {round_views.progress_text(running)}, about {format_seconds(left)} left",
        )
    else:
        st.caption("No job running.")
    st.caption(f"{queued} job(s) queued.")


with st.sidebar:
    st.markdown(f"Signed in as **{md(user.name)}** · {user.role}")
    st.button("Sign out", key="sign_out", icon=":material/logout:", on_click=sign_out)
    queue_status()

pages.run()
