"""The audit trail (core/audit.py): every consequential action leaves a row,
whichever edge called it, and a role without the permission changes nothing."""

import pytest
from sqlmodel import select

from core import audit, registry, review, tokens, users
from core.errors import PermissionDeniedError
from core.models import AuditEvent, ImageStatus, TrainingImage
from core.uploads import ingest_uploads, load_demo
from tests.conftest import _clear_caches
from tests.factories import add_fake_version, add_images, as_actor, image_bytes


def _events(session) -> list[tuple]:
    rows = session.exec(select(AuditEvent).order_by(AuditEvent.id)).all()
    return [(e.actor, e.action, e.target, e.before, e.after) for e in rows]


def test_review_actions_record_before_and_after_per_image(session):
    ids = add_images(session, {"cat": 2, "dog": 1}, status=ImageStatus.pending)
    ana = as_actor("ana", "curator")
    review.set_status(ids[:1], ImageStatus.validated, session=session, actor=ana)
    review.reject_images(ids[1:2], session=session, actor=ana)
    review.relabel_images(ids[:1], "dog", session=session, actor=ana)
    review.add_category("owl", session=session, actor=ana)
    review.rename_category("owl", "barn owl", session=session, actor=ana)
    assert _events(session) == [
        ("ana", "image.validate", f"image:{ids[0]}", {"status": "pending"}, {"status": "validated"}),
        ("ana", "image.reject", f"image:{ids[1]}", {"status": "pending"}, {"status": "rejected"}),
        ("ana", "image.relabel", f"image:{ids[0]}", {"category": "cat"}, {"category": "dog"}),
        ("ana", "category.add", "category:owl", None, None),
        ("ana", "category.rename", "category:3", {"name": "owl"}, {"name": "barn owl"}),
    ]
    history = audit.image_history(ids[0], session=session)
    assert [e.action for e in history] == ["image.validate", "image.relabel"]


def test_uploads_record_each_stored_image(session):
    report = ingest_uploads(
        [("a.png", image_bytes((1, 1, 1))), ("bad.png", b"x"), ("b.png", image_bytes((2, 2, 2)))],
        session=session,
        actor=as_actor("api:pixel", "device"),
        category="cat",
    )
    stored = [r.image_id for r in report.results if r.outcome == "stored"]
    rows = _events(session)
    assert [(who, action, target) for who, action, target, _, _ in rows] == [
        ("api:pixel", "image.upload", f"image:{i}") for i in stored
    ]
    assert rows[0][4] == {"file": "a.png", "category": "cat", "status": "pending", "source": "upload"}
    assert {img.uploaded_by for img in session.exec(select(TrainingImage))} == {"api:pixel"}


def test_training_launch_and_cancel_are_recorded(data_dir, monkeypatch):
    from core.db import read_session, session_scope
    from jobs import cancel_training, submit_training

    monkeypatch.setenv("MIN_TRAINING_IMAGES", "10")
    _clear_caches()
    with session_scope() as session:
        load_demo(session=session, actor=as_actor(), per_category=2, size=32)
    round_ = submit_training({"epochs": 1, "image_size": 32}, actor=as_actor("grace", "operator"))
    cancel_training(round_.job_id, actor=as_actor("linus", "operator"))
    with read_session() as session:
        rows = [r for r in _events(session) if r[1].startswith("training")]
    assert rows[0][:3] == ("grace", "training.start", f"job:{round_.job_id}")
    assert rows[0][4]["parameters"]["epochs"] == 1 and rows[0][4]["total_images"] == 10
    assert rows[1] == (
        "linus", "training.cancel", f"job:{round_.job_id}", {"status": "queued"},
        {"status": "cancelled", "cancel_requested": True},
    )  # fmt: skip


def test_promotion_and_rollback_are_recorded(session):
    add_fake_version(session, "1.0.0", production=False)
    add_fake_version(session, "1.1.0", production=False)
    linus = as_actor("linus", "operator")
    registry.promote("1.0.0", session=session, actor=linus)
    registry.promote("1.1.0", session=session, actor=linus)
    registry.rollback(session=session, actor=linus)
    assert _events(session) == [
        ("linus", "model.promote", "model:1.0.0", {"production": None}, {"production": "1.0.0"}),
        ("linus", "model.promote", "model:1.1.0", {"production": "1.0.0"}, {"production": "1.1.0"}),
        ("linus", "model.rollback", "model:1.0.0", {"production": "1.1.0"}, {"production": "1.0.0"}),
    ]


def test_user_and_token_changes_are_recorded_without_secrets(session):
    root = as_actor("root")
    made = users.create_user("bea", "viewer", session=session, actor=root)
    users.set_role("bea", "curator", session=session, actor=root)
    users.reset_password("bea", session=session, actor=root)
    users.set_active("bea", False, session=session, actor=root)
    created = tokens.create_token(session=session, actor=root, role="device", label="pixel")
    tokens.revoke_token(created.token.id, session=session, actor=root)
    rows = _events(session)
    assert [(action, target) for _, action, target, _, _ in rows] == [
        ("user.create", "user:bea"),
        ("user.role", "user:bea"),
        ("user.password", "user:bea"),
        ("user.deactivate", "user:bea"),
        ("token.create", f"token:{created.token.id}"),
        ("token.revoke", f"token:{created.token.id}"),
    ]
    assert rows[1][3:] == ({"role": "viewer"}, {"role": "curator"})
    text = str(rows)
    assert made.password not in text and created.secret not in text


def test_find_events_filters_by_person_action_and_day(session):
    ids = add_images(session, {"cat": 2}, status=ImageStatus.pending)
    review.set_status(ids, ImageStatus.validated, session=session, actor=as_actor("ana", "curator"))
    review.reject_images(ids[:1], session=session, actor=as_actor("bo", "curator"))
    assert len(audit.find_events(session=session, actor="ana")) == 2
    assert [e.actor for e in audit.find_events(session=session, action="image.reject")] == ["bo"]
    today = audit.find_events(session=session)[0].at.date()
    assert len(audit.find_events(session=session, since=today, until=today)) == 3
    assert audit.find_events(session=session, until=today.replace(year=today.year - 1)) == []
    assert audit.actors(session=session) == ["ana", "bo"]


@pytest.mark.parametrize(
    ("role", "call"),
    [
        ("viewer", lambda s, a, ids: review.set_status(ids, ImageStatus.validated, session=s, actor=a)),
        ("viewer", lambda s, a, ids: review.relabel_images(ids, "cat", session=s, actor=a)),
        ("viewer", lambda s, a, ids: review.add_category("owl", session=s, actor=a)),
        ("viewer", lambda s, a, ids: ingest_uploads([("a.png", image_bytes())], session=s, actor=a, category="cat")),
        ("device", lambda s, a, ids: ingest_uploads(
            [("a.png", image_bytes())], session=s, actor=a, category="cat", status=ImageStatus.validated)),
        ("curator", lambda s, a, ids: registry.promote("1.0.0", session=s, actor=a)),
        ("curator", lambda s, a, ids: registry.rollback(session=s, actor=a)),
        ("operator", lambda s, a, ids: users.create_user("x", "admin", session=s, actor=a)),
        ("operator", lambda s, a, ids: tokens.create_token(session=s, actor=a, role="admin", label="x")),
    ],
)  # fmt: skip
def test_core_functions_refuse_a_role_without_the_permission_and_change_nothing(session, role, call):
    ids = add_images(session, {"cat": 1}, status=ImageStatus.pending)
    add_fake_version(session, "1.0.0", production=False)
    before = _events(session)
    with pytest.raises(PermissionDeniedError, match=f"The role '{role}' may not"):
        call(session, as_actor("someone", role), ids)
    assert _events(session) == before
    assert session.exec(select(TrainingImage)).one().status == ImageStatus.pending


@pytest.mark.parametrize("role", ["viewer", "curator"])
def test_training_is_refused_without_the_role(data_dir, role):
    from jobs import cancel_training, submit_training

    with pytest.raises(PermissionDeniedError, match="may not train"):
        submit_training({"epochs": 1}, actor=as_actor("x", role))
    with pytest.raises(PermissionDeniedError, match="may not train"):
        cancel_training("any", actor=as_actor("x", role))


def test_the_automatic_promoter_is_recorded_as_the_system_not_as_an_admin(session):
    from core.access import SYSTEM_ACTOR

    add_fake_version(session, "1.0.0", production=False)
    registry.promote("1.0.0", session=session, actor=SYSTEM_ACTOR, action="auto")
    session.commit()
    event = session.exec(select(AuditEvent).where(AuditEvent.action == "model.auto")).one()
    assert (event.actor, event.actor_role) == ("auto", "system")


def test_events_are_paged_in_sql_with_a_count_that_follows_the_filters(session):
    assert audit.count_events(session=session) == 0
    assert audit.find_events(session=session, offset=0, limit=10) == []
    for i in range(25):
        who = as_actor("ana" if i % 5 else "bo", "curator")
        audit.record_audit("image.validate", session=session, actor=who, target=f"image:{i}")
    session.commit()
    assert audit.count_events(session=session) == 25
    assert audit.count_events(session=session, actor="bo") == 5
    pages = [audit.find_events(session=session, offset=offset, limit=10) for offset in (0, 10, 20, 30)]
    assert [len(page) for page in pages] == [10, 10, 5, 0]  # the last page is short, past it empty
    ids = [event.id for page in pages for event in page]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 25
    last = audit.find_events(session=session, actor="bo", offset=4, limit=10)
    assert [e.target for e in last] == ["image:0"]


def test_audit_page_pages_through_the_trail_and_says_how_many_match(session):
    from tests.test_pages import app, ok

    for i in range(230):
        who = as_actor("ana" if i % 46 else "bo", "curator")
        audit.record_audit("image.validate", session=session, actor=who, target=f"image:{i}")
    session.commit()
    at = ok(app("pages/audit.py", "operator"))
    total = audit.count_events(session=session)  # with the operator's user.create
    assert total == 231
    assert at.get("pagination")[0].num_pages == 3
    assert at.dataframe[0].value["action"].tolist()[:3] == ["user.create", "image.validate", "image.validate"]
    assert at.dataframe[0].value["target"].tolist()[1:3] == ["image:229", "image:228"]
    assert len(at.dataframe[0].value) == 100
    ok(at.get("pagination")[0].select(3))
    assert len(at.dataframe[0].value) == 31
    assert "231 event(s), newest first; page 3 of 3." in at.caption[0].value

    ok(at.selectbox(key="audit_person").select("bo"))
    assert not at.get("pagination")  # five events: one page
    assert at.dataframe[0].value["target"].tolist() == [f"image:{i}" for i in (184, 138, 92, 46, 0)]
    ok(at.selectbox(key="audit_action").select("token.revoke"))
    assert "0 event(s)" in at.caption[0].value and not at.dataframe
