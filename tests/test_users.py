"""Dashboard users (core/users.py): password hashing, sign-in and its slow-down, the first admin, the CLI."""

import subprocess
from datetime import timedelta

import pytest
from sqlmodel import select

from core import users
from core.errors import ConflictError, PermissionDeniedError, UserError
from core.models import SignInThrottle, User, utcnow
from tests.factories import add_user, as_actor
from tests.servers import run_cli


def test_passwords_are_stored_as_salted_scrypt_hashes():
    first, second = users.hash_password("s3cret pass"), users.hash_password("s3cret pass")
    assert first != second  # a random salt each time
    assert first.startswith("scrypt$16384$8$1$") and "s3cret" not in first
    assert users.verify_password("s3cret pass", first) and users.verify_password("s3cret pass", second)
    assert not users.verify_password("s3cret pasS", first)
    assert not users.verify_password("s3cret pass", "sha256$abc")


def test_sign_in_checks_name_password_and_active_state(session):
    add_user(session, "ana", "curator", password="right password")
    outcome = users.sign_in("ana", "right password", session=session)
    assert (outcome.ok, outcome.name, outcome.role) == (True, "ana", "curator")
    assert session.exec(select(User)).one().last_sign_in_at is not None
    assert users.sign_in("ana", "wrong password", session=session).message == "Wrong user name or password."
    assert users.sign_in("nobody", "right password", session=session).message == "Wrong user name or password."
    users.set_active("ana", False, session=session, actor=as_actor())
    assert "deactivated" in users.sign_in("ana", "right password", session=session).message


def test_repeated_failed_sign_ins_wait_longer_each_time(session):
    add_user(session, "ana", "viewer", password="right password")
    for _ in range(users.FREE_FAILURES):
        assert "wait" not in users.sign_in("ana", "guess", session=session, client="10.0.0.7").message
    assert "wait 1 s" in users.sign_in("ana", "guess", session=session, client="10.0.0.7").message
    # While the wait runs even the right password is not checked.
    blocked = users.sign_in("ana", "right password", session=session, client="10.0.0.8")
    assert not blocked.ok and "Too many failed sign-ins: wait" in blocked.message
    for row in session.exec(select(SignInThrottle)):
        row.blocked_until = utcnow() - timedelta(seconds=1)
    assert "wait 2 s" in users.sign_in("ana", "guess", session=session, client="10.0.0.7").message
    assert users.sign_in_wait("ANA", session=session) > 0  # names are matched case-insensitively
    # The client address is throttled too, whatever name it tries.
    assert users.sign_in_wait("bea", "10.0.0.7", session=session) > 0
    for row in session.exec(select(SignInThrottle)):
        row.blocked_until = None
    assert users.sign_in("ana", "right password", session=session, client="10.0.0.7").ok
    assert session.exec(select(SignInThrottle)).all() == []  # a success forgets the failures


def test_the_wait_is_capped(session):
    session.add(SignInThrottle(key="name:ana", failures=40))
    session.flush()
    users.sign_in("ana", "guess", session=session)
    assert users.sign_in_wait("ana", session=session) <= users.MAX_WAIT.total_seconds()


def test_fifty_failures_for_one_name_are_still_recorded_and_wait_at_most_the_cap(session):
    # 2**47 seconds used to overflow timedelta: the failure went unrecorded and guessing was unlimited.
    session.add(SignInThrottle(key="name:ana", failures=50))
    session.flush()
    outcome = users.sign_in("ana", "guess", session=session, client="10.0.0.7")
    assert "wait 15 min" in outcome.message
    row = session.exec(select(SignInThrottle).where(SignInThrottle.key == "name:ana")).one()
    assert row.failures == 51
    assert users.sign_in_wait("ana", session=session) == pytest.approx(users.MAX_WAIT.total_seconds(), abs=5)
    assert users.failure_wait(10**6) == users.MAX_WAIT


def test_failures_from_an_unknown_address_share_one_budget_across_names(session):
    # Streamlit gives no address for 127.0.0.1 (and for an untrusted proxy's
    # users); 12 wrong passwords over 6 names used to get no wait at all.
    add_user(session, "ana", "viewer", password="right password")
    messages = [
        users.sign_in(f"name{i % 6}", "guess", session=session).message for i in range(users.UNKNOWN_FREE_FAILURES + 1)
    ]
    assert all("wait" not in m for m in messages[:-1]) and "wait 1 s" in messages[-1]
    blocked = users.sign_in("ana", "right password", session=session)
    assert not blocked.ok and "Too many failed sign-ins" in blocked.message
    # A known address has its own budget, and a success does not reset the shared one.
    assert users.sign_in("ana", "right password", session=session, client="10.0.0.9").ok
    assert users.sign_in_wait("bea", None, session=session) > 0


def test_failures_are_forgotten_after_a_quiet_hour(session):
    session.add(SignInThrottle(key="name:ana", failures=30, last_failure_at=utcnow() - timedelta(hours=2)))
    session.flush()
    assert "wait" not in users.sign_in("ana", "guess", session=session, client="10.0.0.7").message
    assert session.exec(select(SignInThrottle).where(SignInThrottle.key == "name:ana")).one().failures == 1


def test_first_admin_is_created_once_on_an_empty_install(session):
    password = users.ensure_first_admin(session=session)
    assert password and users.sign_in("admin", password, session=session).role == "admin"
    assert users.ensure_first_admin(session=session) is None


def test_only_admins_manage_users_and_the_last_admin_stays(session):
    add_user(session, "root", "admin")
    for role in ("viewer", "curator", "operator"):
        with pytest.raises(PermissionDeniedError, match="may not manage users"):
            users.create_user("x", "viewer", session=session, actor=as_actor("x", role))
        with pytest.raises(PermissionDeniedError):
            users.reset_password("root", session=session, actor=as_actor("x", role))
    with pytest.raises(ConflictError, match="last active admin"):
        users.set_role("root", "viewer", session=session, actor=as_actor())
    with pytest.raises(ConflictError, match="last active admin"):
        users.set_active("root", False, session=session, actor=as_actor())
    with pytest.raises(UserError, match="Unknown role 'device'"):
        users.create_user("phone", "device", session=session, actor=as_actor())
    with pytest.raises(UserError, match="at least 8 characters"):
        users.create_user("bea", "viewer", session=session, actor=as_actor(), password="short")
    with pytest.raises(ConflictError, match="already exists"):
        users.create_user("root", "viewer", session=session, actor=as_actor())


def _cli(data_dir, *args, stdin: str | None = None) -> subprocess.CompletedProcess:
    # A bare environment: what the command needs comes from DATA_DIR alone.
    env = {"PATH": "/usr/bin:/bin", "DATA_DIR": str(data_dir), "HOME": str(data_dir)}
    return run_cli(*args, check=False, stdin=stdin, env=env, timeout=120)


def test_cli_creates_users_resets_passwords_and_lists_them(data_dir, session):
    created = _cli(data_dir, "user", "create", "ana", "--role", "operator")
    assert created.returncode == 0, created.stderr
    assert "User 'ana' (role operator). Password, shown once:" in created.stdout
    password = created.stdout.strip().splitlines()[-1]
    assert users.sign_in("ana", password, session=session).ok
    session.commit()  # sign-in writes; release SQLite's lock for the next command

    piped = _cli(data_dir, "user", "reset-password", "ana", "--password-stdin", stdin="a chosen password\n")
    assert piped.returncode == 0 and "Password set." in piped.stdout and "a chosen" not in piped.stdout
    session.expire_all()
    assert users.sign_in("ana", "a chosen password", session=session).ok
    session.commit()

    listed = _cli(data_dir, "user", "list")
    assert "ana" in listed.stdout and "operator" in listed.stdout and "active" in listed.stdout
    refused = _cli(data_dir, "user", "create", "ana", "--role", "viewer")
    assert refused.returncode == 2 and "already exists" in refused.stderr


def test_a_user_name_longer_than_its_bound_is_refused_and_nobody_is_created(session):
    with pytest.raises(UserError, match="A user name can be at most 64 characters"):
        users.create_user("x" * 65, "viewer", session=session, actor=as_actor())
    assert session.exec(select(User)).first() is None
