"""The promotion gate: a new version reaches production by itself only when it
beats production on enough shared test images, significantly (exact McNemar)
and by the margin, with no category that has enough images falling too far;
the first version only when it is clearly better than chance; a person can
still promote a held-back version, with a recorded reason."""

import pytest
from sqlmodel import select

from core import gate, quality_views, registry
from core.errors import UserError
from core.models import ModelVersion, PromotionEvent
from core.training.register import should_promote
from tests.factories import as_actor, version_row


def truth(cats: int, dogs: int) -> dict[int, str]:
    """Test images 0.. : `cats` cats, then `dogs` dogs."""
    return {i: "cat" if i < cats else "dog" for i in range(cats + dogs)}


def predictions(labels: dict[int, str], wrong) -> dict[int, str]:
    flip = {"cat": "dog", "dog": "cat"}
    return {i: flip[label] if i in set(wrong) else label for i, label in labels.items()}


def decide(new, old, labels, *, margin=1.0, max_drop=5.0, minimum=30, production="1.0.0"):
    return gate.decide(
        new,
        old,
        labels,
        production_version=production,
        min_improvement=margin,
        max_category_drop=max_drop,
        min_test_images=minimum,
    )


def test_a_tiny_test_set_is_not_enough_evidence_and_says_how_many_are_needed():
    labels = truth(5, 5)
    held = decide(predictions(labels, []), predictions(labels, range(5)), labels)
    assert not held["passed"] and held["compared_on"] == 10
    assert "not enough test images (n = 10, need 30)" in held["reasons"][0]
    assert decide(predictions(labels, []), predictions(labels, range(5)), labels, minimum=10)["passed"]


def test_a_gain_that_chance_explains_is_held_back():
    labels = truth(50, 50)
    # Production wrong on 10 images, the new version on 7 of them: 3 gained, none lost (p = 0.125).
    held = decide(predictions(labels, range(7)), predictions(labels, range(10)), labels, max_drop=100)
    assert not held["passed"] and (held["gained"], held["lost"]) == (3, 0)
    assert held["improvement"] == 3.0 and held["p_value"] == pytest.approx(0.125)
    assert "not a significant gain" in held["reasons"][0] and "on 100 test images" in held["reasons"][0]


def test_a_significant_gain_passes_and_a_worse_or_equal_one_does_not():
    labels = truth(50, 50)
    better = decide(predictions(labels, range(5)), predictions(labels, range(20)), labels, max_drop=100)
    assert better["passed"] and (better["gained"], better["lost"]) == (15, 0) and better["p_value"] < 0.001
    assert better["improvement"] == 15.0
    worse = decide(predictions(labels, range(20)), predictions(labels, range(5)), labels, max_drop=100)
    assert not worse["passed"] and "-15.0 points" in worse["reasons"][0]
    # Different mistakes, the same count: 10 gained and 10 lost.
    equal = decide(predictions(labels, range(10, 20)), predictions(labels, range(10)), labels, max_drop=100)
    assert not equal["passed"] and (equal["gained"], equal["lost"]) == (10, 10)


def test_the_margin_is_honoured_on_a_significant_gain():
    labels = truth(50, 50)
    new, old = predictions(labels, range(5)), predictions(labels, range(20))
    assert decide(new, old, labels, margin=15.0, max_drop=100)["passed"]
    held = decide(new, old, labels, margin=15.5, max_drop=100)
    assert not held["passed"] and "15.5 points or more needed" in held["reasons"][0]


def test_a_category_with_enough_images_that_falls_too_far_holds_a_better_version_back():
    labels = truth(60, 40)  # cats 0-59, dogs 60-99
    # Overall 90% against 70%, but dogs fall from 100% to 90%.
    new, old = predictions(labels, range(60, 70)), predictions(labels, range(30))
    held = decide(new, old, labels)
    assert not held["passed"] and held["category_images"] == {"cat": 60, "dog": 40}
    assert any("'dog' fell from 100.0% to 75.0% (n = 40;" in r for r in held["reasons"])
    assert decide(new, old, labels, max_drop=25.0)["passed"]


def test_a_category_with_few_test_images_is_shown_with_its_n_but_not_judged():
    labels = truth(92, 4)  # 4 dogs: one wrong dog is 25 points
    new, old = predictions(labels, [92]), predictions(labels, range(30))
    passed = decide(new, old, labels)
    assert passed["passed"] and passed["category_drops"]["dog"] == 25.0
    assert "not judged: 'dog' (n = 4)" in passed["reasons"][-1]


def test_only_images_both_versions_scored_are_compared():
    labels = truth(50, 50)
    new = predictions(labels, [])
    old = {i: label for i, label in predictions(labels, range(20)).items() if i < 50}  # production knew no dogs
    decision = decide(new, old, labels, max_drop=100)
    assert decision["compared_on"] == 50 and decision["test_accuracy"] == 100.0
    assert decision["production_test_accuracy"] == 60.0 and decision["passed"]
    none_shared = decide(new, {}, labels, max_drop=100)
    assert not none_shared["passed"] and "n = 0, need 30" in none_shared["reasons"][0]


def test_the_first_version_passes_only_when_clearly_better_than_the_commonest_category():
    # 60 test images of three categories, 20 each: always answering one is right a third of the time.
    labels = {i: ("apple", "pear", "plum")[i % 3] for i in range(60)}

    def answers(right: int) -> dict[int, str]:
        return {i: label if i < right else ("pear" if label == "apple" else "apple") for i, label in labels.items()}

    near = decide(answers(26), None, labels, production=None)  # 43 % right: p about 0.09
    assert not near["passed"] and near["reasons"][0].startswith("near chance: 43.3% right on 60 test images")
    clear = decide(answers(40), None, labels, production=None)
    assert clear["passed"] and "clearly better than chance" in clear["reasons"][0]
    few = decide(answers(10), None, {i: labels[i] for i in range(10)}, production=None)
    assert not few["passed"] and "(n = 10, need 30)" in few["reasons"][0]
    # The same test labels a version "near chance" wherever it is shown.
    assert gate.near_chance(gate.test_summary(answers(26), labels)) is True
    assert gate.near_chance(gate.test_summary(answers(40), labels)) is False
    assert gate.near_chance({"test_accuracy": 90.0, "test_images": 50}) is None  # made before the counts


def test_accuracies_come_with_their_images_and_a_wilson_interval():
    assert quality_views.wilson_interval(1, 1) == (20.7, 100.0)
    assert quality_views.wilson_interval(0, 0) is None
    labels = truth(20, 20)
    metrics = {**gate.test_summary(predictions(labels, range(4)), labels), "test_accuracy": 90.0}
    assert quality_views.accuracy_text(metrics) == "90.0% (n = 40; 95% CI 76.9–96.0%)"
    # Always "cat" on 30 cats and 10 dogs: 75 %, exactly the commonest category's share.
    always = {**gate.test_summary({i: "cat" for i in range(40)}, truth(30, 10)), "test_accuracy": 75.0}
    assert quality_views.accuracy_text(always) == "75.0% (n = 40; 95% CI 59.8–85.8%) · near chance"
    assert (
        quality_views.accuracy_text({"val_accuracy": 100.0, "val_images": 1}, "val")
        == "100.0% (n = 1; 95% CI 20.7–100.0%)"
    )


@pytest.mark.parametrize(
    ("mode", "in_production", "passed", "expected"),
    [
        ("gate", False, True, True),
        ("gate", False, False, False),
        ("first", False, False, False),
        ("gate", True, True, True),
        ("gate", True, False, False),
        ("first", True, True, False),
        ("always", True, False, True),
        ("never", False, True, False),
    ],
)
def test_auto_promote_modes(mode, in_production, passed, expected):
    assert should_promote(mode, in_production, {"passed": passed}) is expected


def test_promoting_a_held_back_version_needs_a_reason_which_is_recorded(session):
    session.add(version_row("1.0.0", is_production=True))
    reasons = ["test accuracy 80.0% against production 1.0.0's 90.0%"]
    session.add(version_row("1.1.0", gate={"passed": False, "reasons": reasons}))
    session.commit()
    operator = as_actor("ops", "operator")

    with pytest.raises(UserError, match="did not pass the promotion gate .*80.0%.* Give a reason"):
        registry.promote("1.1.0", session=session, actor=operator, reason="  ")
    session.rollback()
    assert registry.production_version(session=session).version == "1.0.0"

    registry.promote("1.1.0", session=session, actor=operator, reason="the test set is mislabelled; see #12")
    session.commit()
    event = session.exec(select(PromotionEvent).order_by(PromotionEvent.id.desc())).first()
    assert (event.to_version, event.override, event.reason, event.by) == (
        "1.1.0",
        True,
        "the test set is mislabelled; see #12",
        "ops",
    )
    assert session.exec(select(ModelVersion).where(ModelVersion.is_production)).one().version == "1.1.0"
