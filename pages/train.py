"""Train (operators): parameters, the preflight check, the queue, automatic retraining."""

import pandas as pd
import streamlit as st

from core import automation, stats, training
from core.access import Permission
from core.automation import SETTING_RANGES
from core.db import read_session, session_scope
from core.errors import UserError
from core.training import ARCHITECTURES, AUTO, PARAM_RANGES, TRAINING_MODES, TrainingConfig, param_range
from jobs import cancel_training, submit_training
from pages._common import require_page

actor = require_page(Permission.train)
defaults = TrainingConfig()

st.title("Train")
form, check = st.columns([3, 2], gap="large")

with form:
    st.subheader("Parameters")
    c1, c2 = st.columns(2)
    epochs = c1.number_input("Epochs", *PARAM_RANGES["epochs"][1:], value=defaults.epochs, step=1, key="epochs")
    batch_size = c2.number_input(
        "Batch size", *PARAM_RANGES["batch_size"][1:], value=defaults.batch_size, step=1, key="batch_size"
    )
    learning_rate = c1.number_input(
        "Learning rate",
        *PARAM_RANGES["learning_rate"][1:],
        value=defaults.learning_rate,
        step=0.0001,
        format="%.6f",
        key="learning_rate",
    )
    use_existing = c2.toggle(
        "Use existing model",
        value=defaults.use_existing_model,
        key="use_existing_model",
        help="Fine-tune the production model when it knows the same categories and has the same architecture.",
    )
    with st.expander("Advanced"):
        a1, a2 = st.columns(2)
        architecture = a1.selectbox(
            "Architecture", ARCHITECTURES, index=ARCHITECTURES.index(defaults.architecture), key="architecture"
        )
        image_size = a2.number_input(
            "Image size (px)",
            *PARAM_RANGES["image_size"][1:],
            value=None,
            step=32,
            placeholder="auto",
            key="image_size",
            help="Empty: auto, the validated images' median short side rounded to a multiple of 32 (32 to 224); "
            "the preflight says what it picks.",
        )
        val_split = a1.number_input(
            "Validation split", *PARAM_RANGES["val_split"][1:], value=defaults.val_split, step=0.05, key="val_split"
        )
        seed = a2.number_input("Seed", *PARAM_RANGES["seed"][1:], value=defaults.seed, step=1, key="seed")
        training_mode = a1.radio(
            "Training mode",
            TRAINING_MODES,
            index=TRAINING_MODES.index(defaults.training_mode),
            key="training_mode",
            horizontal=True,
            help="full: train every layer. head: keep a pretrained backbone (ImageNet weights, or the production "
            "model's own) frozen and train only the classifier, in seconds; the preflight says when it cannot.",
        )
        processes = a2.number_input(
            "Processes",
            *param_range("processes")[1:],
            value=defaults.processes,
            step=1,
            key="processes",
            help="Train the job in this many processes together (PyTorch DDP): gloo on the CPU, NCCL on GPUs, "
            "where each process needs its own GPU. The maximum is MAX_TRAINING_PROCESSES. Full mode only.",
        )

params = {
    "epochs": int(epochs),
    "batch_size": int(batch_size),
    "learning_rate": float(learning_rate),
    "use_existing_model": use_existing,
    "architecture": architecture,
    "image_size": AUTO if image_size is None else int(image_size),
    "val_split": float(val_split),
    "seed": int(seed),
    "training_mode": training_mode,
    "processes": int(processes),
}

with check:
    st.subheader("Preflight")
    with read_session() as session:
        preflight = training.preflight(TrainingConfig.from_params(params), session=session)
    st.metric("Validated images", preflight.total, border=True)
    if preflight.per_category:
        st.dataframe(
            pd.DataFrame(
                {"category": list(preflight.per_category), "validated": list(preflight.per_category.values())}
            ),
            hide_index=True,
            key="preflight_table",
        )
    for problem in preflight.problems:
        st.error(problem, icon=":material/block:")
    for notice in preflight.notices:
        st.info(notice)
    if preflight.ok:
        st.success("The dataset meets the rules: training can start.", icon=":material/check_circle:")

with form:
    clicked = st.button(
        "Train",
        key="train",
        type="primary",
        icon=":material/play_arrow:",
        disabled=not preflight.ok,
        help=" ".join(preflight.problems) or None,
    )
    if clicked:
        try:
            round_ = submit_training(params, actor=actor)
        except UserError as exc:
            st.error(str(exc))
        else:
            st.session_state["last_job_id"] = round_.job_id
            # Again from the top, so the sidebar's queue shows the new job too.
            st.rerun()
    if job_id := st.session_state.get("last_job_id"):
        st.success(f"Training job `{job_id}` queued. Follow it below or on **Live metrics**.")


@st.fragment(run_every=3)
def queue() -> None:
    st.subheader("Queue")
    with read_session() as session:
        rows = stats.queue_overview(session=session)
    if not rows:
        st.caption("No training jobs yet.")
        return
    st.dataframe(
        pd.DataFrame(rows).drop(columns=["cancel_requested"]),
        hide_index=True,
        key="queue_table",
        column_config={
            "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0, format="percent"),
            "created": st.column_config.DatetimeColumn("created", format="YYYY-MM-DD HH:mm:ss"),
            "duration_s": st.column_config.NumberColumn("duration (s)"),
            "job_id": st.column_config.TextColumn("job id"),
            "requested_by": st.column_config.TextColumn("requested by"),
        },
    )
    active = [r for r in rows if r["status"] in ("queued", "in_progress")]
    if not active:
        return
    left, right = st.columns([3, 1], vertical_alignment="bottom")
    # The label leaves the status out: a selectbox keeps showing the label it
    # had when chosen, and the status changes while the page is open.
    job_id = left.selectbox(
        "Queued or running job",
        [r["job_id"] for r in active],
        format_func=lambda j: f"round {next(r['round'] for r in active if r['job_id'] == j)} · job {j}",
        key="cancel_job",
    )
    if right.button("Cancel job", key="cancel", icon=":material/cancel:"):
        try:
            round_ = cancel_training(job_id, actor=actor)
        except UserError as exc:
            st.error(str(exc))
        else:
            st.toast(
                f"Job {round_.job_id[:8]}: "
                + ("cancelled" if round_.status == "cancelled" else "cancel requested, it stops after its batch")
            )
            st.rerun()


queue()


GATE_HELP = (
    "A new model goes to production automatically only when it beats production on the same test images "
    "by this margin and no category drops more than this."
)

st.subheader("Automatic retraining")
settings_column, state_column = st.columns([3, 2], gap="large")
with read_session() as session:
    saved = automation.get_automation(session=session)

with settings_column, st.form("automation"):
    t1, t2 = st.columns(2)
    new_images_enabled = t1.toggle(
        "Retrain on new images",
        value=saved.new_images_enabled,
        key="auto_new_images_enabled",
        help="Start a job when at least this many validated images arrived since the last round's snapshot.",
    )
    new_images_threshold = t1.number_input(
        "New validated images",
        *SETTING_RANGES["new_images_threshold"][1:],
        value=saved.new_images_threshold,
        step=10,
        key="auto_new_images_threshold",
    )
    schedule_enabled = t2.toggle(
        "Retrain on a schedule",
        value=saved.schedule_enabled,
        key="auto_schedule_enabled",
        help="Start a job every so many hours; the first at the next check after switching it on.",
    )
    schedule_hours = t2.number_input(
        "Every (hours)",
        *SETTING_RANGES["schedule_hours"][1:],
        value=float(saved.schedule_hours),
        step=1.0,
        key="auto_schedule_hours",
    )
    g1, g2 = st.columns(2)
    gate_min_improvement = g1.number_input(
        "Minimum test-accuracy improvement (points)",
        *SETTING_RANGES["gate_min_improvement"][1:],
        value=float(saved.gate_min_improvement),
        step=0.5,
        key="gate_min_improvement",
        help=GATE_HELP,
    )
    gate_max_category_drop = g2.number_input(
        "Maximum drop of any category (points)",
        *SETTING_RANGES["gate_max_category_drop"][1:],
        value=float(saved.gate_max_category_drop),
        step=0.5,
        key="gate_max_category_drop",
        help=GATE_HELP,
    )
    use_params = st.checkbox(
        "Automatic jobs use the parameters above",
        key="auto_use_params",
        help=f"Otherwise they keep what they use now: {automation.parameters_text(saved)}.",
    )
    save = st.form_submit_button("Save", key="auto_save", type="primary")

if save:
    changes = {
        "new_images_enabled": new_images_enabled,
        "new_images_threshold": int(new_images_threshold),
        "schedule_enabled": schedule_enabled,
        "schedule_hours": float(schedule_hours),
        "gate_min_improvement": float(gate_min_improvement),
        "gate_max_category_drop": float(gate_max_category_drop),
    }
    if use_params:
        changes["parameters"] = params
    try:
        with session_scope() as session:
            automation.update_automation(changes, session=session, actor=actor)
    except UserError as exc:
        settings_column.error(str(exc))
    else:
        settings_column.success("Automatic retraining settings saved.")


@st.fragment(run_every=30)
def automation_state() -> None:
    with read_session() as session:
        now = automation.state(session=session)
    st.markdown(
        f"**New images:** {now.new_images_text}  \n"
        f"**Schedule:** {now.schedule_text}  \n"
        f"**Last check:** {now.last_check_text}  \n"
        f"**Next check:** by {now.next_check_at:%H:%M:%S} UTC"
    )
    changed = f" Last changed by {now.settings.updated_by}." if now.settings.updated_by else ""
    st.caption(f"Automatic jobs train with {automation.parameters_text(now.settings)}; requested by `auto`.{changed}")
    if now.warning:
        st.warning(now.warning)


with state_column:
    automation_state()
