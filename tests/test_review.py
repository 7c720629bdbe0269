import pytest

from core import review
from core.errors import NotFoundError, UserError
from core.models import ImageStatus, TrainingImage
from tests.factories import add_images, as_actor


def test_validate_reject_and_relabel_record_who_and_when(session):
    ids = add_images(session, {"cat": 3, "dog": 1}, status=ImageStatus.pending)
    assert review.set_status(ids[:2], ImageStatus.validated, session=session, actor=as_actor("ana")) == 2
    assert review.reject_images([ids[2]], session=session, actor=as_actor("bo")) == 1
    assert review.relabel_images([ids[0]], "dog", session=session, actor=as_actor("cy")) == 1
    session.commit()
    first, second, third = (session.get(TrainingImage, i) for i in ids[:3])
    assert first.status == ImageStatus.validated and first.reviewed_by == "cy" and first.reviewed_at
    assert second.status == ImageStatus.validated and second.reviewed_by == "ana"
    assert third.status == ImageStatus.rejected and third.reviewed_by == "bo"
    assert review.validated_counts(session=session) == {"cat": 1, "dog": 1}
    assert review.status_counts(session=session) == {"pending": 1, "validated": 2, "rejected": 1}


def test_unknown_image_ids_change_nothing(session):
    ids = add_images(session, {"cat": 1}, status=ImageStatus.pending)
    with pytest.raises(NotFoundError, match="No image with id 999"):
        review.set_status([ids[0], 999], ImageStatus.validated, session=session, actor=as_actor("ana"))
    assert session.get(TrainingImage, ids[0]).status == ImageStatus.pending


def test_relabel_to_unknown_category_is_refused(session):
    ids = add_images(session, {"cat": 1})
    with pytest.raises(UserError, match="Unknown category 'bird'"):
        review.relabel_images(ids, "bird", session=session, actor=as_actor("ana"))


def test_categories_can_be_added_and_renamed_but_not_duplicated(session):
    add_images(session, {"cat": 2})
    review.add_category("dog", session=session, actor=as_actor())
    with pytest.raises(UserError, match="already exists"):
        review.add_category("dog", session=session, actor=as_actor())
    review.rename_category("cat", "kitten", session=session, actor=as_actor())
    assert review.validated_counts(session=session) == {"dog": 0, "kitten": 2}
