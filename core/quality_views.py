"""Read-only views of model quality: accuracies with their counts and 95 %
Wilson intervals, per-category rows, the versions table, the gate's reasons,
version comparisons and accuracy by image origin.

Every function only reads; the pages, the API and the CLI call them.
"""

from collections.abc import Mapping

from scipy.stats import binomtest
from sqlmodel import Session, col, select

from core import gate
from core.models import (
    ImageSource,
    ModelVersion,
    TrainingImage,
    TrainingRound,
    as_utc,
)


def wilson_interval(correct: int, images: int) -> tuple[float, float] | None:
    """The 95 % Wilson interval of an accuracy, in percent (None without images)."""
    if images <= 0:
        return None
    interval = binomtest(correct, images).proportion_ci(0.95, method="wilson")
    return round(100 * float(interval.low), 1), round(100 * float(interval.high), 1)


def interval_text(accuracy: float | None, images: int | None) -> str | None:
    """The 95 % Wilson interval of `accuracy` (percent) on `images`, as text
    ("70.1–88.2%"); None without an accuracy or images."""
    if accuracy is None or not images:
        return None
    low, high = wilson_interval(round(accuracy * images / 100), images)
    return f"{low:.1f}–{high:.1f}%"


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
