"""Commands for running and administering the service: tokens, users, the worker, init, serve."""

import os
import sys
import time

from core import users
from core.access import CLI_ACTOR as WHO
from core.access import USER_ROLES, Role
from core.config import REPO_ROOT, get_settings
from core.db import session_scope


def cmd_token(args) -> int:
    from core import tokens

    with session_scope() as session:
        if args.action == "create":
            created = tokens.create_token(
                session=session, actor=WHO, role=args.role, label=args.label, expires_days=args.expires_days
            )
            token = created.token
            until = f", expires {token.expires_at:%Y-%m-%d}" if token.expires_at else ""
            print(
                f"Token {token.id} for '{token.label}' (role {token.role}{until}). Copy it now, it is not shown again:"
            )
            print(created.secret)
            return 0
        if args.action == "revoke":
            token = tokens.revoke_token(args.id, session=session, actor=WHO)
            print(f"Token {token.id} ('{token.label}') is revoked.")
            return 0
        rows = tokens.list_tokens(session=session)
        states = [tokens.token_state(t) for t in rows]
    if not rows:
        print("No API tokens yet: python -m cli token create --role device --label NAME")
        return 0
    print(f"{'id':>4}  {'role':<9} {'state':<8} {'created':<17} {'last used':<17} {'expires':<11} label")
    for t, state in zip(rows, states, strict=True):
        used = f"{t.last_used_at:%Y-%m-%d %H:%M}" if t.last_used_at else "never"
        expires = f"{t.expires_at:%Y-%m-%d}" if t.expires_at else "never"
        print(f"{t.id:>4}  {t.role:<9} {state:<8} {t.created_at:%Y-%m-%d %H:%M} {used:<17} {expires:<11} {t.label}")
    return 0


def _read_password(args) -> str | None:
    """The password piped in with --password-stdin (first line), or None to generate one."""
    return sys.stdin.readline().rstrip("\r\n") if args.password_stdin else None


def cmd_user(args) -> int:
    with session_scope() as session:
        if args.action == "create":
            made = users.create_user(args.name, args.role, session=session, actor=WHO, password=_read_password(args))
        elif args.action == "reset-password":
            made = users.reset_password(args.name, session=session, actor=WHO, password=_read_password(args))
        elif args.action in ("deactivate", "activate"):
            user = users.set_active(args.name, args.action == "activate", session=session, actor=WHO)
            print(f"User '{user.name}' is {'active' if user.active else 'deactivated'}.")
            return 0
        elif args.action == "role":
            user = users.set_role(args.name, args.role, session=session, actor=WHO)
            print(f"User '{user.name}' is now {user.role}.")
            return 0
        else:
            rows = users.list_users(session=session)
    if args.action in ("create", "reset-password"):
        print(f"User '{made.user.name}' (role {made.user.role}).", end=" ")
        if args.password_stdin:
            print("Password set.")
        else:
            print("Password, shown once:")
            print(made.password)
        return 0
    if not rows:
        print("No users yet: python -m cli user create NAME --role viewer|curator|operator|admin")
        return 0
    print(f"{'name':<20} {'role':<9} {'state':<12} {'created':<17} last sign-in")
    for u in rows:
        last = f"{u.last_sign_in_at:%Y-%m-%d %H:%M}" if u.last_sign_in_at else "never"
        state = "active" if u.active else "deactivated"
        print(f"{u.name:<20} {u.role:<9} {state:<12} {u.created_at:%Y-%m-%d %H:%M} {last}")
    return 0


def cmd_worker(args) -> int:
    from jobs.worker import run_worker

    run_worker(workers=args.workers)
    return 0


def cmd_init(args) -> int:
    from core.db import get_engine

    get_engine()
    print(f"Database ready: {get_settings().db_url}")
    return 0


def cmd_serve(args) -> int:
    """`make run`: the database, one queue consumer and the web server."""
    import os
    import signal
    import subprocess

    from core.db import get_engine

    # A process started in the background by a script inherits SIGINT
    # ignored (and passes that on to its children): Ctrl-C, or a supervisor's
    # SIGINT, must still stop the server and its worker.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    get_engine()
    with session_scope() as session:
        first_password = users.ensure_first_admin(session=session)
    port, host = str(args.port), args.host
    # Set here too when it comes from `.env`, which uvicorn does not read.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FORWARDED_ALLOW_IPS": get_settings().forwarded_allow_ips}
    worker = subprocess.Popen([sys.executable, "-m", "cli", "worker"], env=env)
    # server.py is the dashboard with the HTTP API mounted at /api (one port).
    web = subprocess.Popen(
        [
            sys.executable, "-m", "streamlit", "run", str(REPO_ROOT / "server.py"),
            "--server.port", port, "--server.address", host,
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
        ],
        env=env,
    )  # fmt: skip
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0") else host
    print(f"\n  Training dashboard: open http://{shown}:{port} in your browser", flush=True)
    print(f"  HTTP API for phones: http://{shown}:{port}/api/ (docs at /api/docs)", flush=True)
    if first_password:
        # Only its hash is stored. `python -m cli user reset-password admin` makes a new one.
        saved = users.save_first_password(first_password)
        print(f"  First run: sign in as '{users.FIRST_ADMIN}' with the password in {saved}", flush=True)
        print("  (readable only by you; delete it once you have signed in)", flush=True)
    print(f"  Data folder: {get_settings().data_dir}   (Ctrl-C stops the server and the worker)\n", flush=True)
    try:
        while worker.poll() is None and web.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for proc in (web, worker):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in (web, worker):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


def add_commands(sub) -> None:
    """Register this group's commands on the `python -m cli` parser."""
    sub.add_parser("init", help="create the database").set_defaults(func=cmd_init)
    p = sub.add_parser("serve", help="run the web server and a queue consumer (what `make run` does)")
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8501")))
    p.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("token", help="create, list or revoke HTTP API tokens")
    token_sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = token_sub.add_parser("create", help="a new token; its secret is shown once")
    t.add_argument("--role", required=True, choices=[r.value for r in Role])
    t.add_argument("--label", required=True, help="who or what uses it")
    t.add_argument("--expires-days", type=float, help="default: never expires")
    token_sub.add_parser("list", help="all tokens (never their secrets)")
    t = token_sub.add_parser("revoke", help="revoke a token for good")
    t.add_argument("id", type=int)
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("user", help="dashboard users: create, list, reset a password, change a role, (de)activate")
    user_sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    roles = [r.value for r in USER_ROLES]
    u = user_sub.add_parser("create", help="a new user; prints a generated password unless --password-stdin")
    u.add_argument("name")
    u.add_argument("--role", required=True, choices=roles)
    u.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    u = user_sub.add_parser("reset-password", help="a new password; prints a generated one unless --password-stdin")
    u.add_argument("name")
    u.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    u = user_sub.add_parser("role", help="give a user another role")
    u.add_argument("name")
    u.add_argument("role", choices=roles)
    for name, text in (("deactivate", "the user can no longer sign in"), ("activate", "undo a deactivation")):
        user_sub.add_parser(name, help=text).add_argument("name")
    user_sub.add_parser("list", help="all users (never their passwords)")
    p.set_defaults(func=cmd_user)

    p = sub.add_parser("worker", help="run a queue consumer (training jobs)")
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(func=cmd_worker)
