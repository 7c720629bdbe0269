"""Read-only views for the dashboard: image search, the queue, trends, comparisons.

Every function only reads; the pages call them inside `core.db.read_session()`.
"""

import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from scipy.stats import binomtest
from sqlalchemy.orm import defer
from sqlmodel import Session, col, func, select

from core import gate
from core.models import (
    FINISHED_STATUSES,
    PHASES,
    Category,
    ImageSource,
    ImageStatus,
    ModelVersion,
    RoundStatus,
    TrainingImage,
    TrainingRound,
    as_utc,
    utcnow,
)

# --- images -------------------------------------------------------------------


@dataclass
class ImagePage:
    """One page of a filtered image list and how many match in all."""

    rows: list[tuple[TrainingImage, str]]
    total: int


def find_images(
    *,
    session: Session,
    status: str | None = None,
    category: str | None = None,
    source: str | None = None,
    device: str | None = None,
    uploaded_from: date | None = None,
    uploaded_to: date | None = None,
    offset: int = 0,
    limit: int = 24,
) -> ImagePage:
    """Images with their category name, newest first; `None` filters match all.
    `uploaded_to` is inclusive (the whole day)."""
    conditions = []
    if status:
        conditions.append(TrainingImage.status == ImageStatus(status))
    if category:
        conditions.append(Category.name == category)
    if source:
        conditions.append(TrainingImage.source == ImageSource(source))
    if device:
        conditions.append(TrainingImage.device_id == device)
    if uploaded_from:
        conditions.append(TrainingImage.uploaded_at >= datetime.combine(uploaded_from, time.min, UTC))
    if uploaded_to:
        conditions.append(TrainingImage.uploaded_at < datetime.combine(uploaded_to + timedelta(days=1), time.min, UTC))
    base = select(TrainingImage, Category.name).join(Category, Category.id == TrainingImage.category_id)
    total = session.exec(
        select(func.count(TrainingImage.id)).join(Category, Category.id == TrainingImage.category_id).where(*conditions)
    ).one()
    rows = session.exec(
        base.where(*conditions).order_by(col(TrainingImage.id).desc()).offset(offset).limit(limit)
    ).all()
    return ImagePage(rows=list(rows), total=total)


def filter_options(*, session: Session) -> dict[str, list[str]]:
    """The values the image filters can take: categories, sources and device ids in use."""
    categories = session.exec(select(Category.name).order_by(Category.name)).all()
    sources = session.exec(select(TrainingImage.source).distinct()).all()
    devices = session.exec(
        select(TrainingImage.device_id).where(col(TrainingImage.device_id).is_not(None)).distinct()
    ).all()
    return {
        "categories": list(categories),
        "sources": sorted(ImageSource(s).value for s in sources),
        "devices": sorted(devices),
    }


def images_by_id(ids: list[int], *, session: Session) -> dict[int, TrainingImage]:
    """The images with these ids (missing ones are left out)."""
    if not ids:
        return {}
    return {img.id: img for img in session.exec(select(TrainingImage).where(col(TrainingImage.id).in_(ids)))}


def search_images(text: str, *, session: Session, limit: int = 20) -> list[TrainingImage]:
    """Images whose id is `text` ("12" or "#12") or whose original file name
    contains it (ignoring case), newest first."""
    text = text.strip().removeprefix("#")
    if not text:
        return []
    match = func.lower(TrainingImage.original_filename).contains(text.lower(), autoescape=True)
    if text.isdigit():
        match = match | (TrainingImage.id == int(text))
    query = select(TrainingImage).where(match).order_by(col(TrainingImage.id).desc()).limit(limit)
    return list(session.exec(query))


def category_warnings(counts: Mapping[str, int], *, minimum: int, far_below: float = 0.25) -> list[str]:
    """Why the validated images per category may train a poor model: a category
    under `minimum`, or under `far_below` times the median of the others."""
    warnings = []
    for name, n in counts.items():
        others = [v for k, v in counts.items() if k != name]
        median = statistics.median(others) if others else 0
        if n < minimum:
            warnings.append(f"'{name}' has {n} validated images; training needs at least {minimum} per category.")
        elif median and n < far_below * median:
            warnings.append(
                f"'{name}' has {n} validated images, far below the others (median {median:g}): "
                "the model will rarely predict it. Add or validate more."
            )
    return warnings


def dataset_over_time(*, session: Session) -> list[dict]:
    """Images in the dataset (rejected ones left out) per category at the end of
    each upload day: [{"day", "category", "images"}, ...], cumulative."""
    day = func.date(TrainingImage.uploaded_at)
    rows = session.exec(
        select(day, Category.name, func.count(TrainingImage.id))
        .join(Category, Category.id == TrainingImage.category_id)
        .where(TrainingImage.status != ImageStatus.rejected)
        .group_by(day, Category.name)
        .order_by(day)
    ).all()
    days = sorted({d for d, _, _ in rows})
    categories = sorted({c for _, c, _ in rows})
    added = {(d, c): n for d, c, n in rows}
    out, running = [], dict.fromkeys(categories, 0)
    for d in days:
        for c in categories:
            running[c] += added.get((d, c), 0)
            out.append({"day": date.fromisoformat(str(d)), "category": c, "images": running[c]})
    return out


# --- training rounds ----------------------------------------------------------


def phase_seconds(round_: TrainingRound, now: datetime | None = None) -> dict[str, float]:
    """Seconds the round spent in each phase so far (the running one up to `now`)."""
    now = now or utcnow()
    spent: dict[str, float] = {}
    for phase in round_.phases:
        start = datetime.fromisoformat(phase["started_at"])
        end = datetime.fromisoformat(phase["ended_at"]) if phase["ended_at"] else now
        spent[phase["name"]] = spent.get(phase["name"], 0.0) + max(0.0, (as_utc(end) - as_utc(start)).total_seconds())
    return spent


def typical_phases(*, session: Session) -> dict[str, float]:
    """Seconds per phase of the last completed round that recorded its phases:
    how long exporting, checking and scoring will likely take this time."""
    rounds = session.exec(
        select(TrainingRound)
        .where(TrainingRound.status == RoundStatus.completed)
        .order_by(col(TrainingRound.id).desc())
        .limit(20)
    )
    for round_ in rounds:
        if round_.phases:
            return phase_seconds(round_)
    return {}


def round_phase(round_: TrainingRound) -> str | None:
    """The phase the round is in now (None when not running one)."""
    if round_.phases and round_.phases[-1]["ended_at"] is None:
        return round_.phases[-1]["name"]
    return None


def round_timing(
    round_: TrainingRound, now: datetime | None = None, typical: Mapping[str, float] | None = None
) -> tuple[float | None, float | None]:
    """Seconds since the round started and an estimate of the seconds left;
    None where not known yet. The estimate is the training left (from its
    progress so far) plus, from `typical` (see `typical_phases`), the phases
    still to come (exporting, checking the phone files, scoring, registering)."""
    elapsed = round_.elapsed_seconds(now)
    if elapsed is None:
        return None, None
    now = now or utcnow()
    if round_.status in FINISHED_STATUSES:
        return elapsed, 0.0
    typical = typical or {}
    current = round_phase(round_)
    if current is None or current not in PHASES:  # a round from before phases were recorded
        if round_.progress <= 0:
            return elapsed, None
        return elapsed, elapsed * (1 - round_.progress) / round_.progress
    spent = phase_seconds(round_, now)
    later = sum(typical.get(name, 0.0) for name in PHASES[PHASES.index(current) + 1 :])
    if current == "training":
        if round_.progress <= 0:
            return elapsed, None
        return elapsed, spent["training"] * (1 - round_.progress) / round_.progress + later
    if current == "preparing" and "training" not in typical:
        return elapsed, None
    return elapsed, max(0.0, typical.get(current, 0.0) - spent.get(current, 0.0)) + later


def phase_rows(round_: TrainingRound, typical: Mapping[str, float], now: datetime | None = None) -> list[dict]:
    """One row per phase: its state, seconds spent and its own progress (0-1;
    a phase other than training is measured against `typical`)."""
    spent = phase_seconds(round_, now)
    current = round_phase(round_)
    rows = []
    for name in PHASES:
        if name == current:
            state = "running"
            if name == "training":
                progress = round_.progress
            elif typical.get(name):
                progress = min(0.99, spent.get(name, 0.0) / typical[name])
            else:
                progress = None
        elif name in spent:
            state, progress = "done", 1.0
        else:
            state, progress = "to come", 0.0
        rows.append({"phase": name, "state": state, "progress": progress, "seconds": round(spent.get(name, 0.0), 1)})
    return rows


def progress_text(round_: TrainingRound) -> str:
    """What a running round is doing, in the same words everywhere (sidebar, Live metrics)."""
    phase = round_phase(round_)
    if phase not in (None, "training"):
        return phase
    epochs = round_.parameters.get("epochs", 0)
    return f"training: epoch {round_.current_epoch}/{epochs}, batch {round_.current_batch}/{round_.total_batches}"


def queue_overview(*, session: Session, recent: int = 10) -> list[dict]:
    """Running and queued rounds (with their place in the queue) and the
    `recent` last finished ones, newest first."""
    # Without their snapshots (every image of the round's dataset): megabytes each at 200,000 images.
    active = list(
        session.exec(
            select(TrainingRound)
            .options(defer(TrainingRound.snapshot, raiseload=True))
            .where(col(TrainingRound.status).in_([RoundStatus.queued, RoundStatus.in_progress]))
            .order_by(col(TrainingRound.id))
        )
    )
    finished = list(
        session.exec(
            select(TrainingRound)
            .options(defer(TrainingRound.snapshot, raiseload=True))
            .where(col(TrainingRound.status).in_(FINISHED_STATUSES))
            .order_by(col(TrainingRound.id).desc())
            .limit(recent)
        )
    )
    version_ids = [r.model_version_id for r in finished if r.model_version_id]
    versions = dict(
        session.exec(select(ModelVersion.id, ModelVersion.version).where(col(ModelVersion.id).in_(version_ids))).all()
    )
    queued = [r for r in active if r.status == RoundStatus.queued]
    position = {r.id: i for i, r in enumerate(queued, start=1)}
    rows = []
    for r in [*reversed(active), *finished]:
        elapsed, _ = round_timing(r)
        rows.append(
            {
                "round": r.id,
                "job_id": r.job_id,
                "status": r.status.value,
                "position": position.get(r.id),
                "progress": r.progress,
                "requested_by": r.requested_by,
                "created": as_utc(r.created_at),
                "duration_s": round(elapsed, 1) if elapsed is not None else None,
                "images": r.total_images,
                "device": r.device,
                "version": versions.get(r.model_version_id),
                "cancel_requested": r.cancel_requested,
            }
        )
    return rows


def current_round(*, session: Session) -> TrainingRound | None:
    """The running round, else the oldest queued one, else None."""
    for status in (RoundStatus.in_progress, RoundStatus.queued):
        found = session.exec(
            select(TrainingRound).where(TrainingRound.status == status).order_by(col(TrainingRound.id))
        ).first()
        if found is not None:
            return found
    return None


def queued_count(*, session: Session) -> int:
    return session.exec(select(func.count(TrainingRound.id)).where(TrainingRound.status == RoundStatus.queued)).one()


# --- accuracies with their counts ----------------------------------------------


def wilson_interval(correct: int, images: int) -> tuple[float, float] | None:
    """The 95 % Wilson interval of an accuracy, in percent (None without images)."""
    if images <= 0:
        return None
    interval = binomtest(correct, images).proportion_ci(0.95, method="wilson")
    return round(100 * float(interval.low), 1), round(100 * float(interval.high), 1)


def accuracy_counts(metrics: Mapping, split: str = "test") -> tuple[int, int] | None:
    """(right answers, images) behind a version's `test` or `val` accuracy, or
    None when it has none. Versions made before the counts were recorded give
    them back from the accuracy and the number of images."""
    images = metrics.get(f"{split}_images")
    accuracy = metrics.get(f"{split}_accuracy")
    if not images or accuracy is None:
        return None
    correct = metrics.get(f"{split}_correct")
    return (round(accuracy * images / 100) if correct is None else correct), images


def accuracy_summary(metrics: Mapping, split: str = "test") -> dict:
    """An accuracy with its images and 95 % interval: {accuracy, images,
    correct, interval} (accuracy None when there is none)."""
    counts = accuracy_counts(metrics, split)
    if counts is None:
        images = metrics.get(f"{split}_images") or 0
        return {"accuracy": metrics.get(f"{split}_accuracy"), "images": images, "correct": None, "interval": None}
    correct, images = counts
    return {
        "accuracy": metrics.get(f"{split}_accuracy"),
        "images": images,
        "correct": correct,
        "interval": wilson_interval(correct, images),
    }


def quality_metrics(metrics: Mapping) -> dict:
    """A version's accuracies (percent) with their images and 95 % Wilson
    intervals, and whether it is near chance: the fields the API reports."""
    out: dict = {"train_accuracy": metrics.get("train_accuracy")}
    for split in ("val", "test"):
        found = accuracy_summary(metrics, split)
        low, high = found["interval"] or (None, None)
        out |= {
            f"{split}_accuracy": found["accuracy"],
            f"{split}_images": found["images"],
            f"{split}_correct": found["correct"],
            f"{split}_accuracy_ci95_low": low,
            f"{split}_accuracy_ci95_high": high,
        }
    return out | {"near_chance": gate.near_chance(metrics), "model_size_mb": metrics.get("model_size_mb")}


def accuracy_text(metrics: Mapping, split: str = "test") -> str:
    """e.g. "92.3% (n = 130; 95% CI 86.4-95.8%)", plus "near chance" for a
    test accuracy not clearly above the commonest category's share."""
    found = accuracy_summary(metrics, split)
    if found["accuracy"] is None:
        return "no test images" if split == "test" else "–"
    if found["interval"] is None:
        return f"{found['accuracy']:.1f}% (n unknown)"
    low, high = found["interval"]
    text = f"{found['accuracy']:.1f}% (n = {found['images']}; 95% CI {low:.1f}–{high:.1f}%)"
    if split == "test" and gate.near_chance(metrics):
        text += " · near chance"
    return text


def per_category_rows(metrics: Mapping, split: str = "test") -> list[dict]:
    """Per-category accuracy with the images behind each: [{category, accuracy, images}]."""
    if split == "test":
        accuracy = metrics.get("test_per_class_accuracy") or {}
        images = metrics.get("test_per_class_images") or {}
    else:
        accuracy = metrics.get("per_class_accuracy") or {}
        matrix = metrics.get("confusion_matrix") or []
        images = {name: sum(row) for name, row in zip(accuracy, matrix, strict=False)}
    return [{"category": name, "accuracy (%)": acc, "images": images.get(name)} for name, acc in accuracy.items()]


# --- model versions -----------------------------------------------------------


# What the versions table shows of each version's metrics: read from the JSON
# column in SQL, since the whole of it (confusion matrix, misclassified
# validation images) grows with the dataset.
TABLE_METRICS = (
    "test_accuracy",
    "test_images",
    "test_correct",
    "test_majority",
    "val_accuracy",
    "val_images",
    "train_accuracy",
    "model_size_mb",
)


def versions_table(*, session: Session) -> list[dict]:
    """Every version, newest first, with the round that made it, its dataset
    hash and the promotion gate's decision (`gate_decision`)."""
    metrics = col(ModelVersion.metrics)
    rows = session.exec(
        select(
            ModelVersion.version,
            ModelVersion.is_production,
            ModelVersion.created_at,
            ModelVersion.classes,
            ModelVersion.architecture,
            ModelVersion.image_size,
            ModelVersion.gate,
            TrainingRound.id,
            TrainingRound.job_id,
            TrainingRound.snapshot_hash,
            *(metrics[key] for key in TABLE_METRICS),
        )
        .join(TrainingRound, TrainingRound.id == ModelVersion.round_id, isouter=True)
        .order_by(col(ModelVersion.major).desc(), col(ModelVersion.minor).desc(), col(ModelVersion.patch).desc())
    ).all()
    table = []
    for (
        version,
        production,
        created,
        classes,
        architecture,
        size,
        decision,
        round_id,
        job_id,
        snapshot,
        *values,
    ) in rows:
        m = {key: value for key, value in zip(TABLE_METRICS, values, strict=True) if value is not None}
        table.append(
            {
                "version": version,
                "production": production,
                "created": as_utc(created),
                "test_accuracy": m.get("test_accuracy"),
                "test_images": m.get("test_images"),
                "test_95_ci": _interval_text(m),
                "near_chance": gate.near_chance(m),
                "gate": _gate_label(decision),
                "gate_decision": decision,
                "val_accuracy": m.get("val_accuracy"),
                "val_images": m.get("val_images"),
                "train_accuracy": m.get("train_accuracy"),
                "size_mb": m.get("model_size_mb"),
                "classes": ", ".join(classes),
                "architecture": architecture,
                "image_size": size,
                "round": round_id,
                "job_id": job_id,
                "snapshot_hash": snapshot[:12] if snapshot is not None else None,
            }
        )
    return table


def _interval_text(metrics: Mapping) -> str | None:
    interval = accuracy_summary(metrics)["interval"]
    return f"{interval[0]:.1f}–{interval[1]:.1f}%" if interval else None


def _gate_label(decision: dict | None) -> str:
    if not decision:
        return "—"
    return "passed" if decision.get("passed") else "held back"


def gate_reasons(table: list[dict]) -> list[dict]:
    """Each version's promotion-gate decision in words, newest first (rows of `versions_table`)."""
    return [
        {
            "version": row["version"],
            "gate": row["gate"],
            "compared with": (row["gate_decision"] or {}).get("production"),
            "test images": (row["gate_decision"] or {}).get("compared_on"),
            "why": "; ".join((row["gate_decision"] or {}).get("reasons", []))
            or "made before the promotion gate existed",
        }
        for row in table
    ]


def compare_versions(old: ModelVersion, new: ModelVersion, *, session: Session | None = None) -> dict:
    """Side-by-side metrics and per-category accuracy of two versions; deltas
    are `new - old` (positive: `new` is better, or bigger for size).

    Given a session, the first row is both versions' accuracy on the test
    images both were scored on (with today's labels), `test_images` says how
    many, and the per-category table is over those images."""

    def delta(a, b):
        return round(b - a, 2) if a is not None and b is not None else None

    summary = []
    on_test = gate.compare_on_test(old, new, session=session) if session is not None else None
    if on_test is not None:
        a, b = on_test["a"], on_test["b"]
        label = f"test accuracy (%) on the {on_test['images']} test images both scored"
        summary.append({"metric": label, old.version: a, new.version: b, "delta": delta(a, b)})
    for key, label in (
        ("val_accuracy", "validation accuracy (%)"),
        ("train_accuracy", "training accuracy (%)"),
        ("model_size_mb", "size (MB)"),
        ("val_images", "validation images"),
        ("train_images", "training images"),
    ):
        a, b = old.metrics.get(key), new.metrics.get(key)
        summary.append({"metric": label, old.version: a, new.version: b, "delta": delta(a, b)})
    counts: dict[str, int] = {}
    if on_test is not None and on_test["images"]:
        per_class_old, per_class_new, basis = on_test["per_class_a"], on_test["per_class_b"], "test (both scored)"
        counts = on_test["per_class_images"]
    else:
        per_class_old = old.metrics.get("per_class_accuracy", {})
        per_class_new = new.metrics.get("per_class_accuracy", {})
        basis = "validation"
    per_category = []
    for name in sorted(set(per_class_old) | set(per_class_new)):
        a, b = per_class_old.get(name), per_class_new.get(name)
        row = {"category": name, old.version: a, new.version: b, "delta": delta(a, b)}
        per_category.append(row | ({"images": counts.get(name, 0)} if counts else {}))
    return {
        "summary": summary,
        "per_category": per_category,
        "per_category_basis": basis,
        "test_images": on_test["images"] if on_test is not None else None,
    }


def accuracy_by_origin(version: ModelVersion, *, session: Session) -> dict[str, list[dict]]:
    """`version`'s accuracy on its test images, grouped by source and by
    device (phones' `device_id`; "none" for images without one), worst first,
    with today's labels. A phone whose camera produces bad pictures stands out."""
    predictions = gate.test_predictions(version, session=session)
    truth = gate.current_labels(predictions, session=session)
    rows = session.exec(
        select(TrainingImage.id, TrainingImage.source, TrainingImage.device_id).where(
            col(TrainingImage.id).in_(list(truth))
        )
    ).all()
    groups: dict[str, dict[str, list[int]]] = {"source": {}, "device": {}}
    for image_id, source, device_id in rows:
        hit = int(predictions[image_id] == truth[image_id])
        groups["source"].setdefault(ImageSource(source).value, []).append(hit)
        groups["device"].setdefault(device_id or "none", []).append(hit)
    return {
        kind: sorted(
            (
                {
                    kind: name,
                    "images": len(hits),
                    "correct": sum(hits),
                    "accuracy": round(100.0 * sum(hits) / len(hits), 1),
                }
                for name, hits in found.items()
            ),
            key=lambda row: (row["accuracy"], -row["images"]),
        )
        for kind, found in groups.items()
    }
