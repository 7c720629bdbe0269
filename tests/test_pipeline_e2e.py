"""The whole headless loop as an operator runs it: CLI commands and a real consumer."""

import torch
from sqlmodel import Session, select

from core.db import get_engine
from core.export import load_runner
from core.ingest import file_sha256
from core.models import AuditEvent, EpochMetric, ModelVersion, RoundStatus, TrainingRound
from tests.conftest import wait_for
from tests.servers import run_cli


def test_two_trainings_through_the_queue_give_1_0_0_then_1_1_0(data_dir, worker_factory):
    assert "60 stored" in run_cli("demo", "--per-category", "12", "--size", "32").stdout
    worker = worker_factory()
    first = run_cli("train", "--epochs", "2", "--batch-size", "16", "--image-size", "32", "--wait")
    assert "queued with 60 images" in first.stdout
    assert "in_progress" in first.stdout and "Model 1.0.0: test accuracy " in first.stdout
    assert "(n = " in first.stdout and "95% CI" in first.stdout
    # 60 pictures hold about 9 test images: too few for the gate to put even a
    # first version in production by itself; an operator does, with a reason.
    held = run_cli("promote", "1.0.0", check=False)
    assert held.returncode == 2 and "not enough test images (n = " in held.stderr
    assert "now in production" in run_cli("promote", "1.0.0", "--reason", "first model, checked by hand").stdout
    second = run_cli("train", "--epochs", "1", "--batch-size", "16", "--image-size", "32", "--wait")
    assert "Model 1.1.0" in second.stdout
    assert "fine-tuning" not in second.stdout  # progress lines only; the history says it (below)

    with Session(get_engine()) as session:
        rounds = list(session.exec(select(TrainingRound).order_by(TrainingRound.id)))
        assert [r.status for r in rounds] == [RoundStatus.completed, RoundStatus.completed]
        assert all(r.started_at and r.finished_at and r.attempts == 1 for r in rounds)
        assert any("fine-tuning production model 1.0.0" in line for line in rounds[1].history)
        epochs = [
            [m.epoch for m in session.exec(select(EpochMetric).where(EpochMetric.round_id == r.id))] for r in rounds
        ]
        assert epochs == [[1, 2], [1]]
        versions = list(session.exec(select(ModelVersion).order_by(ModelVersion.id)))
    assert [v.version for v in versions] == ["1.0.0", "1.1.0"]
    # The first went to production by hand; the second was judged against it
    # on the same test images, too few to let it through.
    assert not versions[0].gate["passed"] and versions[0].gate["production"] is None
    gate = versions[1].gate
    assert gate["production"] == "1.0.0" and gate["compared_on"] == versions[1].metrics["test_images"] > 0
    assert not gate["passed"] and "not enough test images" in gate["reasons"][0]
    assert versions[0].is_production and not versions[1].is_production

    example = torch.zeros(1, 3, 32, 32)
    for version in versions:
        assert sorted(a["format"] for a in version.artifacts) == ["pte", "ptl"]
        for artifact in version.artifacts:
            path = data_dir / artifact["path"]
            assert path.name == f"model_{version.version}.{artifact['format']}"
            assert file_sha256(path) == artifact["sha256"]
            assert path.stat().st_size == artifact["size_bytes"]
            assert artifact["parity"]["passed"]
            assert load_runner(path, artifact["format"])(example).shape == (1, 5)
    assert sorted(p.name for p in (data_dir / "mobile_models").iterdir()) == [
        "model_1.0.0.pte",
        "model_1.0.0.ptl",
        "model_1.1.0.pte",
        "model_1.1.0.ptl",
    ]
    listing = run_cli("versions").stdout
    assert "1.1.0" in listing and "1.0.0" in listing
    if not versions[1].is_production:  # held back by the gate: a person overrides it with a reason
        held = run_cli("promote", "1.1.0", check=False)
        assert held.returncode == 2 and "did not pass the promotion gate" in held.stderr
        assert "now in production" in run_cli("promote", "1.1.0", "--reason", "looks right to us").stdout
    assert "model 1.0.0 is in production again" in run_cli("rollback").stdout
    worker.stop()


def test_failing_job_is_retried_twice_then_failed_without_leftovers(data_dir, worker_factory, session):
    from core.training.rounds import start_training
    from tests.factories import add_demo

    add_demo(session, per_category=10, size=32)
    round_ = start_training({"epochs": 1, "image_size": 32}, session=session)
    session.commit()
    # The job cannot read its images: every attempt fails the same way.
    for image_file in (data_dir / "images").rglob("*.png"):
        image_file.unlink()
    from core.db import read_session
    from jobs import run_training_job

    run_training_job(round_.id)
    worker_factory()

    def finished():
        with read_session() as reader:
            current = reader.get(TrainingRound, round_.id)
        return current if current.status == RoundStatus.failed else None

    failed = wait_for(finished, timeout=120, message="the round to fail")
    assert failed.attempts == 3
    assert "FileNotFoundError" in failed.error or "No such file" in failed.error
    assert sum("will retry" in line for line in failed.history) == 2
    assert any("giving up" in line for line in failed.history)
    with read_session() as reader:
        assert reader.exec(select(ModelVersion)).all() == []
    models = data_dir / "mobile_models"
    assert not models.exists() or list(models.iterdir()) == []


def test_cli_reports_bad_input_with_non_zero_exit(data_dir):
    result = run_cli("train", "--epochs", "0", check=False)
    assert result.returncode == 2
    assert "epochs must be between 1 and 500 (got 0)" in result.stderr
    result = run_cli("status", "no-such-job", check=False)
    assert result.returncode == 2 and "No training job with id 'no-such-job'" in result.stderr


def test_stop_keeping_the_best_registers_the_best_epoch_so_far_through_the_gate(data_dir, worker_factory):
    run_cli("demo", "--per-category", "12", "--size", "32")
    worker_factory()
    queued = run_cli("train", "--epochs", "500", "--batch-size", "16", "--image-size", "32").stdout
    job_id = queued.split("Training job ")[1].split()[0]

    def epochs_done() -> int:
        with Session(get_engine()) as session:
            round_ = session.exec(select(TrainingRound).where(TrainingRound.job_id == job_id)).one()
            return len(list(session.exec(select(EpochMetric).where(EpochMetric.round_id == round_.id))))

    wait_for(lambda: epochs_done() >= 2, message="two epochs")
    assert "stop requested" in run_cli("cancel", job_id, "--keep-best").stdout

    def finished():
        with Session(get_engine()) as session:
            round_ = session.exec(select(TrainingRound).where(TrainingRound.job_id == job_id)).one()
            return round_ if round_.status not in (RoundStatus.queued, RoundStatus.in_progress) else None

    round_ = wait_for(
        finished, timeout=600, message="the stopped job to finish (exports take minutes on a busy machine)"
    )
    assert round_.status == RoundStatus.completed, round_.history
    with Session(get_engine()) as session:
        version = session.get(ModelVersion, round_.model_version_id)
        epochs = list(session.exec(select(EpochMetric).where(EpochMetric.round_id == round_.id)))
    assert version.version == "1.0.0"
    trained = version.metrics["epochs_trained"]
    assert 2 <= trained < 500 and len(epochs) == trained
    best = max(epochs, key=lambda m: (m.val_accuracy, -m.epoch))
    assert version.metrics["best_epoch"] == best.epoch
    # Through the gate: a first version on 60 pictures has too few test images to show it beats chance.
    assert not version.is_production and not version.gate["passed"]
    assert version.gate["reasons"][0].startswith("not enough test images")
    assert any(f"training stopped on request in epoch {trained + 1}" in line for line in round_.history)
    assert all(a["parity"]["passed"] and (data_dir / a["path"]).is_file() for a in version.artifacts)
    with Session(get_engine()) as session:
        stops = list(session.exec(select(AuditEvent).where(AuditEvent.action == "training.stop")))
    assert [(e.target, e.after["stop_requested"]) for e in stops] == [(f"job:{job_id}", True)]
