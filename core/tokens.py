"""API tokens: random secrets shown once, stored as SHA-256, revocable."""

from dataclasses import dataclass
from datetime import timedelta

from sqlmodel import Session, col, select

from core.access import Actor, Permission, parse_role, require
from core.audit import record_audit
from core.errors import AuthenticationError, NotFoundError, UserError, bounded_text
from core.hashed_secrets import hash_secret, new_secret
from core.models import ApiToken, as_utc, utcnow

PREFIX = "tdb_"
# last_used_at is written at most this often per token, so reads stay reads.
TOUCH_INTERVAL = timedelta(minutes=1)


@dataclass(frozen=True)
class CreatedToken:
    token: ApiToken
    # The only time the secret exists outside the caller's hands.
    secret: str


def create_token(
    *, session: Session, actor: Actor, role: str, label: str, expires_days: float | None = None
) -> CreatedToken:
    """A new token for `role`; the returned secret is not stored anywhere."""
    require(actor, Permission.manage_users)
    role = parse_role(role)
    label = bounded_text(label, "A token label", 100)
    if not label:
        raise UserError("A token needs a label (who or what uses it, e.g. 'pixel-7 of Ana')")
    if expires_days is not None and expires_days <= 0:
        raise UserError(f"--expires-days must be positive (got {expires_days:g})")
    secret, digest = new_secret(PREFIX)
    token = ApiToken(
        label=label,
        role=role.value,
        token_hash=digest,
        expires_at=utcnow() + timedelta(days=expires_days) if expires_days else None,
    )
    session.add(token)
    session.flush()
    record_audit(
        "token.create",
        session=session,
        actor=actor,
        target=f"token:{token.id}",
        after={
            "label": token.label,
            "role": token.role,
            "expires_at": token.expires_at and token.expires_at.isoformat(),
        },
    )
    return CreatedToken(token, secret)


def verify_token(secret: str, *, session: Session) -> ApiToken:
    """The live token whose secret this is; AuthenticationError otherwise."""
    token = session.exec(select(ApiToken).where(ApiToken.token_hash == hash_secret(secret.strip()))).first()
    if token is None:
        raise AuthenticationError("Unknown API token: check it, or create one with `python -m cli token create`")
    return check_live(token)


def check_live(token: ApiToken) -> ApiToken:
    """`token` if it is neither revoked nor expired now; AuthenticationError otherwise."""
    if token_state(token) != "active":
        # Whoever holds a dead token learns nothing about whose it was.
        raise AuthenticationError("This API token is revoked or expired: ask for a new one")
    return token


def needs_touch(token: ApiToken) -> bool:
    last = as_utc(token.last_used_at)
    return last is None or utcnow() - last >= TOUCH_INTERVAL


def touch_token(token_id: int, *, session: Session) -> None:
    """Record that the token was just used."""
    token = session.get(ApiToken, token_id)
    if token is not None:
        token.last_used_at = utcnow()
        session.add(token)
        session.flush()


def revoke_token(token_id: int, *, session: Session, actor: Actor) -> ApiToken:
    """Revoke a token for good (revoking twice is harmless)."""
    require(actor, Permission.manage_users)
    token = session.get(ApiToken, token_id)
    if token is None:
        raise NotFoundError(f"No API token with id {token_id}; `python -m cli token list` shows them")
    if token.revoked_at is None:
        before = token_state(token)
        token.revoked_at = utcnow()
        session.add(token)
        record_audit(
            "token.revoke",
            session=session,
            actor=actor,
            target=f"token:{token.id}",
            before={"state": before},
            after={"state": "revoked", "label": token.label},
        )
        session.flush()
    return token


def list_tokens(*, session: Session) -> list[ApiToken]:
    """All tokens, newest first (revoked and expired ones included)."""
    return list(session.exec(select(ApiToken).order_by(col(ApiToken.id).desc())))


def token_state(token: ApiToken) -> str:
    """`active`, `revoked` or `expired`."""
    if token.revoked_at is not None:
        return "revoked"
    expires = as_utc(token.expires_at)
    return "expired" if expires is not None and expires <= utcnow() else "active"
