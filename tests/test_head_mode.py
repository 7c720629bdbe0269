"""`head` mode: a quick retrain of the classifier on a frozen backbone, whose
model is the whole network and exports like any other."""

import pytest
import torch
from sqlmodel import select

from core import registry
from core.errors import UserError
from core.models import Category, TrainingImage, TrainingRound
from core.training.config import TrainingConfig
from core.training.progress import RoundReporter
from core.training.rounds import epoch_metrics, list_rounds, run_training_round, start_training
from tests.factories import add_demo

TINY = {"epochs": 1, "batch_size": 16, "image_size": 32}


@pytest.fixture(autouse=True)
def first_model_in_production(monkeypatch):
    """Head mode retrains production's head; one epoch on 50 pictures is no
    evidence the gate would accept for a first version (tests/test_gate.py)."""
    from core.config import get_settings

    monkeypatch.setenv("AUTO_PROMOTE", "always")
    get_settings.cache_clear()


def train(session, **params):
    round_ = start_training({**TINY, **params}, session=session)
    session.commit()
    version = run_training_round(round_.id, session=session)
    assert version is not None, round_.error
    return round_, version


def test_an_unknown_training_mode_is_refused_naming_the_choices():
    with pytest.raises(UserError, match="training_mode must be one of full, head, auto, federated \\(got 'fast'\\)"):
        TrainingConfig.from_params({"training_mode": "fast"})


def test_head_mode_without_any_pretrained_backbone_is_refused_saying_why(session):
    add_demo(session, per_category=10, size=32)
    with pytest.raises(UserError) as info:
        start_training({"training_mode": "head"}, session=session)
    message = str(info.value)
    assert "no ImageNet weights for mobilenet_v3_small" in message
    assert "no model is in production yet" in message
    assert "Train in training mode full first" in message
    assert list_rounds(session=session) == []


def test_head_mode_retrains_only_the_head_of_production_and_exports_with_parity(session, data_dir):
    add_demo(session, per_category=10, size=32)
    _, first = train(session)
    assert first.is_production
    round_, retrained = train(session, training_mode="head", epochs=2)
    assert retrained.version == "1.1.0"
    assert any("Training mode head: the backbone of production model 1.0.0" in line for line in round_.history)
    assert {a["format"] for a in retrained.artifacts} == {"ptl", "pte"}
    assert all(a["parity"]["passed"] for a in retrained.artifacts)

    before = registry.load_checkpoint(first)["state_dict"]
    after = registry.load_checkpoint(retrained)["state_dict"]
    head = "classifier.3."
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith(head))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(head))
    assert list((data_dir / "cache").rglob("*.npy"))  # features and pixels kept for the next job


def test_head_mode_on_a_new_class_list_starts_a_fresh_head(session, ptl_only):
    add_demo(session, per_category=13, size=32)  # 52 images are left without one category
    train(session)

    star = session.exec(select(Category).where(Category.name == "star")).one()
    for image in session.exec(select(TrainingImage).where(TrainingImage.category_id == star.id)):
        image.status = "rejected"
        session.add(image)
    session.commit()
    _, retrained = train(session, training_mode="head")
    assert retrained.version == "2.0.0" and "star" not in retrained.classes
    assert all(a["parity"]["passed"] for a in retrained.artifacts)


def test_head_mode_resumes_from_its_checkpoint_with_the_same_backbone(session, monkeypatch, ptl_only):
    add_demo(session, per_category=10, size=32)
    train(session)
    round_ = start_training({**TINY, "training_mode": "head", "epochs": 3}, session=session)
    session.commit()
    real_epoch = RoundReporter.epoch

    # Lost between epoch 2's metric row and its checkpoint: the resume starts
    # from epoch 1's checkpoint and writes epoch 2's row again, once.
    def lose_the_worker_after_epoch_2(self, metric):
        real_epoch(self, metric)
        if metric.epoch == 2 and self.round.attempts == 1:
            raise RuntimeError("worker lost")

    monkeypatch.setattr(RoundReporter, "epoch", lose_the_worker_after_epoch_2)
    with pytest.raises(RuntimeError, match="worker lost"):
        run_training_round(round_.id, session=session)
    version = run_training_round(round_.id, session=session)
    assert version is not None and version.version == "1.1.0"
    done = session.get(TrainingRound, round_.id)
    assert any("resumed from the checkpoint of epoch 1, at epoch 2" in line for line in done.history)
    assert [m.epoch for m in epoch_metrics(round_.id, session=session)] == [1, 2, 3]
    assert all(a["parity"]["passed"] for a in version.artifacts)
