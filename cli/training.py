"""Commands about training and versions: train, status, cancel, automation, versions, promote, rollback.

What torch, torchvision or scipy bring in is imported by the command that
needs it, so that the light commands start in a second, not several."""

import argparse
import sys
import time

from core.access import CLI_ACTOR as WHO
from core.config import get_settings
from core.db import read_session, session_scope
from core.errors import UserError
from core.models import FINISHED_STATUSES, Automation, RoundStatus
from core.training.config import (
    ARCHITECTURES,
    AUTO,
    AUTO_BUDGET_MINUTES,
    FEDERATED_DEFAULTS,
    FEDERATED_LEARNING_RATE,
    TRAINING_MODES,
    TrainingConfig,
)


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
        *FEDERATED_DEFAULTS,
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
        print(f"Follow it with: python -m cli status {round_.job_id}")
        return 0
    return _wait(round_.job_id)


def _wait(job_id: str) -> int:
    from core.round_details import load_round_details
    from core.training.register import formats_pending

    last = None
    while True:
        with session_scope() as session:
            details = load_round_details(job_id, session=session)
        round_ = details.round
        line = (
            f"{round_.status.value}: epoch {round_.current_epoch}/{round_.parameters['epochs']}, {round_.progress:.0%}"
        )
        pending = details.version is not None and formats_pending(round_, details.version)
        if pending:
            line = f"model {details.version.version} is downloadable; its other formats are being made and checked"
        if line != last:
            print(line, flush=True)
            last = line
        if round_.status in FINISHED_STATUSES and not pending:
            break
        time.sleep(1)
    if round_.status == RoundStatus.completed:
        print(f"Model {details.version.version}: {_quality(details.version)}")
        return 0
    print(f"Job {round_.status.value}: {round_.error or ''}", file=sys.stderr)
    return 1


def _quality(version) -> str:
    from core import quality_views

    return (
        f"test accuracy {quality_views.accuracy_text(version.metrics)}, "
        f"validation accuracy {quality_views.accuracy_text(version.metrics, 'val')}"
    )


def cmd_status(args) -> int:
    from core.round_details import load_round_details

    with session_scope() as session:
        details = load_round_details(args.job_id, session=session)
    round_, metrics, version = details.round, details.epochs, details.version
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
    from core import automation

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
    from core import quality_views, registry

    with session_scope() as session:
        versions = registry.list_versions(session=session)
    if not versions:
        print("No model versions yet: train one with `python -m cli train`.")
        return 0
    print(f"{'version':<10} {'prod':<5} {'test accuracy (n; 95% CI)':<48} {'size MB':>8}  {'architecture':<20} classes")
    for v in versions:
        prod = "*" if v.is_production else ""
        print(
            f"{v.version:<10} {prod:<5} {quality_views.accuracy_text(v.metrics):<48} {v.metrics.get('model_size_mb', 0):>8.2f}  "
            f"{v.architecture:<20} {', '.join(v.classes)}"
        )
    return 0


def cmd_promote(args) -> int:
    from core import registry

    with session_scope() as session:
        version = registry.promote(args.version, session=session, actor=WHO, reason=args.reason)
    print(f"Model {version.version} is now in production.")
    return 0


def cmd_rollback(args) -> int:
    from core import registry

    with session_scope() as session:
        version = registry.rollback(session=session, actor=WHO)
    print(f"Rolled back: model {version.version} is in production again.")
    return 0


def _image_size(text: str) -> int | str:
    if text == AUTO or text.isdigit():
        return text if text == AUTO else int(text)
    raise argparse.ArgumentTypeError(f"must be a whole number of pixels or {AUTO!r} (got {text!r})")


def _add_training_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The training parameters as options (read back by `_train_params`)."""
    defaults = TrainingConfig()
    p.add_argument("--epochs", type=int, help=f"{prefix}default {defaults.epochs}")
    p.add_argument("--batch-size", type=int, help=f"{prefix}default {defaults.batch_size}")
    p.add_argument(
        "--learning-rate",
        type=float,
        help=f"{prefix}default {defaults.learning_rate} (training mode federated: {FEDERATED_LEARNING_RATE})",
    )
    p.add_argument("--architecture", choices=ARCHITECTURES, help=f"{prefix}default {defaults.architecture}")
    p.add_argument(
        "--image-size",
        type=_image_size,
        help=f"{prefix}default {defaults.image_size}: the images' median short side, a multiple of 32 from 32 to 224",
    )
    p.add_argument("--val-split", type=float, help=f"{prefix}default {defaults.val_split}")
    p.add_argument("--seed", type=int, help=f"{prefix}default {defaults.seed}")
    p.add_argument(
        "--training-mode",
        choices=TRAINING_MODES,
        help=f"{prefix}default {defaults.training_mode}; head: train only the classifier on a frozen pretrained "
        "backbone; auto: search architecture, learning rate and image size within --budget-minutes, then train "
        "the best to the end",
    )
    p.add_argument(
        "--budget-minutes",
        type=float,
        metavar="N",
        help=f"{prefix}training mode auto only: minutes for the search and the final training "
        f"(default {AUTO_BUDGET_MINUTES:g}; fractions allowed)",
    )
    p.add_argument(
        "--processes",
        type=int,
        help=f"{prefix}default {defaults.processes}; train in N processes (PyTorch DDP), at most "
        f"MAX_TRAINING_PROCESSES ({get_settings().max_training_processes})",
    )
    federated = f"{prefix}training mode federated only (docs/federated.md): "
    p.add_argument("--rounds", type=int, help=f"{federated}aggregation rounds in sequence (default 1)")
    p.add_argument("--local-epochs", type=int, help=f"{federated}passes a phone makes per round (default 1)")
    p.add_argument("--min-clients", type=int, help=f"{federated}updates that close a round (default 2)")
    p.add_argument("--deadline-minutes", type=float, help=f"{federated}minutes each round waits (default 60)")
    p.add_argument("--fedprox-mu", type=float, help=f"{federated}FedProx's proximal weight (default 0: FedAvg)")
    p.add_argument("--use-existing-model", dest="use_existing_model", action="store_true", default=None)
    p.add_argument("--no-existing-model", dest="use_existing_model", action="store_false", help="train from scratch")


def add_commands(sub) -> None:
    """Register this group's commands on the `python -m cli` parser."""
    p = sub.add_parser("train", help="queue a training job")
    _add_training_options(p)
    p.add_argument("--wait", action="store_true", help="show progress until the job ends")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "automation",
        help="show or change automatic retraining (triggers, promotion gate, parameters)",
        description="Without options: the triggers' state, the last check and the next. With options: change them. "
        "A worker (`python -m cli worker`) checks every minute.",
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
