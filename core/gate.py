"""Scoring versions on the held-out test images, and the promotion gate.

Every version records its prediction for each test image it was scored on
(`metrics["test_predictions"]`, image id -> category). Two versions are
compared on the test images both have a prediction for, against the labels
the images carry now (a curator's correction counts), and the comparison says
how many images that was.

The gate: a new version goes to production by itself only when, on the same
test images, its accuracy is above production's by at least the configured
margin, and no category's accuracy fell by more than the configured amount.
"""

from collections.abc import Mapping

from sqlmodel import Session, col, select

from core.models import Automation, Category, ImageStatus, ModelVersion, TrainingImage


def rules(*, session: Session) -> dict[str, float]:
    """The gate's settings (set on the Train page; core/automation.py)."""
    settings = session.get(Automation, 1) or Automation()
    return {
        "min_improvement": settings.gate_min_improvement,
        "max_category_drop": settings.gate_max_category_drop,
    }


def accuracy_on(predictions: Mapping[int, str], truth: Mapping[int, str], ids) -> tuple[float | None, dict]:
    """Accuracy (percent) over `ids` and per category of the truth."""
    ids = list(ids)
    if not ids:
        return None, {}
    hits: dict[str, list[int]] = {}
    for i in ids:
        hits.setdefault(truth[i], []).append(int(predictions[i] == truth[i]))
    overall = 100.0 * sum(sum(h) for h in hits.values()) / len(ids)
    per_class = {name: round(100.0 * sum(h) / len(h), 2) for name, h in sorted(hits.items())}
    return round(overall, 2), per_class


def decide(
    new: Mapping[int, str],
    production: Mapping[int, str] | None,
    truth: Mapping[int, str],
    *,
    production_version: str | None,
    min_improvement: float,
    max_category_drop: float,
) -> dict:
    """The gate's decision for a new version, with its reasons (stored on the version)."""
    rules = {"min_improvement": min_improvement, "max_category_drop": max_category_drop}
    if production_version is None:
        return {"passed": True, "production": None, "reasons": ["nothing is in production yet"], **rules}
    common = sorted(set(new) & set(production or {}) & set(truth))
    decision = {"production": production_version, "compared_on": len(common), **rules}
    if not common:
        reason = (
            f"no test image could be scored by both this version and production {production_version} "
            "(their categories share no test image)"
        )
        return {**decision, "passed": False, "reasons": [reason]}
    new_acc, new_per_class = accuracy_on(new, truth, common)
    old_acc, old_per_class = accuracy_on(production, truth, common)
    improvement = round(new_acc - old_acc, 2)
    drops = {name: round(old_per_class[name] - new_per_class[name], 2) for name in new_per_class}
    reasons = []
    on = f"on {len(common)} test images"
    if improvement <= 0 or improvement < min_improvement:
        reasons.append(
            f"test accuracy {new_acc:.1f}% against production {production_version}'s {old_acc:.1f}% {on}: "
            f"{improvement:+.1f} points, {min_improvement:g} or more (and above 0) needed"
        )
    for name, drop in drops.items():
        if drop > max_category_drop:
            reasons.append(
                f"category '{name}' fell from {old_per_class[name]:.1f}% to {new_per_class[name]:.1f}% "
                f"({drop:.1f} points; at most {max_category_drop:g} allowed)"
            )
    passed = not reasons
    if passed:
        reasons.append(
            f"test accuracy {new_acc:.1f}% against production {production_version}'s {old_acc:.1f}% {on} "
            f"({improvement:+.1f} points), no category down by more than {max_category_drop:g}"
        )
    return {
        **decision,
        "passed": passed,
        "reasons": reasons,
        "test_accuracy": new_acc,
        "production_test_accuracy": old_acc,
        "improvement": improvement,
        "category_drops": drops,
    }


def test_predictions(version: ModelVersion) -> dict[int, str]:
    """A version's recorded prediction per test image id."""
    return {int(k): v for k, v in (version.metrics.get("test_predictions") or {}).items()}


def current_labels(ids, *, session: Session) -> dict[int, str]:
    """The label each of `ids` carries now, for the ones still validated."""
    rows = session.exec(
        select(TrainingImage.id, Category.name)
        .join(Category, Category.id == TrainingImage.category_id)
        .where(col(TrainingImage.id).in_(list(ids)), TrainingImage.status == ImageStatus.validated)
    ).all()
    return dict(rows)


def compare_on_test(a: ModelVersion, b: ModelVersion, *, session: Session) -> dict:
    """Both versions' accuracy on the test images both were scored on, with today's labels."""
    pa, pb = test_predictions(a), test_predictions(b)
    truth = current_labels(set(pa) & set(pb), session=session)
    common = sorted(truth)
    acc_a, per_a = accuracy_on(pa, truth, common)
    acc_b, per_b = accuracy_on(pb, truth, common)
    return {"images": len(common), "a": acc_a, "b": acc_b, "per_class_a": per_a, "per_class_b": per_b}
