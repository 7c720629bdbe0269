"""API tokens and the role table (core/tokens.py, core/access.py)."""

import hashlib
from datetime import timedelta

import pytest
from sqlmodel import select

from core import tokens
from core.access import Permission, Role, allows, check_permission
from core.errors import AuthenticationError, NotFoundError, PermissionDeniedError, UserError
from core.models import ApiToken, utcnow


def test_only_the_hash_of_a_secret_is_stored(session):
    created = tokens.create_token(session=session, role="device", label="pixel-7")
    session.commit()
    row = session.exec(select(ApiToken)).one()
    assert row.token_hash == hashlib.sha256(created.secret.encode()).hexdigest()
    assert created.secret not in str(row.model_dump())
    assert tokens.verify_token(created.secret, session=session).id == row.id


def test_revoked_and_expired_tokens_do_not_verify(session):
    revoked = tokens.create_token(session=session, role="viewer", label="old")
    tokens.revoke_token(revoked.token.id, session=session)
    with pytest.raises(AuthenticationError, match="was revoked"):
        tokens.verify_token(revoked.secret, session=session)
    expired = tokens.create_token(session=session, role="viewer", label="short", expires_days=1)
    expired.token.expires_at = utcnow() - timedelta(seconds=1)
    with pytest.raises(AuthenticationError, match="expired on"):
        tokens.verify_token(expired.secret, session=session)
    assert [tokens.token_state(t) for t in tokens.list_tokens(session=session)] == ["expired", "revoked"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"role": "root", "label": "x"}, "Unknown role 'root': use one of device, viewer, operator, admin"),
        ({"role": "viewer", "label": "  "}, "A token needs a label"),
        ({"role": "viewer", "label": "x", "expires_days": 0}, "--expires-days must be positive"),
    ],
)
def test_bad_token_requests_say_what_to_fix(session, kwargs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        tokens.create_token(session=session, **kwargs)


def test_revoking_an_unknown_token_is_not_found(session):
    with pytest.raises(NotFoundError, match="No API token with id 7"):
        tokens.revoke_token(7, session=session)


def test_roles_match_the_issue():
    assert {p for p in Permission if allows("device", p)} == {Permission.read, Permission.upload_images}
    assert {p for p in Permission if allows("viewer", p)} == {Permission.read}
    assert {p for p in Permission if allows("operator", p)} == {Permission.read, Permission.train}
    assert {p for p in Permission if allows("admin", p)} == set(Permission)
    with pytest.raises(PermissionDeniedError, match="The role 'viewer' may not train; roles that may: operator, admin"):
        check_permission(Role.viewer, Permission.train)
