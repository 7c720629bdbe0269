"""Live metrics (operators): a round's progress and curves while it runs, its results after."""

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from core import image_views, quality_views, registry, round_views
from core.db import read_session
from core.models import FINISHED_STATUSES
from core.training import federated
from core.training.config import FEDERATED
from core.training.rounds import epoch_metrics, get_round, list_rounds
from pages._common import current_user, format_seconds, linked, md, show_thumbnail

REFRESH_SECONDS = 2

current_user()

st.title("Live metrics")

with read_session() as session:
    rounds = list_rounds(session=session, limit=100)
    running = round_views.current_round(session=session)

if not rounds:
    st.info("No training round yet: start one on the **Train** page.")
    st.stop()

# No status in the label: it changes while the page is open.
labels = {r.id: f"round {r.id} · {r.created_at:%Y-%m-%d %H:%M} · job {r.job_id[:8]}" for r in rounds}
# A link (/metrics?round=3) picks the round; else the running one, else the newest.
default = linked("round", list(labels), parse=int) or (running.id if running is not None else rounds[0].id)
round_id = st.selectbox(
    "Training round", list(labels), index=list(labels).index(default), format_func=labels.get, key="round_id"
)
# The address follows the choice, so it can be copied as a link to this round.
st.query_params["round"] = str(round_id)


def curves(metrics) -> None:
    if not metrics:
        st.caption("The curves appear when the first epoch ends.")
        return
    frame = pd.DataFrame([m.model_dump() for m in metrics]).rename(
        columns={
            "train_loss": "training loss",
            "val_loss": "validation loss",
            "train_accuracy": "training accuracy",
            "val_accuracy": "validation accuracy",
        }
    )
    left, right = st.columns(2)
    loss = px.line(frame, x="epoch", y=["training loss", "validation loss"], markers=True, labels={"value": "loss"})
    acc = px.line(
        frame,
        x="epoch",
        y=["training accuracy", "validation accuracy"],
        markers=True,
        labels={"value": "accuracy (%)"},
    )
    acc.update_yaxes(range=[0, 100])
    for chart in (loss, acc):
        chart.update_xaxes(dtick=1)
        chart.update_layout(legend_title_text="")
    left.plotly_chart(loss, key="loss_chart")
    right.plotly_chart(acc, key="accuracy_chart")


def live(round_id: int) -> None:
    with read_session() as session:
        round_ = get_round(round_id, session=session)
        metrics = epoch_metrics(round_id, session=session)
    epochs = round_.parameters.get("epochs", 0)
    if round_.status in FINISHED_STATUSES:
        # It ended while we watched: rerun the page to show the results.
        if st.session_state.get("watched_active") == round_id:
            st.session_state.pop("watched_active")
            st.rerun()
    else:
        st.session_state["watched_active"] = round_id
    with read_session() as session:
        typical = round_views.typical_phases(session=session)
    elapsed, left = round_views.round_timing(round_, typical=typical)
    c1, c2, c3 = st.columns(3)
    c1.metric("Status", round_.status.value.replace("_", " "))
    if round_.status == "queued":
        st.info("Queued: waiting for a worker to pick it up.")
    elif round_.status == "in_progress":
        st.progress(min(1.0, round_.progress), text=round_views.progress_text(round_))
        c2.metric("Elapsed", format_seconds(elapsed))
        c3.metric(
            "Time left (estimate)",
            format_seconds(left),
            help="The training left at its pace so far, plus exporting, checking the phone files and scoring "
            "as long as they took in the last completed round.",
        )
    if round_.phases:
        st.dataframe(
            pd.DataFrame(round_views.phase_rows(round_, typical)),
            hide_index=True,
            key="phases_table",
            column_config={
                "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0, format="percent"),
                "seconds": st.column_config.NumberColumn("time (s)", format="%.0f"),
            },
        )
    if round_.status not in ("queued", "in_progress"):
        c2.metric("Duration", format_seconds(elapsed))
        c3.metric("Epochs run", f"{len(metrics)}/{epochs}")
    if round_.device:
        st.caption(f"Device: {md(round_.device)}")
    if round_.trials:
        trials(round_views.trial_rows(round_))
    if round_.parameters.get("training_mode") == FEDERATED:
        phones(round_)
    else:
        curves(metrics)


def phones(round_) -> None:
    """A federated round: each aggregation round and the phones' updates (core/training/federated.py)."""
    with read_session() as session:
        view = federated.round_view(round_, session=session)
    st.markdown(
        f"**Federated: {len(view['plans'])} of {view['rounds']} rounds published.** Phones train the head on "
        "their own pictures; the server averages their updates and scores the result on its test images."
    )
    if view["plans"]:
        st.dataframe(
            pd.DataFrame(view["plans"]),
            hide_index=True,
            key="federated_rounds_table",
            column_config={
                "test_accuracy": st.column_config.NumberColumn("test accuracy (%)", format="%.1f"),
                "test_images": st.column_config.NumberColumn(
                    "n", help="the server's test images the average was scored on"
                ),
                "test_interval": st.column_config.TextColumn("95% CI", help="Wilson interval of the accuracy"),
                "pending": st.column_config.NumberColumn("pending", help="updates still needed to close the round"),
                "working": st.column_config.TextColumn(
                    "working on it", help="phones that fetched this round's head and have not sent their update yet"
                ),
            },
        )
    if view["updates"]:
        st.markdown("**Updates from the phones** (refused ones with the reason the phone was given)")
        st.dataframe(pd.DataFrame(view["updates"]), hide_index=True, key="federated_updates_table")
    else:
        st.caption("No phone has sent an update yet.")


def trials(rows: list[dict]) -> None:
    """Auto mode's search, trial by trial, as it runs (core/training/auto.py)."""
    st.markdown(
        "**Auto mode: the search.** Each trial trains a few epochs; successive halving stops (prunes) the weak "
        "ones early, and the chosen one then trains to the end below."
    )
    st.dataframe(
        pd.DataFrame(rows),
        hide_index=True,
        key="trials_table",
        column_order=[
            "number",
            "chosen",
            "state",
            "architecture",
            "learning_rate",
            "image_size",
            "epochs",
            "val_accuracy",
            "val_images",
            "val_interval",
            "seconds",
            "note",
        ],
        column_config={
            "number": st.column_config.NumberColumn("trial"),
            "learning_rate": st.column_config.NumberColumn("learning rate", format="%.5f"),
            "image_size": st.column_config.NumberColumn("image size (px)"),
            "val_accuracy": st.column_config.NumberColumn("validation accuracy (%)", format="%.1f"),
            "val_images": st.column_config.NumberColumn("n", help="validation images behind the accuracy"),
            "val_interval": st.column_config.TextColumn("95% CI", help="Wilson interval of the accuracy"),
            "seconds": st.column_config.NumberColumn("time (s)", format="%.1f"),
        },
    )


with read_session() as session:
    selected = get_round(round_id, session=session)
active = selected.status not in FINISHED_STATUSES
st.fragment(run_every=REFRESH_SECONDS if active else None)(live)(round_id)

if active:
    st.stop()

if selected.error:
    st.error(f"The round failed: {md(selected.error)}")
for warning in selected.warnings:
    st.warning(md(warning))
if selected.model_version_id is None:
    st.stop()

with read_session() as session:
    version = registry.get_version_by_id(selected.model_version_id, session=session)
    wrong = version.metrics.get("misclassified", [])
    images = image_views.images_by_id([m["image_id"] for m in wrong], session=session)

st.subheader(f"Model {version.version}")
c1, c2, c3, c4 = st.columns(4)
c1.metric(
    "Test accuracy", quality_views.accuracy_text(version.metrics), border=True, help="held-out images, never trained on"
)
c2.metric("Validation accuracy", quality_views.accuracy_text(version.metrics, "val"), border=True)
c3.metric("Training accuracy", f"{version.metrics.get('train_accuracy', 0):.1f}%", border=True)
c4.metric("Size", f"{version.metrics.get('model_size_mb', 0):.1f} MB", border=True)

left, right = st.columns(2)
per_class = quality_views.per_category_rows(version.metrics, "val")
with left:
    st.markdown("**Accuracy per category** (validation images; n: images behind each bar)")
    chart = px.bar(
        pd.DataFrame(per_class, columns=["category", "accuracy (%)", "images"]),
        x="category",
        y="accuracy (%)",
        text="images",
        hover_data=["images"],
    )
    chart.update_traces(texttemplate="n = %{text}")
    chart.update_yaxes(range=[0, 100])
    st.plotly_chart(chart, key="per_class_chart")
    st.dataframe(pd.DataFrame(per_class), hide_index=True, key="per_class_table")
with right:
    st.markdown("**Confusion matrix** (rows: true category, columns: predicted)")
    heatmap = go.Figure(
        go.Heatmap(
            z=version.metrics.get("confusion_matrix", []),
            x=version.classes,
            y=version.classes,
            colorscale="Blues",
            text=version.metrics.get("confusion_matrix", []),
            texttemplate="%{text}",
        )
    )
    heatmap.update_layout(xaxis_title="predicted", yaxis_title="true", yaxis_autorange="reversed")
    st.plotly_chart(heatmap, key="confusion_chart")

st.markdown(f"**Misclassified validation images** ({len(wrong)})")
if not wrong:
    st.caption("None: every validation image was classified correctly.")
grid = st.columns(8)
for i, item in enumerate(wrong[:48]):
    image = images.get(item["image_id"])
    with grid[i % 8]:
        if image is not None:
            show_thumbnail(image)
        st.caption(f"#{item['image_id']}: {md(item['true'])} → **{md(item['predicted'])}** ({item['confidence']:.0%})")

st.markdown("**Held-out test images**")
if version.metrics.get("test_images"):
    st.metric("Test images", version.metrics["test_images"], border=True, help="never trained on by any version")
    st.dataframe(
        pd.DataFrame(quality_views.per_category_rows(version.metrics)), hide_index=True, key="test_per_class_table"
    )
    with read_session() as session:
        by_origin = quality_views.accuracy_by_origin(version, session=session)
    st.caption(
        "Accuracy on the test images by where they came from, worst first, with today's labels: "
        "a phone whose camera produces bad pictures stands out."
    )
    by_source, by_device = st.columns(2)
    by_source.dataframe(pd.DataFrame(by_origin["source"]), hide_index=True, key="accuracy_by_source")
    by_device.dataframe(pd.DataFrame(by_origin["device"]), hide_index=True, key="accuracy_by_device")
else:
    st.caption("This version was made before test images were held out.")

with st.expander("Round history"):
    st.code("\n".join(selected.history) or "–", language=None)
