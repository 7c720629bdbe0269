"""Models (operators): versions, comparison, promotion and rollback, downloads."""

import pandas as pd
import plotly.express as px
import streamlit as st

from core import export, quality_views, registry
from core.access import Permission, allows
from core.config import get_settings
from core.db import read_session, session_scope
from core.errors import UserError
from pages._common import current_user, frame_of, linked, md, when

actor = current_user()
may_promote = allows(actor.role, Permission.promote)
st.title("Models")

with read_session() as session:
    table = quality_views.versions_table(session=session)
    production = registry.production_version(session=session)
    history = registry.promotion_history(session=session)

if not table:
    st.info("No model yet: start a training round on the **Train** page.")
    st.stop()

VERSION_COLUMNS = {
    "production": st.column_config.CheckboxColumn("production"),
    "created": st.column_config.DatetimeColumn("created", format="YYYY-MM-DD HH:mm"),
    "test_accuracy": st.column_config.NumberColumn(
        "test acc (%)", format="%.1f", help="on the held-out test images when the version was made"
    ),
    "test_images": st.column_config.NumberColumn("test n", help="test images behind the test accuracy"),
    "test_95_ci": st.column_config.TextColumn("test 95% CI", help="Wilson interval of the test accuracy"),
    "near_chance": st.column_config.CheckboxColumn(
        "near chance", help="test accuracy not clearly above always answering the commonest category"
    ),
    "gate": st.column_config.TextColumn("promotion gate", help="see 'Why candidates stayed candidates' below"),
    "val_images": st.column_config.NumberColumn("val n"),
    "val_accuracy": st.column_config.NumberColumn("val acc (%)", format="%.1f"),
    "train_accuracy": st.column_config.NumberColumn("train acc (%)", format="%.1f"),
    "size_mb": st.column_config.NumberColumn("size (MB)", format="%.2f"),
    "snapshot_hash": st.column_config.TextColumn("dataset snapshot", help="first 12 characters of its SHA-256"),
    "job_id": st.column_config.TextColumn("job id"),
    "image_size": st.column_config.NumberColumn("image size (px)"),
}
# The main table fits a laptop's width; the rest is one click away.
MAIN = [
    "version",
    "production",
    "created",
    "test_accuracy",
    "test_images",
    "test_95_ci",
    "near_chance",
    "gate",
    "val_accuracy",
    "val_images",
    "size_mb",
]
DETAILS = ["version", "train_accuracy", "round", "classes", "architecture", "image_size", "snapshot_hash", "job_id"]
# The gate's decisions (dicts) are shown in words below: kept out of the frame,
# which Arrow cannot send when a version without one sits beside one with.
shown = frame_of([{k: v for k, v in row.items() if k != "gate_decision"} for row in table])
st.dataframe(
    shown,
    hide_index=True,
    key="versions_table",
    column_order=MAIN,
    column_config=VERSION_COLUMNS,
)
with st.expander("More about each version (round, classes, architecture, dataset snapshot)"):
    st.dataframe(
        shown,
        hide_index=True,
        key="versions_details",
        column_order=DETAILS,
        column_config=VERSION_COLUMNS,
    )


scored = [row for row in table if row["test_accuracy"] is not None]
if scored:
    st.subheader("Test accuracy over time")
    frame = pd.DataFrame(scored).sort_values("created")
    frame["in production"] = frame["production"].map({True: "yes", False: "no"})
    chart = px.line(
        frame,
        x="created",
        y="test_accuracy",
        markers=True,
        hover_data=["version", "test_images", "gate"],
        labels={"test_accuracy": "test accuracy (%)", "created": ""},
    )
    chart.update_traces(line_color="#888")
    chart.add_scatter(
        x=frame.loc[frame["production"], "created"],
        y=frame.loc[frame["production"], "test_accuracy"],
        mode="markers",
        marker={"size": 14, "symbol": "star"},
        name="in production",
    )
    chart.update_yaxes(range=[0, 100])
    # Dates, not the milliseconds plotly zooms to around a single point.
    chart.update_xaxes(tickformat="%Y-%m-%d %H:%M")
    if len(frame) == 1:
        only = frame["created"].iloc[0]
        chart.update_xaxes(range=[only - pd.Timedelta(days=1), only + pd.Timedelta(days=1)])
    st.plotly_chart(chart, key="test_accuracy_chart")
    st.caption(
        "Each version's accuracy on the test images held out when it was made; the test set grows with the "
        "data, so compare two versions below on the images both were scored on."
    )

with st.expander("Why candidates stayed candidates (the promotion gate)"):
    st.dataframe(pd.DataFrame(quality_views.gate_reasons(table)), hide_index=True, key="gate_table")


def _version(name: str):
    """One version in full (the table above reads only what it shows)."""
    with read_session() as session:
        return registry.get_version(name, session=session)


def _negative_in_red(value) -> str:
    return "color: #c62828; font-weight: 600" if isinstance(value, (int, float)) and value < 0 else ""


def comparison(old: str, new: str) -> None:
    with read_session() as session:
        compared = quality_views.compare_versions(
            registry.get_version(old, session=session), registry.get_version(new, session=session), session=session
        )
    if compared["test_images"]:
        st.caption(
            f"Compared on the {compared['test_images']} test images both versions were scored on, "
            "with today's labels; per category: the same images. Deltas are "
            f"{new} − {old}; drops in red."
        )
    else:
        st.caption("No test image was scored by both versions: per category shows validation accuracy.")
    left, right = st.columns(2)
    for column, rows in ((left, compared["summary"]), (right, compared["per_category"])):
        if not rows:
            column.caption("No per-category accuracy recorded for these versions.")
            continue
        frame = pd.DataFrame(rows)
        column.dataframe(
            frame.style.map(_negative_in_red, subset=["delta"]).format(precision=2, na_rep="–"), hide_index=True
        )


st.subheader("Compare two versions")
names = [row["version"] for row in table]
# A link (/models?version=1.2.0) opens that version as B and in Downloads.
link = linked("version", names)
chosen_index = names.index(link) if link else 0
if len(names) < 2:
    st.caption(f"Only {names[0]} so far: train another version to compare them.")
else:
    # B: the linked version, else the newest other than production; A: production
    # (else the newest other than B). Never a version with itself.
    base = production.version if production is not None else names[1]
    other = link or (names[0] if names[0] != base else names[1])
    if other == base:
        base = next(name for name in names if name != other)
    c1, c2 = st.columns(2)
    older = c1.selectbox("Version A", names, index=names.index(base), key="compare_a")
    newer = c2.selectbox("Version B", names, index=names.index(other), key="compare_b")
    comparison(older, newer)

st.subheader("Production")
st.write(f"In production now: **{production.version if production else 'none'}**")
candidates = [n for n in names if production is None or n != production.version]
if not may_promote:
    st.caption("Operators and admins promote and roll back models.")
    st.session_state.pop("confirm", None)
else:
    left, right = st.columns(2)
    with left:
        candidate = st.selectbox("Version to promote", candidates, key="promote_version", disabled=not candidates)
        if st.button("Promote…", key="promote", disabled=not candidate):
            st.session_state["confirm"] = ("promote", candidate)
    with right:
        st.write("Put back the version that was in production before the current one.")
        if st.button("Roll back…", key="rollback", disabled=production is None):
            st.session_state["confirm"] = ("rollback", None)

    if pending := st.session_state.get("confirm"):
        action, target = pending
        with st.container(border=True):
            reason = None
            if action == "promote":
                st.markdown(f"**Promote {target} to production?** The mobile apps will download it.")
                with read_session() as session:
                    why = registry.reason_needed(registry.get_version(target, session=session), session=session)
                if why:
                    st.warning(f"{target} {md(why)}.")
                    reason = st.text_input("Reason for promoting it anyway (required, recorded)", key="override_reason")
                if production is not None:
                    comparison(production.version, target)
            else:
                try:
                    with read_session() as session:
                        now, back = registry.rollback_target(session=session)
                except UserError as exc:
                    st.error(str(exc))
                else:
                    st.markdown(
                        f"**Roll back from {now.version} to {back.version}?** The mobile apps will download it."
                    )
                    comparison(now.version, back.version)
            yes, no = st.columns(2)
            if yes.button("Confirm", key="confirm_yes", type="primary"):
                try:
                    with session_scope() as session:
                        if action == "promote":
                            done = registry.promote(target, session=session, actor=actor, reason=reason)
                        else:
                            done = registry.rollback(session=session, actor=actor)
                except UserError as exc:
                    st.error(md(exc))
                else:
                    st.session_state.pop("confirm")
                    st.session_state["models_message"] = f"Model {done.version} is now in production."
                    st.rerun()
            if no.button("Cancel", key="confirm_no"):
                st.session_state.pop("confirm")
                st.rerun()

if message := st.session_state.pop("models_message", None):
    st.success(message)

if history:
    st.markdown("**Promotion history**")
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "when": e.at,
                    "action": "promote (gate overridden)" if e.override else e.action,
                    "from": e.from_version,
                    "to": e.to_version,
                    "by": e.by,
                    "reason": e.reason or "",
                }
                for e in history
            ]
        ),
        hide_index=True,
        key="promotion_history",
        column_config=when("when"),
    )

st.subheader("Try a model")
st.caption("Drop a picture and see what a version predicts, run through its `.ptl` file as a phone runs it.")
tried_version, dropped = st.columns([1, 3])
tried = tried_version.selectbox(
    "Version", names, index=names.index(production.version) if production else 0, key="try_version"
)
picture = dropped.file_uploader("Picture", type=["jpg", "jpeg", "png", "webp", "bmp", "gif"], key="try_picture")
if picture is not None:
    try:
        predicted = export.try_model(_version(tried), picture.getvalue())
    except UserError as exc:
        st.error(str(exc))
    else:
        shown, answer = st.columns([1, 3])
        shown.image(picture.getvalue(), width="stretch")
        answer.markdown(f"Model **{tried}** says **{md(predicted[0][0])}** ({predicted[0][1]:.0%})")
        answer.dataframe(
            pd.DataFrame(predicted, columns=["category", "probability"]),
            hide_index=True,
            key="try_table",
            column_config={
                "probability": st.column_config.ProgressColumn(
                    "probability", min_value=0.0, max_value=1.0, format="percent"
                )
            },
        )

st.subheader("Downloads")
chosen = st.selectbox("Version", names, index=chosen_index, key="download_version")
data_dir = get_settings().data_dir
for artifact in _version(chosen).artifacts:
    path = data_dir / artifact["path"]
    parity = artifact.get("parity") or {}
    with st.container(border=True):
        left, right = st.columns([1, 3], vertical_alignment="center")
        left.download_button(
            f"Download .{artifact['format']}",
            data=path.read_bytes if path.exists() else b"",
            file_name=path.name,
            mime="application/octet-stream",
            key=f"download_{artifact['format']}",
            disabled=not path.exists(),
            on_click="ignore",
            icon=":material/download:",
        )
        verdict = "passed" if parity.get("passed") else "FAILED"
        right.markdown(
            f"`{path.name}` · {artifact['size_bytes'] / 1e6:.2f} MB · {artifact.get('runtime', '')}  \n"
            f"SHA-256 `{artifact['sha256']}`  \n"
            f"parity check {verdict}: top-1 agreement {parity.get('top1_agreement', 0):.0%} on "
            f"{parity.get('images', 0)} images, largest logit difference {parity.get('max_abs_logit_diff', 0):.1e}"
        )
