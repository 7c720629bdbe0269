"""Command line: `python -m core COMMAND`. Everything the dashboard does, headless.

This is an edge like the pages and the API: it imports `jobs` (and so Huey)
for the commands that touch the queue; the core library itself never does.
"""

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from sqlmodel import col, select

from core import automation, duplicates, registry, review, stats, suspects, training, uploads, users
from core.access import CLI_ACTOR, USER_ROLES, Role
from core.config import REPO_ROOT, get_settings
from core.db import read_session, session_scope
from core.errors import UserError
from core.models import FINISHED_STATUSES, Automation, Category, ImageStatus, RoundStatus, TrainingImage

# The command line runs where the database is: it acts as a local admin, recorded as "cli".
WHO = CLI_ACTOR


def cmd_demo(args) -> int:
    status = ImageStatus.pending if args.pending else ImageStatus.validated
    with session_scope() as session:
        report = uploads.load_demo(
            session=session, actor=WHO, per_category=args.per_category, size=args.size, status=status
        )
    print(f"Demo dataset: {report.summary()} ({status.value}).")
    return 0


def cmd_import(args) -> int:
    status = ImageStatus.validated if args.validated else ImageStatus.pending
    with session_scope() as session:
        report = uploads.import_directory(Path(args.folder), session=session, actor=WHO, status=status)
    print(f"Imported from {args.folder}: {report.summary()} ({status.value}).")
    for result in report.refused:
        print(f"  refused {result.reason}")
    return 0


def cmd_images(args) -> int:
    with session_scope() as session:
        query = select(TrainingImage, Category.name).join(Category).order_by(col(TrainingImage.id).desc())
        if args.status:
            query = query.where(TrainingImage.status == ImageStatus(args.status))
        rows = session.exec(query.limit(args.limit)).all()
        print(f"{'id':>6}  {'status':<10} {'category':<16} {'source':<7} {'size':>9}  file")
        for image, name in rows:
            size = f"{image.width}x{image.height}"
            print(
                f"{image.id:>6}  {image.status.value:<10} {name:<16} {image.source.value:<7} {size:>9}  {image.original_filename}"
            )
        counts = review.status_counts(session=session)
    print("Totals: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def cmd_review(args) -> int:
    with session_scope() as session:
        if args.command == "relabel":
            n = review.relabel_images(args.ids, args.category, session=session, actor=WHO)
        else:
            status = {"validate": ImageStatus.validated, "reject": ImageStatus.rejected}[args.command]
            n = review.set_status(args.ids, status, session=session, actor=WHO)
    print(f"{args.command}: {n} image(s) updated.")
    return 0


def cmd_suspects(args) -> int:
    if args.action:
        if not args.ids:
            raise UserError(f"Name the images: python -m core suspects {args.action} IMAGE_ID...")
        with session_scope() as session:
            done = [suspects.resolve(i, args.action, session=session, actor=WHO) for i in args.ids]
        for row in done:
            print(f"image {row.image_id}: {row.resolution} ({row.given_label} -> {row.suggested_label})")
        return 0
    with session_scope() as session:
        rows = suspects.list_suspects(session=session, limit=args.limit, include_resolved=args.all)
        total = suspects.count_suspects(session=session, include_resolved=args.all)
    if not rows:
        print("No suspected mislabels: they are scored after each completed training round.")
        return 0
    print(f"{'id':>6}  {'given -> suggested':<28} {'p(given)':>8} {'margin':>7}  {'version':<8} {'decision':<9} file")
    for s in rows:
        change = f"{s.row.given_label} -> {s.row.suggested_label}"
        print(
            f"{s.image.id:>6}  {change:<28} {s.row.given_probability:>8.3f} {s.row.margin:>7.3f}  "
            f"{s.row.model_version:<8} {s.row.resolution or 'open':<9} {s.image.original_filename}"
        )
    print(f"{len(rows)} of {total} shown, most likely mislabelled first.")
    return 0


def cmd_duplicates(args) -> int:
    if args.validate or args.reject:
        return _act_on_cluster(args)
    with session_scope() as session:
        groups = duplicates.clusters(session=session)
        if not groups:
            print("No look-alikes among the images that are not rejected.")
            return 0
        for n, ids in enumerate(groups, start=1):
            print(f"cluster {n}: {len(ids)} images")
            for image, name in duplicates.labelled_images(ids, session=session):
                print(f"  {image.id:>6}  {image.status.value:<10} {name:<16} {image.original_filename}")
    sizes = ", ".join(str(len(ids)) for ids in groups)
    print(
        f"{len(groups)} cluster(s) of {sizes} images; act on one with `python -m core duplicates --validate|--reject N`."
    )
    return 0


def _act_on_cluster(args) -> int:
    action, number = ("validate", args.validate) if args.validate else ("reject", args.reject)
    with session_scope() as session:
        groups = duplicates.clusters(session=session)
        if not 1 <= number <= len(groups):
            raise UserError(f"There is no cluster {number}: `python -m core duplicates` lists {len(groups)}")
        ids = groups[number - 1]
        question = review.confirmation(action, len(ids))
        if question and args.yes != len(ids):
            answer = input(f"{question} Type {len(ids)} to confirm: ").strip()
            if answer != str(len(ids)):
                print(f"Nothing changed (cluster {number} has {len(ids)} images; --yes {len(ids)} confirms).")
                return 1
        status = ImageStatus.validated if action == "validate" else ImageStatus.rejected
        changed = review.set_status(ids, status, session=session, actor=WHO)
    print(f"{changed} image(s) of cluster {number} {status.value}.")
    return 0


def cmd_categories(args) -> int:
    with session_scope() as session:
        if args.add:
            review.add_category(args.add, session=session, actor=WHO)
        if args.rename:
            review.rename_category(args.rename[0], args.rename[1], session=session, actor=WHO)
        counts = review.validated_counts(session=session)
    for name, n in counts.items():
        print(f"{name:<20} {n:>6} validated")
    return 0


def _train_params(args) -> dict:
    names = (
        "epochs",
        "batch_size",
        "learning_rate",
        "architecture",
        "image_size",
        "val_split",
        "seed",
        "training_mode",
        "processes",
        "budget_minutes",
    )
    params = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.use_existing_model is not None:
        params["use_existing_model"] = args.use_existing_model
    return params


def cmd_train(args) -> int:
    from jobs import submit_training

    round_ = submit_training(_train_params(args), actor=WHO)
    print(f"Training job {round_.job_id} queued with {round_.total_images} images (round {round_.id}).")
    for warning in round_.warnings:
        print(f"  note: {warning}")
    if not args.wait:
        print(f"Follow it with: python -m core status {round_.job_id}")
        return 0
    return _wait(round_.job_id)


def _wait(job_id: str) -> int:
    last = None
    while True:
        with session_scope() as session:
            round_ = training.get_round(job_id, session=session)
            version = (
                registry.get_version_by_id(round_.model_version_id, session=session)
                if round_.model_version_id
                else None
            )
        line = (
            f"{round_.status.value}: epoch {round_.current_epoch}/{round_.parameters['epochs']}, {round_.progress:.0%}"
        )
        if line != last:
            print(line, flush=True)
            last = line
        if round_.status in FINISHED_STATUSES:
            break
        time.sleep(1)
    if round_.status == RoundStatus.completed:
        print(f"Model {version.version}: {_quality(version)}")
        return 0
    print(f"Job {round_.status.value}: {round_.error or ''}", file=sys.stderr)
    return 1


def _quality(version) -> str:
    return (
        f"test accuracy {stats.accuracy_text(version.metrics)}, "
        f"validation accuracy {stats.accuracy_text(version.metrics, 'val')}"
    )


def cmd_status(args) -> int:
    with session_scope() as session:
        round_ = training.get_round(args.job_id, session=session)
        metrics = training.epoch_metrics(round_.id, session=session)
        version = (
            registry.get_version_by_id(round_.model_version_id, session=session) if round_.model_version_id else None
        )
    print(f"Job {round_.job_id} (round {round_.id}): {round_.status.value}")
    print(f"  images {round_.total_images}, categories {round_.category_distribution}")
    print(
        f"  epoch {round_.current_epoch}/{round_.parameters['epochs']}, progress {round_.progress:.0%}, attempts {round_.attempts}"
    )
    if round_.device:
        print(f"  device {round_.device}")
    for m in metrics:
        print(
            f"  epoch {m.epoch:>3}: train loss {m.train_loss:.3f} acc {m.train_accuracy:5.1f}%  "
            f"val loss {m.val_loss:.3f} acc {m.val_accuracy:5.1f}%  ({m.seconds:.1f}s)"
        )
    if version:
        print(f"  model {version.version}: {_quality(version)}")
    for warning in round_.warnings:
        print(f"  warning: {warning}")
    if round_.error:
        print(f"  error: {round_.error}")
    for line in round_.history:
        print(f"  | {line}")
    return 0


def cmd_cancel(args) -> int:
    from jobs import cancel_training

    round_ = cancel_training(args.job_id, actor=WHO, keep_best=args.keep_best)
    asked = "stop requested: its best epoch so far becomes a version" if round_.stop_requested else "cancel requested"
    print(
        f"Job {round_.job_id}: {round_.status.value}"
        + (f" ({asked})" if round_.status == RoundStatus.in_progress else "")
    )
    return 0


def _automation_changes(args, current: Automation) -> dict:
    if args.off and (args.new_images is not None or args.schedule_hours is not None):
        raise UserError("--off switches both triggers off; leave it out to switch one on")
    changes = {}
    if args.off or args.no_new_images:
        changes["new_images_enabled"] = False
    if args.off or args.no_schedule:
        changes["schedule_enabled"] = False
    if args.new_images is not None:
        changes.update(new_images_enabled=True, new_images_threshold=args.new_images)
    if args.schedule_hours is not None:
        changes.update(schedule_enabled=True, schedule_hours=args.schedule_hours)
    if args.min_improvement is not None:
        changes["gate_min_improvement"] = args.min_improvement
    if args.max_category_drop is not None:
        changes["gate_max_category_drop"] = args.max_category_drop
    if args.min_test_images is not None:
        changes["gate_min_test_images"] = args.min_test_images
    params = _train_params(args)
    if args.default_parameters or params:
        changes["parameters"] = params if args.default_parameters else {**current.parameters, **params}
    return changes


def cmd_automation(args) -> int:
    with session_scope() as session:
        changes = _automation_changes(args, automation.get_automation(session=session))
        if changes:
            automation.update_automation(changes, session=session, actor=WHO)
    with read_session() as session:
        now = automation.state(session=session)
    if changes:
        print("Automatic retraining updated.")
    for line in now.lines():
        print(line)
    return 0


def cmd_versions(args) -> int:
    with session_scope() as session:
        versions = registry.list_versions(session=session)
    if not versions:
        print("No model versions yet: train one with `python -m core train`.")
        return 0
    print(f"{'version':<10} {'prod':<5} {'test accuracy (n; 95% CI)':<48} {'size MB':>8}  {'architecture':<20} classes")
    for v in versions:
        prod = "*" if v.is_production else ""
        print(
            f"{v.version:<10} {prod:<5} {stats.accuracy_text(v.metrics):<48} {v.metrics.get('model_size_mb', 0):>8.2f}  "
            f"{v.architecture:<20} {', '.join(v.classes)}"
        )
    return 0


def cmd_promote(args) -> int:
    with session_scope() as session:
        version = registry.promote(args.version, session=session, actor=WHO, reason=args.reason)
    print(f"Model {version.version} is now in production.")
    return 0


def cmd_rollback(args) -> int:
    with session_scope() as session:
        version = registry.rollback(session=session, actor=WHO)
    print(f"Rolled back: model {version.version} is in production again.")
    return 0


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
        print("No API tokens yet: python -m core token create --role device --label NAME")
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
        print("No users yet: python -m core user create NAME --role viewer|curator|operator|admin")
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

    get_engine()
    with session_scope() as session:
        first_password = users.ensure_first_admin(session=session)
    port, host = str(args.port), args.host
    # Set here too when it comes from `.env`, which uvicorn does not read.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FORWARDED_ALLOW_IPS": get_settings().forwarded_allow_ips}
    worker = subprocess.Popen([sys.executable, "-m", "core", "worker"], env=env)
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
        # Only its hash is stored. `python -m core user reset-password admin` makes a new one.
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


def _image_size(text: str) -> int | str:
    if text == training.AUTO or text.isdigit():
        return text if text == training.AUTO else int(text)
    raise argparse.ArgumentTypeError(f"must be a whole number of pixels or {training.AUTO!r} (got {text!r})")


def _add_training_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The training parameters as options (read back by `_train_params`)."""
    defaults = training.TrainingConfig()
    p.add_argument("--epochs", type=int, help=f"{prefix}default {defaults.epochs}")
    p.add_argument("--batch-size", type=int, help=f"{prefix}default {defaults.batch_size}")
    p.add_argument("--learning-rate", type=float, help=f"{prefix}default {defaults.learning_rate}")
    p.add_argument("--architecture", choices=training.ARCHITECTURES, help=f"{prefix}default {defaults.architecture}")
    p.add_argument(
        "--image-size",
        type=_image_size,
        help=f"{prefix}default {defaults.image_size}: the images' median short side, a multiple of 32 from 32 to 224",
    )
    p.add_argument("--val-split", type=float, help=f"{prefix}default {defaults.val_split}")
    p.add_argument("--seed", type=int, help=f"{prefix}default {defaults.seed}")
    p.add_argument(
        "--training-mode",
        choices=training.TRAINING_MODES,
        help=f"{prefix}default {defaults.training_mode}; head: train only the classifier on a frozen pretrained "
        "backbone; auto: search architecture, learning rate and image size within --budget-minutes, then train "
        "the best to the end",
    )
    p.add_argument(
        "--budget-minutes",
        type=float,
        metavar="N",
        help=f"{prefix}training mode auto only: minutes for the search and the final training "
        f"(default {training.AUTO_BUDGET_MINUTES:g}; fractions allowed)",
    )
    p.add_argument(
        "--processes",
        type=int,
        help=f"{prefix}default {defaults.processes}; train in N processes (PyTorch DDP), at most "
        f"MAX_TRAINING_PROCESSES ({get_settings().max_training_processes})",
    )
    p.add_argument("--use-existing-model", dest="use_existing_model", action="store_true", default=None)
    p.add_argument("--no-existing-model", dest="use_existing_model", action="store_false", help="train from scratch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core", description="Training dashboard, from the command line.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="load the demo dataset (5 categories x 60 drawn images, validated)")
    p.add_argument("--per-category", type=int, default=60)
    p.add_argument("--size", type=int, default=96, help="picture size in pixels (default 96)")
    p.add_argument("--pending", action="store_true", help="leave the images pending review")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("import", help="import DIR/<category>/<image> files")
    p.add_argument("folder")
    p.add_argument("--validated", action="store_true", help="mark the images validated (default: pending)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("images", help="list images")
    p.add_argument("--status", choices=[s.value for s in ImageStatus])
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_images)

    for name, text in (("validate", "mark images validated"), ("reject", "mark images rejected")):
        p = sub.add_parser(name, help=text)
        p.add_argument("ids", nargs="+", type=int)
        p.set_defaults(func=cmd_review)
    p = sub.add_parser("relabel", help="move images to another category")
    p.add_argument("ids", nargs="+", type=int)
    p.add_argument("--category", required=True)
    p.set_defaults(func=cmd_review)

    p = sub.add_parser(
        "suspects",
        help="list suspected mislabels (most likely first), or accept|keep|reject them",
        description="Without an action: the open suspects, most likely mislabelled first "
        "(scored after each completed round). accept: move the image to the suggested category; "
        "keep: keep its label (it stays kept in later rounds); reject: reject the image.",
    )
    p.add_argument("action", nargs="?", choices=list(suspects.ACTIONS), help="decide about the images IMAGE_ID...")
    p.add_argument("ids", nargs="*", type=int, metavar="IMAGE_ID", help="images to decide about (with an action)")
    p.add_argument("--limit", type=int, default=50, help="rows to list (default 50)")
    p.add_argument("--all", action="store_true", help="list decided suspects too")
    p.set_defaults(func=cmd_suspects)
    p = sub.add_parser(
        "duplicates", help="list clusters of look-alike images (not rejected), largest first, or act on one"
    )
    p.set_defaults(func=cmd_duplicates)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--validate", type=int, metavar="N", help="validate every image of cluster N")
    group.add_argument("--reject", type=int, metavar="N", help="reject every image of cluster N")
    p.add_argument(
        "--yes", type=int, metavar="COUNT", help="confirm an action on more than 5 images by giving their count"
    )

    p = sub.add_parser("categories", help="list, add or rename categories")
    p.add_argument("--add", metavar="NAME")
    p.add_argument("--rename", nargs=2, metavar=("OLD", "NEW"))
    p.set_defaults(func=cmd_categories)

    p = sub.add_parser("train", help="queue a training job")
    _add_training_options(p)
    p.add_argument("--wait", action="store_true", help="show progress until the job ends")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "automation",
        help="show or change automatic retraining (triggers, promotion gate, parameters)",
        description="Without options: the triggers' state, the last check and the next. With options: change them. "
        "A worker (`python -m core worker`) checks every minute.",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--new-images", type=int, metavar="N", help="retrain when N new validated images arrived since the last round"
    )
    group.add_argument("--no-new-images", action="store_true", help="switch the new-images trigger off")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--schedule-hours", type=float, metavar="H", help="retrain every H hours (0.25 to 720)")
    group.add_argument("--no-schedule", action="store_true", help="switch the schedule off")
    p.add_argument("--off", action="store_true", help="switch both triggers off")
    p.add_argument(
        "--min-improvement",
        type=float,
        metavar="POINTS",
        help="promotion gate: test accuracy at least this many points above production's",
    )
    p.add_argument(
        "--max-category-drop",
        type=float,
        metavar="POINTS",
        help="promotion gate: no category's test accuracy falls by more than this",
    )
    p.add_argument(
        "--min-test-images",
        type=int,
        metavar="N",
        help="promotion gate: judge only on at least N test images both versions were scored on (default 30)",
    )
    p.add_argument(
        "--default-parameters",
        action="store_true",
        help="automatic jobs forget their saved training parameters (before applying the options below)",
    )
    _add_training_options(p, "automatic jobs: ")
    p.set_defaults(func=cmd_automation)

    p = sub.add_parser("status", help="show a training job")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cancel", help="cancel a queued or running job")
    p.add_argument("job_id")
    p.add_argument(
        "--keep-best",
        action="store_true",
        help="stop a running job after its current batch and register its best epoch so far as a version",
    )
    p.set_defaults(func=cmd_cancel)

    sub.add_parser("versions", help="list model versions").set_defaults(func=cmd_versions)
    p = sub.add_parser("promote", help="put a version in production")
    p.add_argument("version")
    p.add_argument(
        "--reason", help="why; required for a version the promotion gate held back (recorded as an override)"
    )
    p.set_defaults(func=cmd_promote)
    sub.add_parser("rollback", help="put the previous production version back").set_defaults(func=cmd_rollback)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    get_settings().data_dir.mkdir(parents=True, exist_ok=True)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
