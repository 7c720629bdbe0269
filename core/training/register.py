"""From a trained model to a registered version: the final metrics, the
export, production scored on the same test images, the promotion gate's
decision, and the commit (version, gate decision, suspect scores and the
round's completion in one transaction).

The epoch loop hands over one `Trained`; `register` turns it into a
`Candidate` (the exported files and everything the version row needs).
"""

import logging
import shutil
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch
from sqlalchemy import or_
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select, update
from torch import nn

from core import gate, registry, suspects
from core.access import SYSTEM_ACTOR
from core.config import get_settings
from core.dataset import load_images, normalize
from core.export import artifact_path, export_model, remove_files
from core.faults import crash_point
from core.ingest import image_path
from core.models import ModelVersion, RoundStatus, TestPrediction, TrainingImage, TrainingRound, as_utc, utcnow
from core.training.config import TrainingConfig
from core.training.evaluation import TestImages, accuracy, misclassified, predict_test_images, summarise
from core.training.networks import build_model
from core.training.progress import Heartbeat, RoundReporter, enter_phase, history_line, round_dir, save_checkpoint
from core.training.trainers import Split

log = logging.getLogger(__name__)

# Validation images each exported file is checked on against the eager model:
# every one of a small round's, and a bounded number of a large one's (the
# check runs them one at a time, and holds them as floats).
PARITY_IMAGES = 256
# How a round's history says it committed its version: the last line until
# `add_artifacts` says how the later formats went (`formats_pending` reads it).
COMPLETED = "completed: model"


@dataclass
class Trained:
    """What the epoch loop hands to `register`: the kept model (on the CPU,
    in the default layout) and its logits on the round's images."""

    config: TrainingConfig
    classes: list[str]
    model: nn.Module
    data: Split
    best_epoch: int
    epochs_trained: int
    train_logits: torch.Tensor
    val_logits: torch.Tensor
    test_logits: torch.Tensor


@dataclass
class Scores:
    """The kept model's probabilities for every image of the snapshot."""

    image_ids: list[int]
    labels: list[str]
    probabilities: torch.Tensor


@dataclass
class Candidate:
    """A new version, exported and not yet committed."""

    version: str
    config: TrainingConfig
    classes: list[str]
    metrics: dict
    artifacts: list[dict]
    checkpoint: Path
    scores: Scores
    test: TestImages

    @property
    def files(self) -> list[Path]:
        """Every file the version owns (removed again when the commit fails)."""
        data_dir = get_settings().data_dir
        return [data_dir / a["path"] for a in self.artifacts] + [self.checkpoint]


@dataclass(frozen=True)
class ProductionScores:
    """The production version as scored on the test images before the commit."""

    version: str | None = None
    # Its prediction for each test image; None when there is no production
    # version or it could not be scored.
    predictions: dict[int, str] | None = None
    # Why it could not be scored.
    failure: str | None = None


def final_metrics(trained: Trained) -> tuple[dict, Scores, TestImages]:
    """The version's metrics, every image's scores (suspected mislabels) and
    its test predictions (the promotion gate)."""
    data, classes = trained.data, trained.classes
    test_labels = [classes[i] for i in data.y_test.tolist()]
    predicted = {i: classes[p] for i, p in zip(data.ids_test, trained.test_logits.argmax(1).tolist(), strict=True)}
    test_truth = dict(zip(data.ids_test, test_labels, strict=True))
    test_accuracy, test_per_class = gate.accuracy_on(predicted, test_truth, data.ids_test)
    metrics = {
        "train_accuracy": round(accuracy(trained.train_logits, data.y_train), 2),
        "val_accuracy": round(accuracy(trained.val_logits, data.y_val), 2),
        "best_epoch": trained.best_epoch,
        "epochs_trained": trained.epochs_trained,
        "train_images": len(data.y_train),
        "val_images": len(data.y_val),
        **summarise(trained.val_logits, data.y_val, classes),
        "misclassified": misclassified(trained.val_logits, data.y_val, data.ids_val, classes),
        "test_accuracy": test_accuracy,
        "test_per_class_accuracy": test_per_class,
        **gate.test_summary(predicted, test_truth),
    }
    labels = torch.cat([data.y_train, data.y_val, data.y_test]).tolist()
    scores = Scores(
        image_ids=[*data.ids_train, *data.ids_val, *data.ids_test],
        labels=[classes[i] for i in labels],
        probabilities=torch.cat([trained.train_logits, trained.val_logits, trained.test_logits]).float().softmax(1),
    )
    test = TestImages(
        ids=data.ids_test, labels=test_labels, paths=data.paths_test, shas=data.sha_test, predicted=predicted
    )
    return metrics, scores, test


def register(round_: TrainingRound, trained: Trained, reporter: RoundReporter, *, session: Session) -> ModelVersion:
    """Export `trained`, score production for the gate and commit the version
    with the round's completion; a version number taken meanwhile by another
    job is replaced by the next one (files renamed). On any failure the
    version's files are removed."""
    metrics, scores, test = final_metrics(trained)
    config, classes, model = trained.config, trained.classes, trained.model
    version = registry.next_version(classes, session=session)
    session.rollback()  # release the read transaction while exporting
    reporter.note(f"exporting model {version}")
    images = normalize(trained.data.x_val[:PARITY_IMAGES])
    # The first format makes the version downloadable; the others (the .pte's
    # lowering takes most of a quick retrain's time) follow the commit.
    first, later = get_settings().formats[:1], get_settings().formats[1:]
    artifacts = export_model(model, version, images, on_step=reporter.phase, formats=first)
    ckpt = registry.checkpoint_path(version)
    save_checkpoint(ckpt, {"config": config.to_dict(), "classes": classes, "state_dict": model.state_dict()})
    duration = round_.elapsed_seconds() or 0.0
    metrics = {
        **metrics,
        "model_size_mb": round(artifacts[0]["size_bytes"] / 1e6, 3),
        "training_duration_seconds": round(duration, 1),
    }
    candidate = Candidate(version, config, classes, metrics, artifacts, ckpt, scores, test)
    reporter.phase("scoring")
    reporter.note("scoring production on the test images for the promotion gate")
    production = score_production(test, reporter, session=session)
    reporter.phase("registering")
    try:
        reporter.check_cancel()
        crash_point("before_commit")
        for _ in range(5):
            try:
                mv = _commit_version(round_, candidate, production, session=session)
                break
            except IntegrityError:
                # Another job took this version number between our export and commit.
                session.rollback()
                candidate = _rename_version(candidate, registry.next_version(classes, session=session))
        else:
            raise RuntimeError("could not allocate a unique version number")
    except BaseException:
        remove_files(candidate.files)
        raise
    shutil.rmtree(round_dir(round_), ignore_errors=True)
    crash_point("after_commit")
    if later:
        add_artifacts(mv, model, images, later, reporter, session=session)
    return mv


def add_artifacts(
    mv: ModelVersion,
    model: nn.Module,
    images: torch.Tensor,
    formats: tuple[str, ...],
    reporter: RoundReporter,
    *,
    session: Session,
) -> None:
    """Export a committed version to more `formats`, each written, verified
    in its own runtime and renamed into place before its record joins the
    version's artifacts: phones are only ever told about verified files, and
    download the version's first format meanwhile. A failure leaves the
    version as it was (the round is already completed) and says so in its
    history."""
    records = []
    try:
        records = export_model(model, mv.version, images, formats=formats)
        session.refresh(mv)  # a promotion or rollback meanwhile is kept
        mv.artifacts = [*mv.artifacts, *records]
        session.add(mv)
        session.commit()
    except Exception as exc:
        session.rollback()
        remove_files([get_settings().data_dir / r["path"] for r in records])
        log.exception("model %s: adding %s failed", mv.version, formats)
        reporter.note(f"model {mv.version} has no {_names(formats)} file: {exc}", warning=True)
        return
    reporter.note(f"model {mv.version}: {', '.join('.' + r['format'] for r in records)} verified and added")


def formats_pending(round_: TrainingRound, version: ModelVersion) -> bool:
    """Whether the job that made `version` is still adding its later formats
    (`add_artifacts`, after the commit): one of EXPORT_FORMATS is missing,
    the job has not yet said how that went, and its worker is alive."""
    return bool(_unreported_formats(round_.history, version.artifacts)) and _alive(round_.heartbeat_at)


def _unreported_formats(history: list[str], artifacts: list[dict]) -> tuple[str, ...]:
    """EXPORT_FORMATS the version lacks while its round's history still ends
    at the commit (`add_artifacts` has not said how they went)."""
    if not history or COMPLETED not in history[-1]:
        return ()
    present = {a["format"] for a in artifacts}
    return tuple(f for f in get_settings().formats if f not in present)


def _alive(heartbeat_at) -> bool:
    beat = as_utc(heartbeat_at)
    return beat is not None and (utcnow() - beat).total_seconds() < get_settings().heartbeat_timeout


def finish_interrupted_exports(*, session: Session, recent: int = 20) -> list[str]:
    """Add the later formats of versions whose job died after committing them
    and before `add_artifacts` said how those went (its worker's heartbeat is
    stale): from the version's checkpoint, checked on up to PARITY_IMAGES of
    its test images, exactly as the job would have. Looks at the `recent`
    newest completed rounds, reading only the columns it judges by (every
    worker runs this every HEARTBEAT_TIMEOUT/2, and a round's snapshot of a
    large dataset is megabytes); a round is claimed by stamping its heartbeat
    (compare-and-set), so of several workers recovering at once one does it.
    Returns the versions it completed or reported on."""
    settings = get_settings()
    cutoff = utcnow() - timedelta(seconds=settings.heartbeat_timeout)
    newest = session.exec(
        select(TrainingRound.id, TrainingRound.history, TrainingRound.heartbeat_at, ModelVersion.artifacts)
        .join(ModelVersion, col(ModelVersion.id) == col(TrainingRound.model_version_id))
        .where(TrainingRound.status == RoundStatus.completed)
        .order_by(col(TrainingRound.finished_at).desc())
        .limit(recent)
    ).all()
    interrupted = [
        round_id
        for round_id, history, heartbeat_at, artifacts in newest
        if _unreported_formats(history, artifacts) and not _alive(heartbeat_at)
    ]
    session.rollback()
    done = []
    for round_id in interrupted:
        claimed = session.exec(
            update(TrainingRound)
            .where(
                col(TrainingRound.id) == round_id,
                or_(col(TrainingRound.heartbeat_at).is_(None), col(TrainingRound.heartbeat_at) < cutoff),
            )
            .values(heartbeat_at=utcnow())
        ).rowcount
        session.commit()
        if not claimed:
            continue
        round_ = session.get(TrainingRound, round_id)
        mv = session.get(ModelVersion, round_.model_version_id)
        missing = _unreported_formats(round_.history, mv.artifacts)
        if not missing:  # added or reported between the look and the claim
            continue
        reporter = RoundReporter(round_, session)
        with Heartbeat(round_.id, session.get_bind(), settings.heartbeat_interval):
            log.warning("model %s: its job's worker was lost before its %s; adding it now", mv.version, missing)
            try:
                model = build_model(mv.architecture, len(mv.classes))
                model.load_state_dict(registry.load_checkpoint(mv)["state_dict"])
                images = normalize(_parity_images(mv, session=session))
            except Exception as exc:
                session.rollback()
                log.exception("model %s: could not prepare the missing formats", mv.version)
                reporter.note(f"model {mv.version} has no {_names(missing)} file: {exc}", warning=True)
            else:
                add_artifacts(mv, model, images, missing, reporter, session=session)
        done.append(mv.version)
    return done


def _names(formats) -> str:
    return " or ".join("." + f for f in formats)


def _parity_images(mv: ModelVersion, *, session: Session) -> torch.Tensor:
    """Up to PARITY_IMAGES of the images `mv` was tested on, at its size."""
    images = session.exec(
        select(TrainingImage)
        .join(TestPrediction, col(TestPrediction.image_id) == col(TrainingImage.id))
        .where(TestPrediction.version_id == mv.id)
        .order_by(col(TrainingImage.id))
        .limit(PARITY_IMAGES)
    ).all()
    if not images:
        raise ValueError("it has no test images to check the file on")
    return load_images([image_path(i) for i in images], mv.image_size, [i.sha256 for i in images])


def score_production(test: TestImages, reporter: RoundReporter, *, session: Session) -> ProductionScores:
    """The production version's predictions on the test images, for the gate."""
    production = registry.production_version(session=session)
    session.rollback()
    if production is None:
        return ProductionScores()
    try:
        return ProductionScores(production.version, predict_test_images(production, test))
    except Exception as exc:  # a missing or unreadable checkpoint must not lose the new model
        log.exception("could not score production %s on the test images", production.version)
        reporter.note(f"production {production.version} could not be scored on the test images: {exc}")
        return ProductionScores(
            production.version, failure=f"production {production.version} could not be scored: {exc}"
        )


def _commit_version(
    round_: TrainingRound, candidate: Candidate, production: ProductionScores, *, session: Session
) -> ModelVersion:
    """The version row, its gate decision, the suspect scores and the round's
    completion, in one transaction."""
    settings = get_settings()
    version = candidate.version
    major, minor, patch = registry.parse_version(version)
    current = registry.production_version(session=session)
    decision = _gate_decision(candidate.test, production, current, session=session)
    mv = ModelVersion(
        version=version,
        major=major,
        minor=minor,
        patch=patch,
        round_id=round_.id,
        classes=candidate.classes,
        architecture=candidate.config.architecture,
        image_size=candidate.config.image_size,
        checkpoint_path=candidate.checkpoint.relative_to(settings.data_dir).as_posix(),
        metrics=candidate.metrics,
        artifacts=candidate.artifacts,
        gate=decision,
    )
    session.add(mv)
    session.flush()
    gate.record_predictions(mv, candidate.test.predicted, session=session)
    scores = candidate.scores
    n_suspects = suspects.record_scores(
        version, scores.image_ids, scores.labels, scores.probabilities, candidate.classes, session=session
    )
    promote = should_promote(settings.auto_promote, current is not None, decision)
    if promote:
        registry.promote(version, session=session, actor=SYSTEM_ACTOR, action="auto")
    round_.status = RoundStatus.completed
    round_.phases = enter_phase(round_.phases, None)
    round_.model_version_id = mv.id
    round_.progress = 1.0
    round_.finished_at = utcnow()
    outcome_text = "in production" if promote else "a candidate: " + "; ".join(decision["reasons"])
    round_.history = [
        *round_.history,
        history_line(f"{n_suspects} suspected mislabels among {len(scores.image_ids)} images"),
        history_line(f"{COMPLETED} {version} ({outcome_text})"),
    ]
    session.add(round_)
    session.commit()
    return mv


def should_promote(mode: str, in_production: bool, decision: dict) -> bool:
    """Whether a new version goes to production by itself (AUTO_PROMOTE): the
    first one only when clearly better than chance (core/gate.py)."""
    if mode == "always":
        return True
    if not in_production:
        return mode in ("first", "gate") and decision["passed"]
    return mode == "gate" and decision["passed"]


def _gate_decision(
    test: TestImages, production: ProductionScores, current: ModelVersion | None, *, session: Session
) -> dict:
    """`production` as scored before the commit; `current`: production now."""
    rules = gate.rules(session=session)
    if current is not None and current.version != production.version:
        reason = f"production changed to {current.version} while this version was made; compare them by hand"
        return {"passed": False, "production": current.version, "reasons": [reason], **rules}
    if production.failure:
        return {"passed": False, "production": production.version, "reasons": [production.failure], **rules}
    truth = dict(zip(test.ids, test.labels, strict=True))
    return gate.decide(test.predicted, production.predictions, truth, production_version=production.version, **rules)


def _rename_version(candidate: Candidate, new: str) -> Candidate:
    """`candidate` as version `new`, its files renamed to match."""
    data_dir = get_settings().data_dir
    artifacts = []
    for record in candidate.artifacts:
        target = artifact_path(new, record["format"])
        (data_dir / record["path"]).replace(target)
        artifacts.append({**record, "path": target.relative_to(data_dir).as_posix()})
    checkpoint = registry.checkpoint_path(new)
    candidate.checkpoint.replace(checkpoint)
    return replace(candidate, version=new, artifacts=artifacts, checkpoint=checkpoint)
