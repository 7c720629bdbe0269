"""Auto training mode: find a good recipe within the operator's time budget.

A round with `training_mode` "auto" first searches architecture x learning
rate x image size with Optuna: trials train for a few epochs on the round's
fixed training part and are scored on its fixed validation part, and
successive halving (Optuna's `SuccessiveHalvingPruner`, the asynchronous form
of Hyperband's most aggressive bracket) stops the weak ones early, so most of
the time goes to the promising ones. The search takes SEARCH_SHARE of the
budget; the winner then becomes the round's parameters (`full` mode, with as
many epochs as the rest of the budget allows) and trains, exports and
registers through the normal path (`core.training.rounds.run_training_round`), gate
and all.

The study lives in an SQLite file in the round's folder, so a worker killed
mid-search resumes it: finished trials are kept, a trial that was running is
marked failed and tried again. Every trial is recorded on the round
(`TrainingRound.trials`) as it runs.
"""

import logging
import math
import time
import warnings
from dataclasses import dataclass, field, replace

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from sqlmodel import Session

from core.config import get_settings
from core.errors import TrainingCancelled
from core.faults import crash_point, fail_point
from core.models import TrainingRound
from core.training.config import ARCHITECTURES, AUTO_IMAGE_SIZE_RANGE, TrainingConfig
from core.training.evaluation import accuracy
from core.training.loop import make_run, train_epoch
from core.training.networks import initial_model
from core.training.placement import MEMORY_FORMAT, Placement
from core.training.progress import RoundReporter, SilentReporter, round_dir
from core.training.trainers import FullTrainer, Split, load_split

log = logging.getLogger(__name__)

# The search's share of the budget; the rest trains the winner to the end.
SEARCH_SHARE = 0.6
# Of the rest, the part the winner's epochs may fill: exporting, the phone
# files' checks and scoring take the remainder.
FINAL_SHARE = 0.8
# A trial's most epochs; successive halving decides at epochs 1, 3 and 9.
TRIAL_EPOCHS = 9
# A trial's most time, as a share of the search: Optuna cannot pause a trial,
# so the first ones (promoted while they have no rivals yet) would otherwise
# take a short budget's whole search.
TRIAL_SHARE = 1 / 6
REDUCTION_FACTOR = 3
# Learning rates tried (log scale). From scratch on small pictures 0.003 beat
# 0.001 clearly (issue 14); 0.0003-0.01 brackets both.
LEARNING_RATES = (3e-4, 1e-2)
# Tried first, one per architecture, so that even a short budget compares them.
START_LEARNING_RATE = 3e-3
STUDY_FILE = "search.db"
STUDY_NAME = "auto"

# Optuna's states, in the words of the trials table.
STATES = {
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
    TrialState.COMPLETE: "kept",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
}


def image_sizes(chosen: int, explicit: bool) -> list[int]:
    """The image sizes the search tries: the one given, or (from "auto") the
    pictures' own size and its neighbours a multiple of 32 away, within
    AUTO_IMAGE_SIZE_RANGE."""
    if explicit:
        return [chosen]
    low, high = AUTO_IMAGE_SIZE_RANGE
    return sorted({min(high, max(low, chosen + step)) for step in (-32, 0, 32)})


@dataclass
class Search:
    """One round's search: its data, clock and bookkeeping."""

    round: TrainingRound
    reporter: RoundReporter
    session: Session
    base: TrainingConfig
    sizes: list[int]
    budget_s: float
    data: dict[int, Split] = field(default_factory=dict)

    @property
    def search_s(self) -> float:
        return SEARCH_SHARE * self.budget_s

    def split(self, size: int) -> Split:
        if size not in self.data:
            config = replace(self.base, image_size=size)
            self.data[size] = load_split(
                self.round, config, list(self.round.classes), SilentReporter(self.round), session=self.session
            )
        return self.data[size]

    def record(self, study: optuna.Study, running: tuple[int, float] | None = None) -> None:
        """The trials table on the round, and the budget spent as its progress."""
        rows = trial_rows(study.get_trials(deepcopy=False), running)
        self.round.trials = rows
        self.round.progress = min(1.0, spent(rows) / self.budget_s)
        self.session.add(self.round)
        self.session.commit()


def spent(rows: list[dict]) -> float:
    """Seconds of the budget the trials used (not the time a dead worker lay idle)."""
    return sum(row["seconds"] or 0.0 for row in rows)


def room_for_a_trial(rows: list[dict], search_s: float) -> bool:
    """Whether the search has time left for another trial's first epoch, at
    the quickest pace seen so far: a trial stops only between epochs, so one
    started in the last seconds would overrun the search by a whole epoch."""
    paces = [p for p in map(pace, rows) if p]
    return spent(rows) + min(paces, default=0.0) < search_s


def pace(row: dict) -> float | None:
    """A trial's seconds per epoch, leaving out decoding the pictures (once
    per image size, then cached for every later trial and the final round)."""
    if not row["epochs"] or not row["seconds"]:
        return None
    return max(0.0, row["seconds"] - row.get("load_seconds", 0.0)) / row["epochs"]


def trial_rows(trials: list[FrozenTrial], running: tuple[int, float] | None = None) -> list[dict]:
    """One row per trial for the round: `running` is (number, seconds so far)
    of the trial in progress."""
    retried = {t.user_attrs["retry_of"]: t.number for t in trials if "retry_of" in t.user_attrs}
    rows = []
    for t in trials:
        if t.state == TrialState.WAITING:
            continue
        epochs = len(t.intermediate_values)
        note = t.user_attrs.get("note", "")
        if t.state == TrialState.FAIL and not note and t.number in retried:
            note = f"interrupted (worker lost); tried again as trial {retried[t.number]}"
        seconds = t.user_attrs.get("seconds")
        if running is not None and running[0] == t.number:
            seconds = running[1]
        rows.append(
            {
                "number": t.number,
                "architecture": t.params.get("architecture"),
                "learning_rate": t.params.get("learning_rate"),
                "image_size": t.params.get("image_size"),
                "epochs": epochs,
                "val_accuracy": round(max(t.intermediate_values.values()), 2) if epochs else None,
                "val_images": t.user_attrs.get("val_images"),
                "state": STATES[t.state],
                "seconds": round(seconds, 1) if seconds is not None else None,
                "load_seconds": round(t.user_attrs.get("load_seconds", 0.0), 1),
                "started_at": t.datetime_start.isoformat() if t.datetime_start else None,
                "note": note,
                "chosen": False,
            }
        )
    return rows


def open_study(path, seed: int) -> optuna.Study:
    """The round's study, created or (after a lost worker) loaded again."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # `multivariate` is stable in use since Optuna 2.2 but still flagged experimental.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna.create_study(
        storage=f"sqlite:///{path}",
        study_name=STUDY_NAME,
        direction="maximize",
        load_if_exists=True,
        # TPE's default is 10 random trials before it models anything, about
        # all a 10-minute budget holds on 2 cores (a glyph search spent 4 of its
        # 10 trials on efficientnet_b0, the clear loser of the first three):
        # the one-per-architecture starts are the random phase here.
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=len(ARCHITECTURES), multivariate=True),
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=REDUCTION_FACTOR),
    )


def search(round_: TrainingRound, reporter: RoundReporter, *, session: Session) -> None:
    """Run (or resume) the round's search, then make the winner its
    parameters (`full` mode) and say on the round what was chosen and why.

    Cancel stops it at the next batch (TrainingCancelled, the normal cancel
    path); "stop and keep the best" ends the search early and trains the best
    so far. A trial that raises is recorded as failed; RuntimeError when all
    of them did."""
    asked = TrainingConfig(**round_.parameters)
    explicit = isinstance(round_.requested_parameters.get("image_size"), int)
    run = Search(
        round_,
        reporter,
        session,
        replace(asked, training_mode="full", budget_minutes=None),
        image_sizes(asked.image_size, explicit),
        asked.budget_minutes * 60,
    )
    torch.set_num_threads(Placement.local().threads(get_settings().training_threads))
    reporter.phase("searching")
    folder = round_dir(round_)
    folder.mkdir(parents=True, exist_ok=True)
    study = open_study(folder / STUDY_FILE, asked.seed)
    _resume_or_start(study, run)
    run.record(study)
    stopped = False
    while not stopped and room_for_a_trial(run.round.trials, run.search_s):
        stopped = _run_trial(study, run)
    winner = choose(run.round.trials, left_s(run))
    _adopt(winner, run, stopped)


def _resume_or_start(study: optuna.Study, run: Search) -> None:
    """In a resumed study, fail the trial a lost worker was running and queue
    it again (it runs next)."""
    trials = study.get_trials(deepcopy=False)
    if not trials:
        return
    lost = [trial for trial in trials if trial.state == TrialState.RUNNING]
    for trial in lost:
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    done = sum(trial.state.is_finished() for trial in trials)
    again = f"; trial {', '.join(str(t.number) for t in lost)} was running and is tried again" if lost else ""
    run.reporter.note(f"Auto: resumed the search, keeping the {done} trial(s) that had finished{again}")


def _queue_next_start(study: optuna.Study, run: Search) -> None:
    """Until each architecture has had a trial, queue the next one at
    START_LEARNING_RATE and the pictures' size, so that even a short budget
    compares them. One at a time, after any trial queued again on a resume."""
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return
    tried = {t.params.get("architecture") for t in trials}
    for architecture in ARCHITECTURES:
        if architecture not in tried:
            size = run.round.parameters["image_size"]
            study.enqueue_trial(
                {"architecture": architecture, "learning_rate": START_LEARNING_RATE, "image_size": size}
            )
            return


def _run_trial(study: optuna.Study, run: Search) -> bool:
    """One trial; True when the operator asked to stop (end the search)."""
    _queue_next_start(study, run)
    trial = study.ask()
    started = time.perf_counter()
    try:
        params = {
            "architecture": trial.suggest_categorical("architecture", list(ARCHITECTURES)),
            "learning_rate": trial.suggest_float("learning_rate", *LEARNING_RATES, log=True),
            "image_size": trial.suggest_categorical("image_size", run.sizes),
        }
        value, stopped, note = _train_trial(study, trial, run, params, started)
    except optuna.TrialPruned:
        trial.set_user_attr("seconds", time.perf_counter() - started)
        study.tell(trial, state=TrialState.PRUNED)
        run.record(study)
        return False
    except TrainingCancelled:
        trial.set_user_attr("seconds", time.perf_counter() - started)
        trial.set_user_attr("note", "cancelled")
        study.tell(trial, state=TrialState.FAIL)
        run.record(study)
        raise
    except Exception as exc:  # one bad trial must not lose the search
        log.exception("round %s: auto trial %s failed", run.round.id, trial.number)
        run.session.rollback()
        trial.set_user_attr("seconds", time.perf_counter() - started)
        trial.set_user_attr("note", f"{type(exc).__name__}: {exc}"[:500])
        study.tell(trial, state=TrialState.FAIL)
        run.record(study)
        return False
    trial.set_user_attr("seconds", time.perf_counter() - started)
    if note:
        trial.set_user_attr("note", note)
    if value is None:  # stopped before its first epoch ended
        trial.set_user_attr("note", "stopped on request before its first epoch ended")
        study.tell(trial, state=TrialState.FAIL)
    else:
        study.tell(trial, value)
    run.record(study)
    return stopped


class TrialReporter(SilentReporter):
    """A trial's reporter in the epoch loop: it writes nothing (the round's
    progress is the search's budget spent, written by `Search.record`) and
    hears the search's cancel and stop requests."""

    def __init__(self, search: RoundReporter):
        super().__init__(search.round)
        self.search = search

    def requests(self, max_age: float = 0.0) -> tuple[bool, bool]:
        return self.search.requests(max_age)


def _train_trial(
    study: optuna.Study, trial: optuna.Trial, run: Search, params: dict, started: float
) -> tuple[float | None, bool, str]:
    """Train one trial epoch by epoch with the epoch loop's `train_epoch`,
    reporting each epoch's validation accuracy to the pruner. Returns (best
    accuracy or None, stop asked, note); a cancel raises TrainingCancelled."""
    config = replace(run.base, **params, epochs=TRIAL_EPOCHS)
    data = run.split(config.image_size)
    # Decoding the pictures happens once per size: not part of the trial's pace.
    trial.set_user_attr("load_seconds", time.perf_counter() - started)
    # The n behind the trial's accuracy: every trial is scored on the same validation part.
    trial.set_user_attr("val_images", len(data.y_val))
    classes = list(run.round.classes)
    placement = Placement.local()
    trainer = FullTrainer(config, classes, data, placement)
    torch.manual_seed(config.seed + trial.number)
    # Like the final training's start, but never downloading: a trial takes
    # ImageNet weights only when they are on disk already.
    model = initial_model(config, classes, SilentReporter(run.round), session=run.session, download=False)
    trainer.model = trainer.trainable = model.to(placement.device, memory_format=MEMORY_FORMAT)
    # The same pieces and epoch loop as the final training, over the trial's epochs.
    epochs = make_run(run.round.id, config, classes, data, trainer, placement, TrialReporter(run.reporter), None)
    best = None
    run.record(study, (trial.number, time.perf_counter() - started))  # on the live table from its start
    for epoch in range(1, TRIAL_EPOCHS + 1):
        crash_point(f"auto_trial{trial.number}_epoch{epoch}")  # CRASH_AT, for the resume test
        fail_point(f"auto_trial{trial.number}")  # FAIL_AT, for the failing-trial test
        if train_epoch(epochs, epoch, can_stop=True) is None:
            return best, True, "the search was stopped on request"
        trainer.end_epoch()
        value = accuracy(trainer.validate()[1], data.y_val)
        best = value if best is None else max(best, value)
        trial.report(value, epoch)
        trial.set_user_attr("seconds", time.perf_counter() - started)
        run.record(study, (trial.number, time.perf_counter() - started))
        if trial.should_prune():
            raise optuna.TrialPruned()
        if epoch < TRIAL_EPOCHS and spent(run.round.trials) >= run.search_s:
            return best, False, f"ended by the search budget after {epoch} epoch(s)"
        if epoch < TRIAL_EPOCHS and time.perf_counter() - started >= TRIAL_SHARE * run.search_s:
            return best, False, f"ended by its share of the search time after {epoch} epoch(s)"
    return best, False, ""


def choose(rows: list[dict], left_s: float) -> dict:
    """The trial to train to the end in the `left_s` seconds of the budget
    left: the best validation accuracy, and of equals the one trained longest
    (its figure is the surer), among the trials that the time left trains
    for more epochs than their trial ran. Training the winner to the end must
    add epochs: a slow architecture that led after one epoch would otherwise
    be trained that one epoch again (a search on scanned text chose resnet18
    at 96 px, 34 % after one 2-minute epoch, over mobilenet_v3_small's 31 %
    after five, and the time left trained resnet18 one epoch: 28 % on
    held-out pictures, where mobilenet_v3_small reaches 63 %). When no trial
    can get more (a search stopped on request, a budget spent), the best of
    all. RuntimeError when no trial reached one validated epoch."""
    scored = [row for row in rows if row["val_accuracy"] is not None and row["state"] != "running"]
    if not scored:
        errors = "; ".join(f"trial {row['number']}: {row['note']}" for row in rows if row["note"])
        raise RuntimeError(f"Auto: every trial of the search failed ({errors or 'no trial ran'})")
    growing = [row for row in scored if final_epochs(row, left_s) > row["epochs"]]
    return max(growing or scored, key=lambda row: (row["val_accuracy"], row["epochs"], -row["number"]))


def final_epochs(winner: dict, left_s: float) -> int:
    """As many epochs as FINAL_SHARE of the budget left allows at the
    winner's own pace (at least its trial's, at least one)."""
    per_epoch = pace(winner) or 1.0
    return max(1, winner["epochs"], min(500, math.floor(FINAL_SHARE * left_s / per_epoch)))


def left_s(run: Search) -> float:
    """Seconds of the budget the search left."""
    return max(0.0, run.budget_s - spent(run.round.trials))


def _adopt(winner: dict, run: Search, stopped: bool) -> None:
    rows = run.round.trials
    left = left_s(run)
    epochs = final_epochs(winner, left)
    config = replace(
        run.base,
        architecture=winner["architecture"],
        learning_rate=winner["learning_rate"],
        image_size=winner["image_size"],
        epochs=epochs,
    )
    counts = {state: sum(row["state"] == state for row in rows) for state in ("kept", "pruned", "failed")}
    best = max((row["val_accuracy"] for row in rows if row["val_accuracy"] is not None), default=None)
    among = " of the trials the time left trains further" if best != winner["val_accuracy"] else ""
    why = (
        f"Auto: chose {config.architecture}, learning rate {config.learning_rate:.2g}, {config.image_size} px "
        f"(trial {winner['number']}): the best validation accuracy{among}, {winner['val_accuracy']:.1f}% of "
        f"{winner.get('val_images') or 'an unknown number of'} validation images after "
        f"{winner['epochs']} epoch(s), of {len(rows)} trials ({counts['kept']} kept, {counts['pruned']} pruned "
        f"by successive halving, {counts['failed']} failed) in {spent(rows) / 60:.1f} of "
        f"{run.search_s / 60:.1f} search minutes{' (stopped on request)' if stopped else ''}; it trains "
        f"{epochs} epochs in the {left / 60:.1f} minutes left of the {run.budget_s / 60:g}-minute budget."
    )
    run.round.trials = [{**row, "chosen": row["number"] == winner["number"]} for row in rows]
    run.round.parameters = config.to_dict()
    run.round.progress = 0.0
    run.reporter.note(why, warning=True)
