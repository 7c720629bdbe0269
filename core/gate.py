"""Scoring versions on the held-out test images, and the promotion gate.

Every version records its prediction for each test image it was scored on
(`TestPrediction`, one row per version and image). Two versions are compared
on the test images both have a prediction for, against the labels the images
carry now (a curator's correction counts), and the comparison says how many
images that was.

The gate decides on evidence, not on a difference of percentages:

- at least `min_test_images` shared test images, else "not enough test images";
- the new version right where production was wrong more often than the
  reverse, by more than chance: an exact McNemar test (a one-sided binomial
  test on the discordant pairs, scipy), at `ALPHA`; and its accuracy at least
  `min_improvement` points above production's;
- no category with `MIN_CATEGORY_IMAGES` or more shared test images down by
  more than `max_category_drop` points (smaller categories are listed with
  their n, not judged: one image in four is 25 points);
- with nothing in production, the first version passes only when its test
  accuracy is significantly above always answering the commonest category
  (`above_chance`), the same test that marks a version "near chance".
"""

from collections.abc import Mapping

from scipy.stats import binomtest
from sqlmodel import Session, col, delete, select

from core.automation_settings import get_automation
from core.models import Category, ImageStatus, ModelVersion, TestPrediction, TrainingImage

ALPHA = 0.05
MIN_CATEGORY_IMAGES = 20


def rules(*, session: Session) -> dict[str, float]:
    """The gate's settings (set on the Train page; core/automation.py)."""
    settings = get_automation(session=session)
    return {
        "min_improvement": settings.gate_min_improvement,
        "max_category_drop": settings.gate_max_category_drop,
        "min_test_images": settings.gate_min_test_images,
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


def above_chance(correct: int, images: int, majority: int) -> tuple[bool, float]:
    """Whether `correct` right answers out of `images` are significantly (one-sided
    binomial test at `ALPHA`) more than always answering the commonest
    category, which is right `majority` times; and the p-value."""
    if images <= 0:
        return False, 1.0
    p = binomtest(correct, images, majority / images, alternative="greater").pvalue
    return bool(p < ALPHA), float(p)


def test_summary(predictions: Mapping[int, str], truth: Mapping[int, str]) -> dict:
    """Counts behind a version's test accuracy (stored in its metrics): images,
    right answers, the commonest category's count, and images per category."""
    ids = [i for i in predictions if i in truth]
    per_category: dict[str, int] = {}
    for i in ids:
        per_category[truth[i]] = per_category.get(truth[i], 0) + 1
    return {
        "test_images": len(ids),
        "test_correct": sum(predictions[i] == truth[i] for i in ids),
        "test_majority": max(per_category.values(), default=0),
        "test_per_class_images": dict(sorted(per_category.items())),
    }


def near_chance(metrics: Mapping) -> bool | None:
    """Whether a version's test accuracy is not clearly above the commonest
    category's share (None: recorded before the counts were)."""
    if metrics.get("test_correct") is None or metrics.get("test_majority") is None:
        return None
    return not above_chance(metrics["test_correct"], metrics["test_images"], metrics["test_majority"])[0]


def _first_version(new: Mapping[int, str], truth: Mapping[int, str], min_test_images: int, rules: dict) -> dict:
    summary = test_summary(new, truth)
    n, k, majority = summary["test_images"], summary["test_correct"], summary["test_majority"]
    decision = {"production": None, "compared_on": n, **rules}
    if n < min_test_images:
        reason = (
            f"not enough test images (n = {n}, need {min_test_images}) to show that this first version "
            "is better than chance"
        )
        return {**decision, "passed": False, "reasons": [reason]}
    passed, p = above_chance(k, n, majority)
    share = f"{100 * k / n:.1f}% right on {n} test images against {100 * majority / n:.1f}% by always answering the commonest category"
    if passed:
        reason = f"nothing is in production yet, and this version is clearly better than chance: {share} (p = {p:.3g})"
    else:
        reason = f"near chance: {share} (p = {p:.2g}, below {ALPHA:g} needed); add images or train longer"
    return {**decision, "passed": passed, "reasons": [reason], "p_value": p}


def decide(
    new: Mapping[int, str],
    production: Mapping[int, str] | None,
    truth: Mapping[int, str],
    *,
    production_version: str | None,
    min_improvement: float,
    max_category_drop: float,
    min_test_images: int,
) -> dict:
    """The gate's decision for a new version, with its reasons (stored on the version)."""
    rules = {
        "min_improvement": min_improvement,
        "max_category_drop": max_category_drop,
        "min_test_images": min_test_images,
    }
    if production_version is None:
        return _first_version(new, truth, min_test_images, rules)
    common = sorted(set(new) & set(production or {}) & set(truth))
    decision = {"production": production_version, "compared_on": len(common), **rules}
    if len(common) < min_test_images:
        reason = (
            f"not enough test images (n = {len(common)}, need {min_test_images}) scored by both this version "
            f"and production {production_version}"
        )
        return {**decision, "passed": False, "reasons": [reason]}
    new_acc, new_per_class = accuracy_on(new, truth, common)
    old_acc, old_per_class = accuracy_on(production, truth, common)
    gained = sum(new[i] == truth[i] != production[i] for i in common)
    lost = sum(production[i] == truth[i] != new[i] for i in common)
    p = binomtest(gained, gained + lost, 0.5, alternative="greater").pvalue if gained + lost else 1.0
    improvement = round(new_acc - old_acc, 2)
    per_class_n = {name: sum(truth[i] == name for i in common) for name in new_per_class}
    drops = {name: round(old_per_class[name] - new_per_class[name], 2) for name in new_per_class}
    reasons = []
    on = (
        f"on {len(common)} test images: {improvement:+.1f} points, right on {gained} that production got wrong "
        f"and wrong on {lost} it got right (McNemar p = {p:.2g})"
    )
    comparison = f"test accuracy {new_acc:.1f}% against production {production_version}'s {old_acc:.1f}% {on}"
    if p >= ALPHA:
        reasons.append(f"{comparison}: not a significant gain (p below {ALPHA:g} needed)")
    elif improvement < min_improvement:
        reasons.append(f"{comparison}: {min_improvement:g} points or more needed")
    judged = {name: drop for name, drop in drops.items() if per_class_n[name] >= MIN_CATEGORY_IMAGES}
    for name, drop in judged.items():
        if drop > max_category_drop:
            reasons.append(
                f"category '{name}' fell from {old_per_class[name]:.1f}% to {new_per_class[name]:.1f}% "
                f"(n = {per_class_n[name]}; {drop:.1f} points; at most {max_category_drop:g} allowed)"
            )
    passed = not reasons
    if passed:
        reasons.append(f"{comparison}; no category down by more than {max_category_drop:g} points")
    unjudged = sorted(set(drops) - set(judged))
    if unjudged:
        listed = ", ".join(f"'{name}' (n = {per_class_n[name]})" for name in unjudged)
        reasons.append(f"categories with fewer than {MIN_CATEGORY_IMAGES} shared test images not judged: {listed}")
    return {
        **decision,
        "passed": passed,
        "reasons": reasons,
        "test_accuracy": new_acc,
        "production_test_accuracy": old_acc,
        "improvement": improvement,
        "p_value": p,
        "gained": gained,
        "lost": lost,
        "category_drops": drops,
        "category_images": per_class_n,
    }


def record_predictions(version: ModelVersion, predicted: Mapping[int, str], *, session: Session) -> None:
    """Store `version`'s prediction for each test image (replacing earlier ones)."""
    session.exec(delete(TestPrediction).where(TestPrediction.version_id == version.id))
    session.add_all(TestPrediction(version_id=version.id, image_id=i, predicted=p) for i, p in predicted.items())


def test_predictions(version: ModelVersion, *, session: Session) -> dict[int, str]:
    """A version's recorded prediction per test image id."""
    rows = session.exec(
        select(TestPrediction.image_id, TestPrediction.predicted).where(TestPrediction.version_id == version.id)
    ).all()
    return dict(rows)


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
    pa, pb = test_predictions(a, session=session), test_predictions(b, session=session)
    truth = current_labels(set(pa) & set(pb), session=session)
    common = sorted(truth)
    acc_a, per_a = accuracy_on(pa, truth, common)
    acc_b, per_b = accuracy_on(pb, truth, common)
    per_class_images: dict[str, int] = {}
    for i in common:
        per_class_images[truth[i]] = per_class_images.get(truth[i], 0) + 1
    return {
        "images": len(common),
        "a": acc_a,
        "b": acc_b,
        "per_class_a": per_a,
        "per_class_b": per_b,
        "per_class_images": per_class_images,
    }
