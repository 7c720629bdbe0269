"""The promotion gate: a new version reaches production by itself only when it
beats production on the same test images by the margin, with no category
falling too far; a person can still promote it, with a recorded reason."""

import pytest
from sqlmodel import select

from core import gate, registry
from core.errors import UserError
from core.models import ModelVersion, PromotionEvent
from core.training import should_promote
from tests.factories import as_actor, version_row

# 10 test images: 5 cats (ids 1-5) and 5 dogs (ids 6-10).
TRUTH = {i: "cat" if i <= 5 else "dog" for i in range(1, 11)}


def predictions(wrong: set[int]) -> dict[int, str]:
    flip = {"cat": "dog", "dog": "cat"}
    return {i: flip[label] if i in wrong else label for i, label in TRUTH.items()}


def decide(new, old, *, margin=1.0, max_drop=5.0, production="1.0.0"):
    return gate.decide(
        new, old, TRUTH, production_version=production, min_improvement=margin, max_category_drop=max_drop
    )


def test_a_better_version_passes_and_a_worse_or_equal_one_does_not():
    better = decide(predictions({1}), predictions({1, 6}), max_drop=100)
    assert better["passed"] and better["improvement"] == 10.0 and better["compared_on"] == 10
    worse = decide(predictions({1, 6}), predictions({1}))
    assert not worse["passed"] and "-10.0 points" in worse["reasons"][0]
    equal = decide(predictions({1}), predictions({6}), max_drop=100)
    assert not equal["passed"], "the same accuracy is not better"


def test_the_margin_is_honoured_in_both_directions():
    new, old = predictions(set()), predictions({1})  # +10 points
    assert decide(new, old, margin=10.0, max_drop=100)["passed"]
    held = decide(new, old, margin=10.5, max_drop=100)
    assert not held["passed"] and "10.5 or more" in held["reasons"][0]


def test_a_category_that_falls_too_far_holds_a_better_version_back():
    # Overall 90% against 70%, but dogs fall from 100% to 80%.
    new, old = predictions({9}), predictions({1, 2, 3})
    held = decide(new, old, max_drop=5.0)
    assert not held["passed"] and held["category_drops"] == {"cat": -60.0, "dog": 20.0}
    assert any("'dog' fell from 100.0% to 80.0%" in r for r in held["reasons"])
    assert decide(new, old, max_drop=20.0)["passed"]


def test_only_images_both_versions_scored_are_compared():
    new = predictions(set())
    old = {i: label for i, label in predictions({1}).items() if i <= 5}  # production knew no dogs
    decision = decide(new, old, max_drop=100)
    assert decision["compared_on"] == 5 and decision["test_accuracy"] == 100.0
    assert decision["production_test_accuracy"] == 80.0
    none_shared = decide(new, {}, max_drop=100)
    assert not none_shared["passed"] and "no test image" in none_shared["reasons"][0]


def test_without_production_the_first_version_passes():
    assert decide(predictions({1, 2}), None, production=None)["passed"]


@pytest.mark.parametrize(
    ("mode", "in_production", "passed", "expected"),
    [
        ("gate", False, False, True),
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
