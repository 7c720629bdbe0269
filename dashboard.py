"""The dashboard frame: page config, sidebar (who, production model, queue), navigation."""

import streamlit as st

from core import registry, stats
from core.db import read_session
from pages._common import format_seconds, user_name_input

st.set_page_config(page_title="Training dashboard", page_icon=":material/model_training:", layout="wide")

pages = st.navigation(
    {
        "Stakeholders": [st.Page("pages/overview.py", title="Overview", icon=":material/dashboard:", default=True)],
        "Curators": [st.Page("pages/review.py", title="Review images", icon=":material/photo_library:")],
        "Operators": [
            st.Page("pages/train.py", title="Train", icon=":material/play_circle:"),
            st.Page("pages/metrics.py", title="Live metrics", icon=":material/monitoring:"),
            st.Page("pages/models.py", title="Models", icon=":material/deployed_code:"),
        ],
    }
)


@st.fragment(run_every=5)
def queue_status() -> None:
    with read_session() as session:
        production = registry.production_version(session=session)
        running = stats.current_round(session=session)
        queued = stats.queued_count(session=session)
    if production:
        st.metric("Production model", production.version, help="The version the mobile apps download.")
        st.caption(f"validation accuracy {production.metrics.get('val_accuracy', 0):.1f}%")
    else:
        st.metric("Production model", "none yet")
    if running is not None and running.status == "in_progress":
        _, left = stats.round_timing(running)
        st.progress(
            running.progress,
            text=f"Job {running.job_id[:8]}: epoch {running.current_epoch}/{running.parameters['epochs']}, "
            f"about {format_seconds(left)} left",
        )
    else:
        st.caption("No job running.")
    st.caption(f"{queued} job(s) queued.")


with st.sidebar:
    user_name_input()
    queue_status()

pages.run()
