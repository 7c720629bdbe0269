import math

import pytest
import torch

from core.errors import UserError
from core.models import RoundStatus
from core.splits import stratified_split
from core.training.config import TrainingConfig
from core.training.preflight import choose_image_size, preflight
from core.training.rounds import list_rounds, snapshot_hash, start_training
from tests.factories import add_images


def test_defaults_are_the_original_ones():
    config = TrainingConfig.from_params({})
    assert (config.epochs, config.batch_size, config.learning_rate, config.use_existing_model) == (20, 32, 0.001, True)
    assert config.architecture == "mobilenet_v3_small"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"epochs": 0}, "epochs must be between 1 and 500 (got 0)"),
        ({"epochs": -3}, "epochs must be between 1 and 500"),
        ({"epochs": 10**9}, "epochs must be between 1 and 500"),
        ({"epochs": 2.5}, "epochs must be a whole number"),
        ({"epochs": "5"}, "epochs must be a whole number between 1 and 500 (got '5')"),
        ({"epochs": True}, "epochs must be a whole number between 1 and 500 (got True)"),
        ({"batch_size": 0}, "batch_size must be between 2 and 1,024"),
        ({"batch_size": -1}, "batch_size must be between"),
        ({"learning_rate": 0}, "learning_rate must be between"),
        ({"learning_rate": -0.1}, "learning_rate must be between"),
        ({"learning_rate": math.nan}, "learning_rate must be between"),
        ({"learning_rate": math.inf}, "learning_rate must be between"),
        ({"learning_rate": 50.0}, "learning_rate must be between"),
        ({"learning_rate": "fast"}, "learning_rate must be a number between 1e-06 and 1 (got 'fast')"),
        ({"use_existing_model": "yes"}, "use_existing_model must be true or false"),
        ({"architecture": "vgg16"}, "architecture must be one of"),
        ({"image_size": 8}, "image_size must be between 32 and 512"),
        ({"val_split": 0.9}, "val_split must be between"),
        ({"seed": -1}, "seed must be between 0 and 2,147,483,647 (got -1)"),
        ({"colour": "red"}, "Unknown parameter(s) colour"),
    ],
)
def test_out_of_range_parameters_are_refused_naming_field_and_range(params, message):
    with pytest.raises(UserError) as info:
        TrainingConfig.from_params(params)
    assert message in str(info.value)


def test_integral_floats_are_accepted_for_whole_number_fields():
    assert TrainingConfig.from_params({"epochs": 3.0}).epochs == 3


def test_split_is_stratified_deterministic_and_covers_every_class():
    labels = [0] * 10 + [1] * 20 + [2] * 3
    train_a, val_a = stratified_split(labels, 0.2, seed=1)
    train_b, val_b = stratified_split(labels, 0.2, seed=1)
    assert (train_a, val_a) == (train_b, val_b)
    assert set(train_a).isdisjoint(val_a) and len(train_a) + len(val_a) == len(labels)
    assert [sum(labels[i] == c for i in val_a) for c in range(3)] == [2, 4, 1]
    assert {labels[i] for i in train_a} == {0, 1, 2}
    _, val_other = stratified_split(labels, 0.2, seed=2)
    assert val_other != val_a


def test_fewer_than_minimum_validated_images_is_refused_with_the_numbers(session):
    add_images(session, {"cat": 20, "dog": 20})
    with pytest.raises(UserError, match="at least 50 validated images; there are 40. Validate 10 more"):
        start_training({}, session=session)
    assert list_rounds(session=session) == []


def test_one_category_only_is_refused(session):
    add_images(session, {"cat": 60})
    with pytest.raises(UserError, match="at least 2 categories; found 1 \\(cat\\)"):
        start_training({}, session=session)


def test_category_with_a_single_image_is_refused(session):
    add_images(session, {"cat": 30, "dog": 29, "bird": 1})
    with pytest.raises(UserError, match="'bird' has 1"):
        start_training({}, session=session)


def test_pending_and_rejected_images_do_not_count(session):
    from core.models import ImageStatus

    add_images(session, {"cat": 30, "dog": 30}, status=ImageStatus.pending)
    check = preflight(session=session)
    assert check.total == 0 and not check.ok


def test_start_training_freezes_a_snapshot_with_its_hash(session):
    ids = add_images(session, {"cat": 25, "dog": 25})
    round_ = start_training({"epochs": 2}, session=session, requested_by="tester")
    assert round_.status == RoundStatus.queued
    assert [s["id"] for s in round_.snapshot] == sorted(ids)
    assert round_.category_distribution == {"cat": 25, "dog": 25}
    assert round_.classes == ["cat", "dog"]
    assert len(round_.snapshot_hash) == 64
    assert round_.snapshot_hash == snapshot_hash(round_.snapshot)
    assert round_.parameters["epochs"] == 2
    assert any("no model is in production" in w for w in round_.warnings)


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [
        ([(64, 64)] * 5, 64),  # small square glyphs
        ([(100, 60)] * 4 + [(4000, 3000)], 64),  # document crops and one photo: the median ignores it
        ([(28, 28)] * 3, 32),  # tiny digits: never below 32
        ([(512, 512), (640, 480), (3024, 4032)], 224),  # photos: never above 224
        ([(48, 80)], 64),  # halfway between two multiples of 32 rounds up
    ],
)
def test_auto_image_size_is_the_median_short_side_rounded_to_32_between_32_and_224(sizes, expected):
    size, why = choose_image_size(sizes)
    assert size == expected
    assert why.startswith(f"Image size auto: {expected} px, from the median short side")


def test_image_size_auto_is_the_default_and_is_chosen_from_the_snapshot_and_recorded(session):
    add_images(session, {"cat": 25, "dog": 25}, size=(100, 60))
    assert TrainingConfig().image_size == "auto"
    round_ = start_training({"epochs": 2}, session=session)
    assert round_.parameters["image_size"] == 64
    assert (
        "Image size auto: 64 px, from the median short side (60 px) of the 50 validated images, "
        "rounded to a multiple of 32 between 32 and 224; give an image size to choose another."
    ) in round_.warnings
    assert start_training({"image_size": "auto"}, session=session).parameters["image_size"] == 64


def test_an_explicit_image_size_always_wins(session):
    add_images(session, {"cat": 25, "dog": 25}, size=(100, 60))
    round_ = start_training({"image_size": 160}, session=session)
    assert round_.parameters["image_size"] == 160
    assert not any("Image size auto" in w for w in round_.warnings)
    with pytest.raises(
        UserError, match="image_size must be a whole number between 32 and 512 or 'auto' \\(got 'big'\\)"
    ):
        start_training({"image_size": "big"}, session=session)


def test_cli_takes_image_size_auto_or_a_number(session, capsys):
    from cli import main

    add_images(session, {"cat": 25, "dog": 25}, size=(100, 60))
    assert main(["train", "--image-size", "auto", "--epochs", "1"]) == 0
    assert "note: Image size auto: 64 px" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--image-size", "big"])
    assert "--image-size: must be a whole number of pixels or 'auto' (got 'big')" in capsys.readouterr().err
    assert [r.parameters["image_size"] for r in list_rounds(session=session)] == [64]


def test_minimum_is_configurable(session, monkeypatch):
    from core.config import get_settings

    monkeypatch.setenv("MIN_TRAINING_IMAGES", "10")
    get_settings.cache_clear()
    add_images(session, {"cat": 5, "dog": 5})
    assert preflight(session=session).ok


@pytest.mark.parametrize(
    ("images", "params", "message"),
    [
        ({"cat": 20, "dog": 20}, {}, "there are 40"),
        ({"cat": 60}, {}, "at least 2 categories"),
        ({"cat": 30, "dog": 29, "bird": 1}, {}, "'bird' has 1"),
        ({"cat": 30, "dog": 30}, {"epochs": 0}, "epochs must be between"),
        ({"cat": 30, "dog": 30}, {"learning_rate": math.nan}, "learning_rate must be between"),
        ({"cat": 30, "dog": 30}, {"batch_size": "32"}, "batch_size must be a whole number between 2 and 1,024"),
    ],
)
def test_refused_training_requests_change_nothing(session, images, params, message):
    add_images(session, images)
    with pytest.raises(UserError, match=message):
        start_training(params, session=session)
    session.rollback()
    assert list_rounds(session=session) == []


def test_existing_model_with_another_class_list_falls_back_to_a_fresh_model_and_says_so(session):
    from tests.factories import add_fake_version

    add_fake_version(session, "1.0.0", production=True, classes=("cat", "dog"))
    add_images(session, {"cat": 20, "dog": 20, "bird": 20})
    round_ = start_training({"use_existing_model": True}, session=session)
    assert any("production model 1.0.0 knows 2 categories" in w and "from scratch" in w for w in round_.warnings)
    assert round_.status == RoundStatus.queued


def test_parity_check_refuses_an_artifact_whose_logits_drift_beyond_the_tolerance(tmp_path):
    from torch import nn

    from core.export import LOGIT_RTOL, MAX_LOGIT_DIFF, _write_ptl, check_parity

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).eval()
    images = torch.randn(5, 3, 4, 4)
    path = tmp_path / "tiny.ptl"
    _write_ptl(model, images[:1], path)
    with torch.inference_mode():
        eager = model(images)
    same = check_parity(path, "ptl", images, eager)
    assert same.passed and same.top1_agreement == 1.0 and same.max_abs_logit_diff < 1e-5
    shifted = eager + 0.01  # same top-1, logits 0.01 apart
    drifted = check_parity(path, "ptl", images, shifted)
    assert not drifted.passed and drifted.top1_agreement == 1.0
    assert drifted.threshold == pytest.approx(MAX_LOGIT_DIFF + LOGIT_RTOL * float(shifted.abs().max()))


def test_a_round_too_large_for_memory_trains_from_its_image_file_to_the_same_model(session, monkeypatch, ptl_only):
    from core.config import get_settings
    from core.registry import load_checkpoint
    from core.training.progress import round_dir
    from core.training.rounds import run_training_round
    from tests.factories import add_demo

    add_demo(session, per_category=12, size=32)
    params = {"epochs": 1, "batch_size": 16, "image_size": 32, "use_existing_model": False}
    versions = []
    for limit in (str(2 * 1024**3), "0"):  # in memory, then streamed
        monkeypatch.setenv("TRAINING_IMAGES_MAX_BYTES", limit)
        get_settings.cache_clear()
        round_ = start_training(params, session=session)
        session.commit()
        versions.append(run_training_round(round_.id, session=session))
        assert versions[-1] is not None, round_.error
    in_memory, streamed = versions
    assert any("read from disk batch by batch" in line for line in round_.history)
    assert not round_dir(round_).exists()  # the image file went with the round's folder
    for key in ("train_accuracy", "val_accuracy", "test_accuracy", "confusion_matrix"):
        assert streamed.metrics[key] == in_memory.metrics[key]
    weights = load_checkpoint(in_memory)["state_dict"], load_checkpoint(streamed)["state_dict"]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_pte_that_fails_after_the_commit_leaves_the_version_downloadable_as_ptl_and_says_why(
    session, data_dir, monkeypatch
):
    from core import export
    from core.training.rounds import run_training_round
    from tests.factories import add_demo

    def lowering_fails(model, example, path):
        path.write_bytes(b"half")
        raise RuntimeError("XNNPACK lowering failed")

    monkeypatch.setattr(export, "_write_pte", lowering_fails)
    add_demo(session, per_category=10, size=32)
    round_ = start_training({"epochs": 1, "batch_size": 16, "image_size": 32}, session=session)
    session.commit()
    version = run_training_round(round_.id, session=session)
    session.refresh(round_)
    assert round_.status == RoundStatus.completed and version is not None
    assert [a["format"] for a in version.artifacts] == ["ptl"] and version.artifacts[0]["parity"]["passed"]
    assert sorted(p.name for p in (data_dir / "mobile_models").iterdir()) == [f"model_{version.version}.ptl"]
    assert any("has no .pte file" in w and "XNNPACK lowering failed" in w for w in round_.warnings)
