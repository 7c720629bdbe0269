"""Auto training mode (core/training/auto.py): the search within a time budget,
through a real consumer process: trials recorded, one version, cancel,
resume after a kill, a failing trial."""

import signal
import subprocess
import sys
import time

import pytest

from core import round_views
from core.db import read_session
from core.errors import UserError
from core.models import ModelVersion, RoundStatus, TrainingRound
from core.training import auto as autotrain
from core.training.config import AUTO_BUDGET_MINUTES, TrainingConfig, last_parameters
from core.training.rounds import start_training
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
    assert TrainingConfig.from_params({"training_mode": "auto"}).budget_minutes == AUTO_BUDGET_MINUTES
    assert TrainingConfig.from_params({"training_mode": "auto", "budget_minutes": 0.5}).budget_minutes == 0.5
    with pytest.raises(UserError, match=r"budget_minutes must be between 0.1 and 1,440 \(got 0\)"):
        TrainingConfig.from_params({"training_mode": "auto", "budget_minutes": 0})
    with pytest.raises(UserError, match="A time budget applies to training mode auto only"):
        TrainingConfig.from_params({"budget_minutes": 5})


def test_the_cli_queues_an_auto_round_and_refuses_a_bad_budget(data_dir, session):
    add_demo(session, per_category=10, size=32)
    cli = [sys.executable, "-m", "core", "train", "--training-mode", "auto"]
    wrong = subprocess.run([*cli, "--budget-minutes", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert wrong.returncode != 0 and "budget_minutes must be between 0.1 and 1,440" in wrong.stderr
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
    assert autotrain.choose(rows, 100.0)["number"] == 2
    assert autotrain.choose([*rows, row(4, 99.0, 2, "running")], 100.0)["number"] == 2  # not while it runs
    with pytest.raises(RuntimeError, match="every trial of the search failed .*trial 3: boom"):
        autotrain.choose([row(3, None, 0, "failed", "boom")], 100.0)


def test_the_winner_is_one_the_time_left_trains_further_than_its_trial():
    # A slow architecture ahead after its one epoch (60 s), a quick one after five (10 s each).
    slow = {**row(0, 34.0, 1), "seconds": 60.0}
    quick = {**row(1, 31.0, 5), "seconds": 50.0}
    # 100 s left: 80 s trains the slow one one epoch again, the quick one eight.
    assert autotrain.choose([slow, quick], 100.0)["number"] == 1
    # 300 s left: the slow one gets four epochs, more than its trial's one.
    assert autotrain.choose([slow, quick], 300.0)["number"] == 0
    # Nothing left (a search stopped on request): the best of all.
    assert autotrain.choose([slow, quick], 0.0)["number"] == 0


def test_no_trial_starts_without_time_for_one_epoch_at_the_quickest_pace_seen():
    rows = [row(0, 50.0, 2)]  # 2 s spent, 1 s an epoch
    assert autotrain.room_for_a_trial(rows, 3.5) and not autotrain.room_for_a_trial(rows, 2.9)
    assert autotrain.room_for_a_trial([], 0.1)


def test_the_winner_trains_as_many_epochs_as_the_budget_left_allows():
    winner = {"seconds": 14.0, "load_seconds": 4.0, "epochs": 2}  # 5 s an epoch once the pictures are decoded
    assert autotrain.final_epochs(winner, 100.0) == 16  # 80 % of 100 s
    assert autotrain.final_epochs(winner, 0.0) == 2  # never fewer than its trial ran


def test_train_again_offers_what_the_operator_chose_not_what_auto_resolved(data_dir, session):
    add_demo(session, per_category=10, size=32)
    round_ = start_training(TINY, session=session, requested_by="grace")
    assert round_.parameters["image_size"] == 32
    remembered = last_parameters("grace", session=session)
    assert remembered["image_size"] == "auto" and remembered["training_mode"] == "auto"
    assert remembered["budget_minutes"] == TINY["budget_minutes"]


# --- through a real consumer ----------------------------------------------------------


def test_an_auto_round_searches_records_its_trials_and_makes_one_version_despite_a_failing_trial(
    data_dir, session, worker_factory, ptl_only
):
    from fastapi.testclient import TestClient

    from api.app import app
    from tests.factories import add_token

    add_demo(session, per_category=10, size=32)
    round_ = submit_training(TINY, actor=as_actor("grace"))
    worker_factory(FAIL_AT="auto_trial0")  # the first trial raises
    done = wait_for(lambda: finished(round_.id), timeout=300, message="the auto round to finish")
    assert done.status == RoundStatus.completed, done.error
    assert versions() == ["1.0.0"] and model_files(data_dir) == ["model_1.0.0.ptl"]
    trials = {row["number"]: row for row in done.trials}
    assert len(trials) >= 2 and [trials[n]["architecture"] for n in (0, 1)] == ["mobilenet_v3_small", "resnet18"]
    assert trials[0]["state"] == "failed" and "failure injected at auto_trial0" in trials[0]["note"]
    [chosen] = [row for row in done.trials if row["chosen"]]
    assert chosen["state"] in ("kept", "pruned") and chosen["epochs"] >= 1 and chosen["val_accuracy"] is not None
    # The live table gives each trial's accuracy its n (the round's validation part) and 95 % interval.
    [shown] = [row for row in round_views.trial_rows(done) if row["chosen"]]
    low, high = (float(x) for x in shown["val_interval"].rstrip("%").split("–"))
    with read_session() as reading:
        assert shown["val_images"] == reading.get(ModelVersion, done.model_version_id).metrics["val_images"]
    assert low <= chosen["val_accuracy"] <= high and high - low > 5  # some 20 validation pictures: a wide interval
    # The winner trained as a `full` round: its parameters are the chosen trial's.
    assert done.parameters["training_mode"] == "full"
    assert (done.parameters["architecture"], done.parameters["image_size"]) == (
        chosen["architecture"],
        chosen["image_size"],
    )
    assert done.parameters["learning_rate"] == chosen["learning_rate"]
    assert any(w.startswith(f"Auto: chose {chosen['architecture']}") for w in done.warnings)
    assert done.requested_parameters["training_mode"] == "auto"
    with TestClient(app) as client:
        status = client.get(f"/models/training-status/{done.job_id}/", headers=add_token(session, "viewer"))
    assert status.status_code == 200 and status.json()["trials"] == done.trials
    assert not (data_dir / "rounds" / done.job_id).exists()


def test_cancel_during_the_search_stops_it_and_the_live_page_shows_the_trials_meanwhile(
    data_dir, session, worker_factory
):
    from tests.test_pages import app, ok, table

    add_demo(session, per_category=10, size=32)
    round_ = submit_training({**TINY, "budget_minutes": 5}, actor=as_actor("grace"))
    worker_factory()
    wait_for(lambda: get_round(round_.id).trials, timeout=120, interval=0.1, message="the first trial")
    shown = table(ok(app("pages/metrics.py")), "architecture")
    assert shown["architecture"].tolist()[0] == "mobilenet_v3_small"
    asked = time.monotonic()
    cancel_training(round_.job_id, actor=as_actor("ana"))
    done = wait_for(lambda: finished(round_.id), timeout=60, interval=0.1, message="the cancel")
    assert done.status == RoundStatus.cancelled and time.monotonic() - asked < 10
    assert done.trials[-1]["note"] == "cancelled" and done.trials[-1]["state"] == "failed"
    assert versions() == [] and model_files(data_dir) == []
    assert not (data_dir / "rounds" / done.job_id).exists()


@pytest.mark.usefixtures("fast_recovery")
def test_a_worker_killed_mid_search_resumes_it_without_repeating_finished_trials(
    data_dir, session, worker_factory, ptl_only
):
    add_demo(session, per_category=10, size=32)
    round_ = submit_training({**TINY, "budget_minutes": 0.75}, actor=as_actor("grace"))
    first = worker_factory(CRASH_AT="auto_trial1_epoch1")  # dies as the second trial starts
    first.proc.wait(timeout=300)
    assert first.proc.returncode == -signal.SIGKILL
    before = {row["number"]: row for row in get_round(round_.id).trials}
    assert before[0]["state"] in ("kept", "pruned") and before[1]["state"] == "running"

    time.sleep(float(FAST_RECOVERY["HEARTBEAT_TIMEOUT"]) + 0.5)  # the heartbeat goes stale
    worker_factory()
    done = wait_for(lambda: finished(round_.id), timeout=300, message="the resumed round to finish")
    assert done.status == RoundStatus.completed, done.error
    assert done.attempts == 2 and versions() == ["1.0.0"]
    after = {row["number"]: row for row in done.trials}
    # The finished trial is kept as it was, not run again.
    assert {k: v for k, v in after[0].items() if k != "chosen"} == {k: v for k, v in before[0].items() if k != "chosen"}
    assert after[1]["state"] == "failed" and after[1]["note"] == "interrupted (worker lost); tried again as trial 2"
    assert [after[2][k] for k in ("architecture", "learning_rate", "image_size")] == [
        before[1][k] for k in ("architecture", "learning_rate", "image_size")
    ]
    assert any("Auto: resumed the search, keeping the 1 trial(s) that had finished" in line for line in done.history)
