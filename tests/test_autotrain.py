"""Auto training mode (core/autotrain.py): the search within a time budget,
through a real consumer process: trials recorded, one version, cancel,
resume after a kill, a failing trial."""

import signal
import subprocess
import sys
import time

import pytest

from core import autotrain, training
from core.db import read_session
from core.errors import UserError
from core.models import ModelVersion, RoundStatus, TrainingRound
from core.training import TrainingConfig
from jobs import cancel_training, submit_training
from tests.conftest import ROOT, wait_for
from tests.factories import add_demo, as_actor
from tests.test_reliability import FAST_RECOVERY, fast_recovery, model_files  # noqa: F401 (a fixture)

# A budget of seconds: a search of a few one-epoch trials on 32-px pictures.
TINY = {"training_mode": "auto", "budget_minutes": 0.25, "batch_size": 8}


def get_round(round_id: int) -> TrainingRound:
    with read_session() as session:
        return session.get(TrainingRound, round_id)


def versions() -> list[str]:
    with read_session() as session:
        return [v.version for v in session.query(ModelVersion).all()]


def finished(round_id: int) -> TrainingRound | None:
    round_ = get_round(round_id)
    return round_ if round_.status in (RoundStatus.completed, RoundStatus.failed, RoundStatus.cancelled) else None


# --- the parameters -------------------------------------------------------------


def test_auto_mode_takes_a_budget_in_minutes_and_names_the_range_when_it_is_wrong():
    assert TrainingConfig.from_params({"training_mode": "auto"}).budget_minutes == training.AUTO_BUDGET_MINUTES
    assert TrainingConfig.from_params({"training_mode": "auto", "budget_minutes": 0.5}).budget_minutes == 0.5
    with pytest.raises(UserError, match=r"budget_minutes must be between 0.1 and 1440 \(got 0\)"):
        TrainingConfig.from_params({"training_mode": "auto", "budget_minutes": 0})
    with pytest.raises(UserError, match="budget_minutes applies to training_mode 'auto' only"):
        TrainingConfig.from_params({"budget_minutes": 5})


def test_the_cli_queues_an_auto_round_and_refuses_a_bad_budget(data_dir, session):
    add_demo(session, per_category=10, size=32)
    cli = [sys.executable, "-m", "core", "train", "--training-mode", "auto"]
    wrong = subprocess.run([*cli, "--budget-minutes", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert wrong.returncode != 0 and "budget_minutes must be between 0.1 and 1440" in wrong.stderr
    done = subprocess.run([*cli, "--budget-minutes", "2.5"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with read_session() as reader:
        job = reader.query(TrainingRound).one()
    assert (job.parameters["training_mode"], job.parameters["budget_minutes"]) == ("auto", 2.5)


def test_the_search_tries_the_pictures_size_and_its_neighbours_unless_one_was_given():
    assert autotrain.image_sizes(64, explicit=False) == [32, 64, 96]
    assert autotrain.image_sizes(32, explicit=False) == [32, 64]
    assert autotrain.image_sizes(224, explicit=False) == [192, 224]
    assert autotrain.image_sizes(96, explicit=True) == [96]


def row(number, accuracy, epochs, state="kept", note=""):
    return {"number": number, "val_accuracy": accuracy, "epochs": epochs, "state": state, "note": note, "seconds": 2.0}


def test_the_winner_is_the_best_validation_accuracy_and_of_equals_the_longest_trained():
    rows = [row(0, 80.0, 1, "pruned"), row(1, 90.0, 1), row(2, 90.0, 3), row(3, None, 0, "failed", "boom")]
    assert autotrain.choose(rows)["number"] == 2
    assert autotrain.choose([*rows, row(4, 99.0, 2, "running")])["number"] == 2  # not while it runs
    with pytest.raises(RuntimeError, match="every trial of the search failed .*trial 3: boom"):
        autotrain.choose([row(3, None, 0, "failed", "boom")])


def test_the_winner_trains_as_many_epochs_as_the_budget_left_allows():
    winner = {"seconds": 10.0, "epochs": 2}  # 5 s an epoch
    assert autotrain.final_epochs(winner, 100.0) == 16  # 80 % of 100 s
    assert autotrain.final_epochs(winner, 0.0) == 2  # never fewer than its trial ran


def test_train_again_offers_what_the_operator_chose_not_what_auto_resolved(data_dir, session):
    add_demo(session, per_category=10, size=32)
    round_ = training.start_training(TINY, session=session, requested_by="grace")
    assert round_.parameters["image_size"] == 32
    remembered = training.last_parameters("grace", session=session)
    assert remembered["image_size"] == "auto" and remembered["training_mode"] == "auto"
    assert remembered["budget_minutes"] == TINY["budget_minutes"]
