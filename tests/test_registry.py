import pytest

from core import registry
from core.errors import ConflictError, NotFoundError, UserError
from core.models import ModelVersion
from tests.factories import as_actor, version_row


def add_version(session, version: str, classes=("cat", "dog")) -> ModelVersion:
    mv = version_row(version, classes)
    session.add(mv)
    session.flush()
    return mv


def test_first_version_is_1_0_0(session):
    assert registry.next_version(["cat", "dog"], session=session) == "1.0.0"


def test_retrain_on_same_classes_bumps_minor_and_new_classes_bump_major(session):
    add_version(session, "1.0.0")
    assert registry.next_version(["cat", "dog"], session=session) == "1.1.0"
    add_version(session, "1.4.0")
    assert registry.next_version(["cat", "dog", "bird"], session=session) == "2.0.0"


def test_versions_sort_numerically_not_as_text(session):
    for v in ("1.2.0", "1.10.0", "1.9.0"):
        add_version(session, v)
    assert [v.version for v in registry.list_versions(session=session)] == ["1.10.0", "1.9.0", "1.2.0"]


def test_at_most_one_production_version_and_rollback_restores_previous(session):
    add_version(session, "1.0.0")
    add_version(session, "1.1.0")
    add_version(session, "1.2.0")
    registry.promote("1.0.0", session=session, actor=as_actor("ana"))
    registry.promote("1.2.0", session=session, actor=as_actor("ana"))
    assert [v.version for v in registry.list_versions(session=session) if v.is_production] == ["1.2.0"]
    assert registry.rollback(session=session, actor=as_actor("bo")).version == "1.0.0"
    assert registry.production_version(session=session).version == "1.0.0"
    events = registry.promotion_history(session=session)
    assert (events[0].action, events[0].from_version, events[0].to_version, events[0].by) == (
        "rollback",
        "1.2.0",
        "1.0.0",
        "bo",
    )


def test_rollback_without_an_earlier_version_is_refused(session):
    with pytest.raises(ConflictError, match="Nothing is in production"):
        registry.rollback(session=session, actor=as_actor("x"))
    add_version(session, "1.0.0")
    registry.promote("1.0.0", session=session, actor=as_actor("x"))
    with pytest.raises(ConflictError, match="no earlier one"):
        registry.rollback(session=session, actor=as_actor("x"))


def test_unknown_or_malformed_versions_are_clear_errors(session):
    add_version(session, "1.0.0")
    with pytest.raises(NotFoundError, match="No model version 3.0.0. Known versions: 1.0.0"):
        registry.promote("3.0.0", session=session, actor=as_actor("x"))
    with pytest.raises(UserError, match="MAJOR.MINOR.PATCH"):
        registry.promote("latest", session=session, actor=as_actor("x"))


def test_orphan_files_are_removed_and_referenced_ones_kept(session, data_dir):
    mv = add_version(session, "1.0.0")
    mv.artifacts = [{"format": "ptl", "path": "mobile_models/model_1.0.0.ptl"}]
    session.add(mv)
    session.flush()
    models = data_dir / "mobile_models"
    models.mkdir()
    (models / "model_1.0.0.ptl").write_bytes(b"kept")
    (models / "model_1.1.0.ptl").write_bytes(b"orphan")
    removed = registry.cleanup_orphan_files(session=session)
    assert [p.name for p in removed] == ["model_1.1.0.ptl"]
    assert (models / "model_1.0.0.ptl").exists()


def test_a_promotion_reason_longer_than_its_bound_is_refused(session):
    session.add_all([version_row("1.0.0", is_production=True), version_row("1.1.0")])
    session.commit()
    with pytest.raises(UserError, match="A promotion reason can be at most 500 characters"):
        registry.promote("1.1.0", session=session, actor=as_actor(), reason="x" * 501)
    assert registry.production_version(session=session).version == "1.0.0"
