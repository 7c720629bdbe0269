"""Browser sessions: who a browser is signed in as, across reloads and tabs.

The sign-in form (a Streamlit page) cannot set a cookie: it runs over a
websocket, not an HTTP response. So a successful sign-in starts a session
with a one-time *ticket*; the browser takes the ticket to an HTTP route
(`/session/start`) that exchanges it for the session *token* and sets that as
an HttpOnly cookie. Every page run and every `/media` request then looks the
token up here: a session is good until it expires (`SESSION_HOURS`), its user
signs out (every tab), or an admin deactivates the user or resets their
password (every browser of theirs).

Tickets and tokens are random 256-bit secrets stored as SHA-256 (like API
tokens): what the table holds cannot be replayed.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, or_
from sqlmodel import Session, col, select, update

from core.config import get_settings
from core.hashed_secrets import hash_secret, new_secret
from core.models import BrowserSession, User, as_utc, utcnow

COOKIE_NAME = "dashboard_session"
# The sign-in page hands the ticket straight to the browser: a minute is plenty.
TICKET_LIFETIME = timedelta(minutes=1)


@dataclass(frozen=True)
class SessionCookie:
    """What `/session/start` puts in the browser."""

    token: str
    expires_at: datetime


def start_session(user_id: int, *, session: Session) -> str:
    """A new session for a user who just proved their password; returns its
    one-time ticket (exchange it with `claim_ticket` within a minute)."""
    ticket, ticket_hash = new_secret()
    now = utcnow()
    # Ended sessions are of no further use: the table keeps live ones only.
    session.exec(
        delete(BrowserSession).where(
            or_(col(BrowserSession.expires_at) <= now, col(BrowserSession.revoked_at).is_not(None))
        )
    )
    session.add(
        BrowserSession(
            user_id=user_id,
            ticket_hash=ticket_hash,
            created_at=now,
            expires_at=now + timedelta(hours=get_settings().session_hours),
        )
    )
    session.flush()
    return ticket


def claim_ticket(ticket: str, *, session: Session) -> SessionCookie | None:
    """The session token for a ticket, once: None for an unknown, used or
    stale ticket, or one whose user has been deactivated since."""
    row = session.exec(select(BrowserSession).where(BrowserSession.ticket_hash == hash_secret(ticket))).first()
    if row is None:
        return None
    row.ticket_hash = None
    session.add(row)
    now = utcnow()
    if row.revoked_at is not None or as_utc(row.created_at) + TICKET_LIFETIME < now or _user(row, session) is None:
        return None
    token, row.token_hash = new_secret()
    session.flush()
    return SessionCookie(token, as_utc(row.expires_at))


def session_user(token: str | None, *, session: Session) -> User | None:
    """The active user a session token stands for, or None when the token is
    unknown, expired or revoked (or its user deactivated)."""
    if not token:
        return None
    row = session.exec(select(BrowserSession).where(BrowserSession.token_hash == hash_secret(token))).first()
    if row is None or row.revoked_at is not None or as_utc(row.expires_at) <= utcnow():
        return None
    return _user(row, session)


def _user(row: BrowserSession, session: Session) -> User | None:
    user = session.get(User, row.user_id)
    return user if user is not None and user.active else None


def end_session(token: str | None, *, session: Session) -> None:
    """Sign out: the session stops working in every tab that shares it."""
    if token:
        session.exec(
            update(BrowserSession)
            .where(col(BrowserSession.token_hash) == hash_secret(token), col(BrowserSession.revoked_at).is_(None))
            .values(revoked_at=utcnow())
        )


def end_user_sessions(user_id: int, *, session: Session) -> int:
    """Sign a user out of every browser (deactivation, password reset);
    returns how many sessions were still open."""
    now = utcnow()
    result = session.exec(
        update(BrowserSession)
        .where(
            col(BrowserSession.user_id) == user_id,
            col(BrowserSession.revoked_at).is_(None),
            col(BrowserSession.expires_at) > now,
        )
        .values(revoked_at=now)
    )
    return result.rowcount
