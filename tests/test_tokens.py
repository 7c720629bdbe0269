"""API tokens and the role table (core/tokens.py, core/access.py)."""

import hashlib
from datetime import timedelta

import pytest
from sqlmodel import select

from core import tokens
from core.access import Permission, Role, allows, check_permission
from core.errors import AuthenticationError, NotFoundError, PermissionDeniedError, UserError
from core.models import ApiToken, utcnow
from tests.factories import as_actor


def test_only_the_hash_of_a_secret_is_stored(session):
    created = tokens.create_token(session=session, actor=as_actor(), role="device", label="pixel-7")
    session.commit()
    row = session.exec(select(ApiToken)).one()
    assert row.token_hash == hashlib.sha256(created.secret.encode()).hexdigest()
    assert created.secret not in str(row.model_dump())
    assert tokens.verify_token(created.secret, session=session).id == row.id


def test_revoked_and_expired_tokens_do_not_verify(session):
    revoked = tokens.create_token(session=session, actor=as_actor(), role="viewer", label="old")
    tokens.revoke_token(revoked.token.id, session=session, actor=as_actor())
    with pytest.raises(AuthenticationError, match="^This API token is revoked or expired: ask for a new one$"):
        tokens.verify_token(revoked.secret, session=session)
    expired = tokens.create_token(session=session, actor=as_actor(), role="viewer", label="short", expires_days=1)
    expired.token.expires_at = utcnow() - timedelta(seconds=1)
    with pytest.raises(AuthenticationError, match="^This API token is revoked or expired: ask for a new one$"):
        tokens.verify_token(expired.secret, session=session)
    assert [tokens.token_state(t) for t in tokens.list_tokens(session=session)] == ["expired", "revoked"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"role": "root", "label": "x"}, "Unknown role 'root': use one of device, viewer, curator, operator, admin"),
        ({"role": "viewer", "label": "  "}, "A token needs a label"),
        ({"role": "viewer", "label": "x", "expires_days": 0}, "--expires-days must be positive"),
    ],
)
def test_bad_token_requests_say_what_to_fix(session, kwargs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        tokens.create_token(session=session, actor=as_actor(), **kwargs)


def test_revoking_an_unknown_token_is_not_found(session):
    with pytest.raises(NotFoundError, match="No API token with id 7"):
        tokens.revoke_token(7, session=session, actor=as_actor())


def test_roles_match_the_issue():
    read, upload, review, categories = (
        Permission.read,
        Permission.upload_images,
        Permission.review_images,
        Permission.manage_categories,
    )
    assert {p for p in Permission if allows("device", p)} == {read, upload}
    assert {p for p in Permission if allows("viewer", p)} == {read}
    assert {p for p in Permission if allows("curator", p)} == {read, upload, review, categories}
    assert {p for p in Permission if allows("operator", p)} == {
        read, upload, review, categories, Permission.train, Permission.promote, Permission.read_audit,
    }  # fmt: skip
    assert {p for p in Permission if allows("admin", p)} == set(Permission)
    assert not allows("root", Permission.read)
    with pytest.raises(PermissionDeniedError, match="The role 'viewer' may not train; roles that may: operator, admin"):
        check_permission(Role.viewer, Permission.train)


def test_a_token_expiring_later_still_verifies_and_records_its_use(session):
    created = tokens.create_token(session=session, actor=as_actor(), role="device", label="phone", expires_days=30)
    token = tokens.verify_token(created.secret, session=session)
    assert tokens.token_state(token) == "active" and tokens.needs_touch(token)
    tokens.touch_token(token.id, session=session)
    assert not tokens.needs_touch(session.get(ApiToken, token.id))


def test_only_admins_create_or_revoke_tokens(session):
    created = tokens.create_token(session=session, actor=as_actor(), role="device", label="phone")
    for role in ("viewer", "curator", "operator"):
        with pytest.raises(PermissionDeniedError, match=f"The role '{role}' may not manage users"):
            tokens.create_token(session=session, actor=as_actor("x", role), role="admin", label="mine")
        with pytest.raises(PermissionDeniedError):
            tokens.revoke_token(created.token.id, session=session, actor=as_actor("x", role))
    assert tokens.token_state(session.get(ApiToken, created.token.id)) == "active"
