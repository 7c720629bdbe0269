"""Overview for stakeholders: the production model, accuracy and dataset over time."""

import pandas as pd
import plotly.express as px
import streamlit as st

from core import image_views, quality_views, registry, review
from core.access import Permission
from core.db import read_session, session_scope
from core.errors import UserError
from core.training.rounds import list_rounds
from core.uploads import load_demo
from pages._common import can, current_user, md

actor = current_user()
st.title("Overview")

with read_session() as session:
    production = registry.production_version(session=session)
    versions = quality_views.versions_table(session=session)
    counts = review.status_counts(session=session)
    growth = image_views.dataset_over_time(session=session)
    distribution = review.validated_counts(session=session)
    rounds = list_rounds(session=session, limit=1)
    changes = registry.promotion_history(session=session)

if not sum(counts.values()):
    st.info(
        "No images yet: upload some on the **Review images** page, or load the demo dataset "
        "(5 categories of drawn shapes, 60 each, already validated) to try the whole loop."
    )
    allowed = can(Permission.review_images)
    if st.button(
        "Load the demo dataset",
        type="primary",
        icon=":material/download:",
        disabled=not allowed,
        help=None if allowed else "Curators, operators and admins may load it.",
    ):
        with st.spinner("Drawing 300 demo pictures…"):
            try:
                with session_scope() as session:
                    report = load_demo(session=session, actor=actor)
            except UserError as exc:
                st.error(md(exc))
                st.stop()
        st.toast(f"Demo dataset: {report.summary()}")
        st.rerun()
    st.stop()

left, middle, right, last = st.columns(4)
left.metric("Production model", production.version if production else "none yet", border=True)
tested = quality_views.accuracy_summary(production.metrics) if production else {"accuracy": None}
middle.metric(
    "Test accuracy",
    "–" if tested["accuracy"] is None else f"{tested['accuracy']:.1f}%",
    border=True,
    help=(
        "On the held-out test images, never trained on; validation accuracy "
        + quality_views.accuracy_text(production.metrics, "val")
        if production
        else None
    ),
)
if production:
    # The images and interval under the figure: a card cuts a long value off.
    middle.caption(quality_views.accuracy_text(production.metrics))
right.metric("Validated images", counts["validated"], border=True, help=f"{counts['pending']} waiting for review")
if rounds:
    last_round = rounds[0]
    outcome = last_round.status.value.replace("_", " ")
    last.metric("Last training", outcome, border=True, help=f"job {last_round.job_id}")
else:
    last.metric("Last training", "none yet", border=True)

st.subheader("Accuracy of every version")
if versions:
    frame = (
        pd.DataFrame(versions)
        .sort_values("created")
        .rename(columns={"test_accuracy": "test", "val_accuracy": "validation", "train_accuracy": "training"})
        # A version made before test images existed has no test accuracy: a gap, not an error.
        .astype({"test": float, "validation": float, "training": float})
    )
    chart = px.line(
        frame,
        x="version",
        y=["test", "validation", "training"],
        markers=True,
        hover_data=["created"],
        labels={"value": "accuracy (%)", "version": "version (oldest to newest)"},
        # Test accuracy is the one to judge by; training accuracy is the least telling, so the faintest.
        color_discrete_map={"test": "#1f4e9c", "validation": "#7fa7d9", "training": "#c8c8c8"},
    )
    chart.update_traces(selector={"name": "training"}, line_dash="dot")
    chart.update_layout(legend_title_text="accuracy on")  # not plotly's "variable"
    if production is not None:
        since = f" since {production.promoted_at:%Y-%m-%d}" if production.promoted_at else ""
        chart.add_scatter(
            x=[production.version],
            y=[production.metrics.get("test_accuracy") or production.metrics.get("val_accuracy")],
            mode="markers",
            marker={"size": 16, "symbol": "star", "color": "#e0a800"},
            name=f"in production{since}",
        )
    shown = set(frame["version"])
    # Overrides of the gate and rollbacks, each marked on the version it put in production.
    for event in changes:
        if (event.override or event.action == "rollback") and event.to_version in shown:
            what = "gate overridden" if event.override else f"rolled back from {event.from_version}"
            chart.add_annotation(
                x=event.to_version, y=100, text=f"{what}<br>{event.at:%Y-%m-%d}", showarrow=True, arrowhead=2, ay=-30
            )
    st.plotly_chart(chart, key="accuracy_chart")
else:
    st.info("No model yet: go to **Train** and start a training round.")

st.subheader("Dataset over time")
left, right = st.columns(2)
with left:
    # Stacked bars, one per upload day: the height is the dataset's size
    # that day, the colours its categories (and a single day still shows).
    frame = pd.DataFrame(growth).assign(day=lambda f: f["day"].astype(str))
    chart = px.bar(
        frame,
        x="day",
        y="images",
        color="category",
        labels={"images": "images (not rejected)", "day": "end of upload day"},
    )
    chart.update_xaxes(type="category")
    st.plotly_chart(chart, key="growth_chart")
with right:
    chart = px.bar(
        pd.DataFrame({"category": list(distribution), "validated": list(distribution.values())}),
        x="category",
        y="validated",
        labels={"validated": "validated images"},
    )
    st.plotly_chart(chart, key="distribution_chart")

if rounds:
    last_round = rounds[0]
    st.subheader("Last training round")
    summary = f"Job `{last_round.job_id}` ({last_round.total_images} images): **{last_round.status.value}**"
    if last_round.model_version_id:
        summary += f", made model **{next((v['version'] for v in versions if v['round'] == last_round.id), '?')}**"
    st.markdown(summary)
    if last_round.error:
        st.error(md(last_round.error))
    for warning in last_round.warnings:
        st.warning(md(warning))
