"""Train (operators): parameters, the preflight check, the queue, automatic retraining."""

import pandas as pd
import streamlit as st

from core import automation, round_views
from core.access import Permission
from core.automation import SETTING_RANGES
from core.db import read_session, session_scope
from core.errors import UserError
from core.models import RoundStatus
from core.training import preflight as training_checks
from core.training.config import (
    ARCHITECTURES,
    AUTO,
    AUTO_BUDGET_MINUTES,
    FEDERATED,
    FEDERATED_DEFAULTS,
    FEDERATED_LEARNING_RATE,
    TrainingConfig,
    asked_parameters,
    last_parameters,
    param_problems,
    param_range,
)
from core.training.rounds import get_round, list_rounds
from jobs import cancel_training, submit_training
from pages._common import frame_of, md, require_page

actor = require_page(Permission.train)

# The form's labels, by parameter (the widget keys are the parameter names);
# problems name the fields by these.
LABELS = {
    "epochs": "Epochs",
    "batch_size": "Batch size",
    "learning_rate": "Learning rate",
    "use_existing_model": "Use existing model",
    "architecture": "Architecture",
    "image_size": "Image size (px)",
    "val_split": "Validation split",
    "seed": "Seed",
    "training_mode": "Training mode",
    "processes": "Processes",
    "budget_minutes": "Time budget (minutes)",
    "rounds": "Federated rounds",
    "local_epochs": "Local epochs on each phone",
    "min_clients": "Phones per round",
    "deadline_minutes": "Deadline per round (minutes)",
    "fedprox_mu": "FedProx mu",
}
# What each federated field means (docs/federated.md).
FEDERATED_HELP = {
    "rounds": "Plans published one after the other, each starting from the last average.",
    "local_epochs": "Passes each phone makes over its own pictures before it sends its update.",
    "min_clients": "The round averages as soon as this many phones have sent an accepted update.",
    "deadline_minutes": "A round with fewer phones by then fails, and nothing is registered.",
    "fedprox_mu": "0: plain FedAvg. Above 0, FedProx's proximal term keeps each phone near the published "
    "head, which helps when phones hold very different pictures.",
}
# Auto first: the recommended choice for operators who do not know which
# learning rate or architecture suits their pictures.
MODES = {
    AUTO: "Auto (recommended): finds the architecture, learning rate and image size within a time budget",
    "full": "Full: train every layer with the parameters below",
    "head": "Head: train only the classifier on a frozen pretrained backbone (a quick retrain)",
    FEDERATED: "Federated: phones fine-tune the production model's classifier on their own pictures, "
    "which never leave them",
}


def load_parameters(parameters: dict) -> None:
    """Put `parameters` into the form (a callback: widgets take state before they are drawn)."""
    for name in LABELS:
        if parameters.get(name) is not None:
            # An empty image size is "auto" (the widget holds numbers only).
            st.session_state[name] = None if name == "image_size" and parameters[name] == AUTO else parameters[name]


# The form starts from the operator's last job (Streamlit forgets widgets on
# another page); widgets take their values from the session state only, so
# the fields have no limits of their own: what is typed is what gets checked.
with read_session() as session:
    remembered = last_parameters(actor.name, session=session) or {}
# Someone who never trained starts from Auto mode.
fresh = {
    **TrainingConfig().to_dict(),
    **FEDERATED_DEFAULTS,
    "training_mode": AUTO,
    "budget_minutes": AUTO_BUDGET_MINUTES,
}
# A manual round has no budget: the default stays for a switch to Auto.
for name, value in {**fresh, **{k: v for k, v in remembered.items() if v is not None}}.items():
    if name in LABELS:
        # An empty image size is "auto" (the widget holds numbers only).
        st.session_state.setdefault(name, None if name == "image_size" and value == AUTO else value)

st.title("Train")
form, check = st.columns([3, 2], gap="large")


def mode_changed() -> None:
    """The learning rate follows the mode while it holds the other mode's
    default: the phones' plain SGD needs a larger one than AdamW."""
    central, phones = TrainingConfig().learning_rate, FEDERATED_LEARNING_RATE
    rate = st.session_state.get("learning_rate")
    if st.session_state["training_mode"] == FEDERATED and rate == central:
        st.session_state["learning_rate"] = phones
    elif st.session_state["training_mode"] != FEDERATED and rate == phones:
        st.session_state["learning_rate"] = central


with form:
    st.subheader("Parameters")
    training_mode = st.radio(
        LABELS["training_mode"], list(MODES), format_func=MODES.get, key="training_mode", on_change=mode_changed
    )
    budget_minutes = None
    if training_mode == AUTO:
        budget_minutes = st.number_input(
            LABELS["budget_minutes"],
            value=None,
            step=1.0,
            key="budget_minutes",
            help="The search (architectures x learning rates x image sizes, weak trials stopped early) takes 60% "
            "of it, training the best to the end the rest; exporting and scoring come on top. "
            f"Between {param_range('budget_minutes')[1]:g} and {param_range('budget_minutes')[2]:g}.",
        )
        st.caption(
            "Auto chooses the architecture, learning rate, image size and epochs; the batch size, validation "
            "split, seed and use of the existing model below still apply. Live metrics shows every trial."
        )
    federated = {}
    if training_mode == FEDERATED:
        st.caption(
            "Builds on the production model (its architecture and categories). Each round publishes a plan; "
            "phones with a device token train its head on their own pictures with the learning rate "
            f"(plain SGD: {FEDERATED_LEARNING_RATE:g} by default) and batch size below and send back only the "
            "head's change (docs/federated.md)."
        )
        f1, f2 = st.columns(2)
        for column, name in zip((f1, f2, f1, f2, f1), FEDERATED_DEFAULTS, strict=True):
            kind = param_range(name)[0]
            federated[name] = column.number_input(
                LABELS[name],
                value=None,
                step=0.1 if kind is float else 1,
                key=name,
                help=f"{FEDERATED_HELP[name]} Between {param_range(name)[1]:g} and {param_range(name)[2]:g}.",
            )
    manual = st.expander("Manual parameters", expanded=training_mode != AUTO)
    c1, c2 = manual.columns(2)
    epochs = c1.number_input(LABELS["epochs"], value=None, step=1, key="epochs")
    batch_size = c2.number_input(LABELS["batch_size"], value=None, step=1, key="batch_size")
    learning_rate = c1.number_input(
        LABELS["learning_rate"], value=None, step=0.0001, format="%.6f", key="learning_rate"
    )
    use_existing = c2.toggle(
        LABELS["use_existing_model"],
        key="use_existing_model",
        help="Fine-tune the production model when it knows the same categories and has the same architecture.",
    )
    with manual:
        a1, a2 = st.columns(2)
        architecture = a1.selectbox(LABELS["architecture"], ARCHITECTURES, key="architecture")
        image_size = a2.number_input(
            LABELS["image_size"],
            value=None,
            step=32,
            placeholder="auto",
            key="image_size",
            help="Empty: auto, the validated images' median short side rounded to a multiple of 32 (32 to 224); "
            "the preflight says what it picks.",
        )
        val_split = a1.number_input(LABELS["val_split"], value=None, step=0.05, key="val_split")
        seed = a2.number_input(LABELS["seed"], value=None, step=1, key="seed")
        processes = a1.number_input(
            LABELS["processes"],
            value=None,
            step=1,
            key="processes",
            help="Train the job in this many processes together (PyTorch DDP): gloo on the CPU, NCCL on GPUs, "
            f"where each process needs its own GPU. At most {param_range('processes')[2]:g} here "
            "(MAX_TRAINING_PROCESSES). Full mode only.",
        )

params = {
    "epochs": epochs,
    "batch_size": batch_size,
    "learning_rate": learning_rate,
    "use_existing_model": use_existing,
    "architecture": architecture,
    "image_size": AUTO if image_size is None else image_size,
    "val_split": val_split,
    "seed": seed,
    "training_mode": training_mode,
    "processes": processes,
}
if training_mode == AUTO:
    params["budget_minutes"] = budget_minutes
params.update(federated)
field_problems = list(param_problems(params, LABELS).values())

with check:
    st.subheader("Preflight")
    with read_session() as session:
        preflight = training_checks.preflight(
            None if field_problems else TrainingConfig.from_params(params), session=session
        )
    problems = field_problems + preflight.problems
    st.metric("Validated images", preflight.total, border=True)
    if preflight.per_category:
        st.dataframe(
            pd.DataFrame(
                {"category": list(preflight.per_category), "validated": list(preflight.per_category.values())}
            ),
            hide_index=True,
            key="preflight_table",
        )
    for problem in problems:
        st.error(md(problem), icon=":material/block:")
    for notice in preflight.notices:
        st.info(md(notice))
    if not problems:
        st.success("The parameters and the dataset meet the rules: training can start.", icon=":material/check_circle:")

with form:
    clicked = st.button(
        "Train",
        key="train",
        type="primary",
        icon=":material/play_arrow:",
        disabled=bool(problems),
        help=" ".join(problems) or None,
    )
    if clicked:
        try:
            round_ = submit_training(params, actor=actor)
        except UserError as exc:
            st.error(md(exc))
        else:
            st.session_state["last_job_id"] = round_.job_id
            # Again from the top, so the sidebar's queue shows the new job too.
            st.rerun()
    if job_id := st.session_state.get("last_job_id"):
        with read_session() as session:
            asked = get_round(job_id, session=session)
        shown = {True: "yes", False: "no"}
        queued_with = ", ".join(
            f"{LABELS[k].lower()} {shown.get(v, v) if isinstance(v, bool) else v}"
            for k, v in asked.parameters.items()
            if k in LABELS and v is not None  # no time budget outside Auto mode
        )
        state = asked.status.value.replace("_", " ")
        banner = st.error if asked.status == RoundStatus.failed else st.success
        banner(
            f"Round {asked.id} (job `{job_id[:8]}`) is **{state}**; queued with {queued_with}. "
            "Follow it below or on **Live metrics**.",
            icon=":material/info:",
        )
    with read_session() as session:
        earlier = {r.id: (r.status.value.replace("_", " "), asked_parameters(r)) for r in list_rounds(session=session)}
    if earlier:
        again_from, again = st.columns([3, 1], vertical_alignment="bottom")
        chosen = again_from.selectbox(
            "Parameters of an earlier round",
            list(earlier),
            format_func=lambda i: f"round {i} · {earlier[i][0]}",
            key="again_round",
        )
        again.button(
            "Train again with these parameters",
            key="train_again",
            icon=":material/replay:",
            on_click=load_parameters,
            args=(earlier[chosen][1],),
            help="Fills the form with that round's parameters; check them, then click Train.",
        )


@st.fragment(run_every=3)
def queue() -> None:
    st.subheader("Queue")
    with read_session() as session:
        rows = round_views.queue_overview(session=session)
    if not rows:
        st.caption("No training jobs yet.")
        return
    st.dataframe(
        frame_of(rows).drop(columns=["cancel_requested"]),
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
    left, stop_column, cancel_column = st.columns([3, 2, 1], vertical_alignment="bottom")
    # The label leaves the status out: a selectbox keeps showing the label it
    # had when chosen, and the status changes while the page is open.
    job_id = left.selectbox(
        "Queued or running job",
        [r["job_id"] for r in active],
        format_func=lambda j: f"round {next(r['round'] for r in active if r['job_id'] == j)} · job {j}",
        key="cancel_job",
    )
    stop = stop_column.button(
        "Stop and keep the best so far",
        key="stop",
        icon=":material/stop_circle:",
        help="Training ends after its current batch; its best epoch so far is exported and registered as a "
        "version, through the promotion gate. A queued job has nothing to keep and is cancelled.",
    )
    if cancel_column.button("Cancel job", key="cancel", icon=":material/cancel:") or stop:
        try:
            round_ = cancel_training(job_id, actor=actor, keep_best=stop)
        except UserError as exc:
            st.error(md(exc))
        else:
            if round_.status == RoundStatus.cancelled:
                done = "cancelled"
            elif round_.stop_requested:
                done = "stop requested: it stops after its batch and registers its best epoch so far"
            else:
                done = "cancel requested, it stops after its batch"
            st.toast(f"Job {round_.job_id[:8]}: {done}")
            st.rerun()


queue()


GATE_HELP = (
    "A new model goes to production automatically only when it beats production on at least this many "
    "shared test images, significantly (exact McNemar test) and by this margin, and no category with 20 or "
    "more test images drops more than this. The first model needs to beat always answering the commonest category."
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
    g1, g2, g3 = st.columns(3)
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
    gate_min_test_images = g3.number_input(
        "Minimum shared test images",
        *SETTING_RANGES["gate_min_test_images"][1:],
        value=int(saved.gate_min_test_images),
        step=10,
        key="gate_min_test_images",
        help=GATE_HELP,
    )
    use_params = st.checkbox(
        "Automatic jobs use the parameters above",
        key="auto_use_params",
        help=f"Otherwise they keep what they use now: {automation.parameters_text(saved)}.",
    )
    save = st.form_submit_button("Save", key="auto_save", type="primary")

if save and use_params and field_problems:
    settings_column.error("Fix the parameters above first: " + " ".join(field_problems))
elif save:
    changes = {
        "new_images_enabled": new_images_enabled,
        "new_images_threshold": int(new_images_threshold),
        "schedule_enabled": schedule_enabled,
        "schedule_hours": float(schedule_hours),
        "gate_min_improvement": float(gate_min_improvement),
        "gate_max_category_drop": float(gate_max_category_drop),
        "gate_min_test_images": int(gate_min_test_images),
    }
    if use_params:
        changes["parameters"] = params
    try:
        with session_scope() as session:
            automation.update_automation(changes, session=session, actor=actor)
    except UserError as exc:
        settings_column.error(md(exc))
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
    changed = f" Last changed by {md(now.settings.updated_by)}." if now.settings.updated_by else ""
    st.caption(f"Automatic jobs train with {automation.parameters_text(now.settings)}; requested by `auto`.{changed}")
    if now.warning:
        st.warning(now.warning)


with state_column:
    automation_state()
