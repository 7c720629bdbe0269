"""Dashboard users: salted scrypt passwords, roles, sign-in with a growing wait
after repeated failures, and the first admin of a new install."""

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlmodel import Session, col, select

from core.access import USER_ROLES, Actor, Permission, parse_role, require
from core.audit import record_audit
from core.config import get_settings
from core.errors import ConflictError, NotFoundError, UserError, bounded_text
from core.models import SignInThrottle, User, as_utc, utcnow
from core.sessions import end_user_sessions

# scrypt cost: 16 MiB of memory and ~50 ms per hash; stored with each hash so it can grow.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
MIN_PASSWORD_LENGTH = 8
# Failed sign-ins allowed before waits start; then 1, 2, 4, ... seconds, at most 15 minutes.
FREE_FAILURES = 3
MAX_WAIT = timedelta(minutes=15)
# 2**10 s is already over MAX_WAIT; a larger exponent only risks an OverflowError.
MAX_EXPONENT = 10
# Sign-ins whose address is unknown (local, or behind a proxy that is not
# trusted: FORWARDED_ALLOW_IPS) share one budget, so guessing over many names
# is still slowed down; it allows more failures since several people may share it.
UNKNOWN_CLIENT = "client:unknown"
UNKNOWN_FREE_FAILURES = 10
# A key's failures are forgotten after this long without a new one, so the
# shared budget does not end up waiting after every slip.
FAILURE_MEMORY = timedelta(hours=1)
FIRST_ADMIN = "admin"
FIRST_PASSWORD_FILE = "first_admin_password.txt"


def hash_password(password: str) -> str:
    """A salted scrypt hash, with its parameters: `scrypt$n$r$p$salt$hash`."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    """Whether `password` matches `stored` (compared in constant time)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    candidate = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p))
    return hmac.compare_digest(candidate, bytes.fromhex(digest))


def generate_password() -> str:
    return secrets.token_urlsafe(12)


def _check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"A password needs at least {MIN_PASSWORD_LENGTH} characters")
    return password


def get_user(name: str, *, session: Session) -> User:
    user = session.exec(select(User).where(User.name == name.strip())).first()
    if user is None:
        raise NotFoundError(f"No user called '{name.strip()}'; `python -m cli user list` shows them")
    return user


def list_users(*, session: Session) -> list[User]:
    return list(session.exec(select(User).order_by(col(User.name))))


@dataclass(frozen=True)
class NewPassword:
    user: User
    # Shown once to whoever created or reset it; only its hash is stored.
    password: str


def create_user(name: str, role: str, *, session: Session, actor: Actor, password: str | None = None) -> NewPassword:
    """A new user; without `password` a random one is generated (and returned)."""
    require(actor, Permission.manage_users)
    clean = bounded_text(name, "A user name", 64)
    if not clean:
        raise UserError("A user needs a name")
    role = parse_role(role, USER_ROLES)
    if session.exec(select(User).where(User.name == clean)).first():
        raise ConflictError(f"A user called '{clean}' already exists")
    password = _check_password(password) if password is not None else generate_password()
    user = User(name=clean, role=role.value, password_hash=hash_password(password))
    session.add(user)
    session.flush()
    record_audit("user.create", session=session, actor=actor, target=f"user:{clean}", after={"role": role.value})
    return NewPassword(user, password)


def set_role(name: str, role: str, *, session: Session, actor: Actor) -> User:
    """Give a user another role."""
    require(actor, Permission.manage_users)
    user = get_user(name, session=session)
    role = parse_role(role, USER_ROLES)
    before = user.role
    if before != role.value:
        _keep_an_admin(user, session=session, change=f"make '{user.name}' {role.value}")
        user.role = role.value
        session.add(user)
        record_audit(
            "user.role",
            session=session,
            actor=actor,
            target=f"user:{user.name}",
            before={"role": before},
            after={"role": role.value},
        )
    return user


def reset_password(name: str, *, session: Session, actor: Actor, password: str | None = None) -> NewPassword:
    """A new password (random unless given); the old one stops working at
    once and the user is signed out of every browser."""
    require(actor, Permission.manage_users)
    user = get_user(name, session=session)
    password = _check_password(password) if password is not None else generate_password()
    user.password_hash = hash_password(password)
    session.add(user)
    # Whoever knew the old password may be signed in somewhere: sign them out.
    end_user_sessions(user.id, session=session)
    record_audit("user.password", session=session, actor=actor, target=f"user:{user.name}")
    return NewPassword(user, password)


def set_active(name: str, active: bool, *, session: Session, actor: Actor) -> User:
    """Deactivate a user (signed out everywhere, they cannot sign in; their
    name stays in the records) or activate them again."""
    require(actor, Permission.manage_users)
    user = get_user(name, session=session)
    if user.active != active:
        if not active:
            _keep_an_admin(user, session=session, change=f"deactivate '{user.name}'")
        user.active = active
        session.add(user)
        if not active:
            end_user_sessions(user.id, session=session)
        record_audit(
            "user.activate" if active else "user.deactivate",
            session=session,
            actor=actor,
            target=f"user:{user.name}",
            before={"active": not active},
            after={"active": active},
        )
    return user


def _keep_an_admin(user: User, *, session: Session, change: str) -> None:
    if user.role != "admin" or not user.active:
        return
    admins = session.exec(select(User).where(User.role == "admin", User.active)).all()
    if len(admins) <= 1:
        raise ConflictError(f"Cannot {change}: it is the last active admin")


def ensure_first_admin(*, session: Session) -> str | None:
    """On an install without users, create `admin` with a random password and
    return that password (to print once); None when users exist."""
    if session.exec(select(User)).first() is not None:
        return None
    system = Actor("setup", "admin")
    return create_user(FIRST_ADMIN, "admin", session=session, actor=system).password


def save_first_password(password: str) -> Path:
    """Write the first admin's password to a file only the server's user may
    read (0600) and return its path: a console or a log that captures stdout
    is read by more people than the person installing."""
    path = get_settings().data_dir / FIRST_PASSWORD_FILE
    path.unlink(missing_ok=True)
    # Created with its final mode: no moment when the file is readable by others.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(password + "\n")
    return path


# --- sign-in ------------------------------------------------------------------


@dataclass(frozen=True)
class SignIn:
    """The outcome of a sign-in: the user (plain values, safe to keep in a UI
    session) or the message to show."""

    user_id: int | None = None
    name: str = ""
    role: str = ""
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.user_id is not None


def _throttle_keys(name: str, client: str | None) -> list[str]:
    return [f"name:{name.strip().lower()}", f"client:{client}" if client else UNKNOWN_CLIENT]


def failure_wait(failures: int, free: int = FREE_FAILURES) -> timedelta:
    """The wait after `failures` failed sign-ins: none for the first `free`,
    then 1, 2, 4, ... seconds, never more than MAX_WAIT."""
    if failures <= free:
        return timedelta(0)
    return min(timedelta(seconds=2 ** min(failures - free - 1, MAX_EXPONENT)), MAX_WAIT)


def sign_in_wait(name: str, client: str | None = None, *, session: Session) -> float:
    """Seconds to wait before the next sign-in attempt for this name or client may be checked."""
    now = utcnow()
    rows = session.exec(select(SignInThrottle).where(col(SignInThrottle.key).in_(_throttle_keys(name, client)))).all()
    waits = [(as_utc(r.blocked_until) - now).total_seconds() for r in rows if r.blocked_until is not None]
    return max([0.0, *waits])


def _wait_text(seconds: float) -> str:
    seconds = max(1, round(seconds + 0.49))
    return f"{seconds} s" if seconds < 120 else f"{round(seconds / 60)} min"


def sign_in(name: str, password: str, *, session: Session, client: str | None = None) -> SignIn:
    """Check a name and password. Each failure is recorded (commit the session
    either way); after FREE_FAILURES the next try must wait 1, 2, 4, ... seconds."""
    wait = sign_in_wait(name, client, session=session)
    if wait > 0:
        return SignIn(message=f"Too many failed sign-ins: wait {_wait_text(wait)} before trying again.")
    user = session.exec(select(User).where(User.name == name.strip())).first()
    # An unknown name costs a hash too, so timing does not tell which names exist.
    stored = user.password_hash if user else hash_password("")
    if verify_password(password, stored) and user is not None and user.active:
        # The shared budget is not reset: anyone with an account could otherwise clear it for a guesser.
        forget = [key for key in _throttle_keys(name, client) if key != UNKNOWN_CLIENT]
        for row in session.exec(select(SignInThrottle).where(col(SignInThrottle.key).in_(forget))):
            session.delete(row)
        user.last_sign_in_at = utcnow()
        session.add(user)
        session.flush()
        return SignIn(user.id, user.name, user.role)
    wait = _record_failure(name, client, session=session)
    message = "Wrong user name or password."
    if user is not None and not user.active and verify_password(password, stored):
        message = f"The user '{user.name}' is deactivated: ask an admin."
    if wait > 0:
        message += f" Too many failed sign-ins: wait {_wait_text(wait)} before trying again."
    return SignIn(message=message)


def _record_failure(name: str, client: str | None, *, session: Session) -> float:
    now, longest = utcnow(), 0.0
    for key in _throttle_keys(name, client):
        row = session.exec(select(SignInThrottle).where(SignInThrottle.key == key)).first() or SignInThrottle(key=key)
        if row.last_failure_at is not None and now - as_utc(row.last_failure_at) > FAILURE_MEMORY:
            row.failures = 0
        row.failures += 1
        row.last_failure_at = now
        wait = failure_wait(row.failures, UNKNOWN_FREE_FAILURES if key == UNKNOWN_CLIENT else FREE_FAILURES)
        if wait:
            row.blocked_until = now + wait
            longest = max(longest, wait.total_seconds())
        session.add(row)
    session.flush()
    return longest
