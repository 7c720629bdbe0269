"""Federated fine-tuning: phones train the production model's classifier head
on their own pictures, and only the head's new weights come back.

A federated training round (`training_mode` `federated`) runs `rounds`
aggregation rounds, each a `FederatedPlan`: the server publishes the frozen
backbone as an inference `.pte` and the head with its loss as a trainable
`.pte` (ExecuTorch's training runtime runs forward and backward on the
phone; its portable BatchNorm kernel is inference-only, hence the split, the
same as `head` mode's), waits until `min_clients` updates are accepted or the
deadline passes, and averages the updates weighted by each phone's number of
pictures (FedAvg; with `fedprox_mu` > 0 the phones' loss carries FedProx's
proximal term). The last aggregate on the backbone is registered like any
round's model (core/training/register.py: test images, gate, `.ptl`/`.pte`
with parity, a new version).

Updates live in the database (`FederatedUpdate`), so a worker killed while it
waits or aggregates resumes from them (`run_federated` on the next attempt).
"""

import copy
import hashlib
import io
import logging
import math
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path

import numpy as np
import torch
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select
from torch import nn

from core import registry
from core.access import SYSTEM_ACTOR, Actor
from core.audit import record_audit
from core.config import get_settings
from core.dataset import IMAGENET_MEAN, IMAGENET_STD, normalize
from core.errors import ConflictError, NotFoundError, UserError
from core.export import ExportError, publish_artifact
from core.faults import crash_point
from core.ingest import file_sha256
from core.models import (
    FederatedFetch,
    FederatedPlan,
    FederatedUpdate,
    ModelVersion,
    RoundStatus,
    TrainingRound,
    as_utc,
    utcnow,
)
from core.quality_views import interval_text
from core.storage import commit_temp, temp_path_for
from core.training.config import TrainingConfig
from core.training.networks import build_model, head, set_head
from core.training.preflight import federated_problem
from core.training.progress import RoundReporter, finish, round_dir, save_checkpoint
from core.training.register import Trained, register
from core.training.trainers import extract_features, load_split

log = logging.getLogger(__name__)

# One local step in the trainable `.pte` must give PyTorch's loss and
# gradients within this (the target; ExecuTorch gives ~1e-7).
HEAD_PARITY = 1e-5
# How often the worker looks for new updates while a plan is open (seconds).
POLL_SECONDS = 0.5
# The update's arrays, named as in the trainable program (`head.weight`, ...).
HEAD_PARAMS = ("weight", "bias")
# Free-form local metrics a phone may send: this many numbers at most.
MAX_METRICS = 20
MAX_EXAMPLES = 10_000_000
# Ids above this are no plan's (and would overflow SQLite's integers).
MAX_ID = 2**62


class HeadLoss(nn.Module):
    """The program a phone trains: the linear head and its cross-entropy loss
    on backbone features, plus FedProx's proximal term mu/2 ||w - w0||^2 when
    `mu` > 0 (w0: the head the round started from). Returns the loss and the
    predicted classes (for the phone's local accuracy)."""

    def __init__(self, linear: nn.Linear, mu: float):
        super().__init__()
        self.head = copy.deepcopy(linear).requires_grad_(True)
        self.mu = float(mu)
        self.register_buffer("start_weight", linear.weight.detach().clone())
        self.register_buffer("start_bias", linear.bias.detach().clone())

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(features)
        loss = nn.functional.cross_entropy(logits, labels)
        if self.mu:
            drift = (self.head.weight - self.start_weight).pow(2).sum() + (self.head.bias - self.start_bias).pow(
                2
            ).sum()
            loss = loss + self.mu / 2 * drift
        return loss, logits.detach().argmax(1)


def head_program(linear: nn.Linear, mu: float) -> bytes:
    """`HeadLoss` as an ExecuTorch training program (forward and backward;
    any batch size up to 4096), the calls checked on executorch 1.5.1."""
    from executorch.exir import EdgeCompileConfig, to_edge
    from torch.export.experimental import _export_forward_backward

    module = HeadLoss(linear, mu)
    features = torch.zeros(2, linear.in_features)
    labels = torch.zeros(2, dtype=torch.long)
    batch = torch.export.Dim("batch", min=1, max=4096)
    exported = torch.export.export(module, (features, labels), dynamic_shapes=({0: batch}, {0: batch}), strict=True)
    joint = _export_forward_backward(exported)
    # The joint graph holds ops outside the edge dialect's checked set.
    edge = to_edge(joint, compile_config=EdgeCompileConfig(_check_ir_validity=False))
    return edge.to_executorch().buffer


def load_trainable(program: bytes):
    """The ExecuTorch training module of a trainable `.pte` (as the phones load it)."""
    from executorch.extension.training import _load_for_executorch_for_training_from_buffer

    return _load_for_executorch_for_training_from_buffer(program)


def local_step(module, features: torch.Tensor, labels: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """One forward and backward pass of a trainable module: the loss and the
    gradients by parameter name (`head.weight`, `head.bias`)."""
    loss, _ = module.forward_backward("forward", (features.contiguous(), labels.contiguous()))
    return float(loss), {k: v.clone() for k, v in module.named_gradients().items()}


def step_differences(program: bytes, linear: nn.Linear, mu: float, features, labels) -> dict[str, float]:
    """How far one step of `program` is from PyTorch's on the same batch:
    the loss's and the largest gradient's absolute difference."""
    loss, grads = local_step(load_trainable(program), features, labels)
    reference = HeadLoss(linear, mu)
    expected, _ = reference(features, labels)
    expected.backward()
    worst = max(float((grads[f"head.{name}"] - getattr(reference.head, name).grad).abs().max()) for name in HEAD_PARAMS)
    return {"loss": abs(loss - float(expected.detach())), "gradients": worst}


def backbone_of(model: nn.Module) -> nn.Module:
    """`model` without its classifier head: images in, head features out."""
    backbone = copy.deepcopy(model).eval()
    set_head(backbone, nn.Identity())
    return backbone


def head_state(linear: nn.Linear) -> dict[str, torch.Tensor]:
    return {name: getattr(linear, name).detach().clone() for name in HEAD_PARAMS}


def to_npz(arrays: Mapping[str, torch.Tensor | np.ndarray]) -> bytes:
    """Arrays as the bytes of an `.npz` file (the update's wire format)."""
    out = io.BytesIO()
    np.savez(out, **{k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()})
    return out.getvalue()


def from_npz(data: bytes) -> dict[str, np.ndarray]:
    """An `.npz` file's arrays; UserError when it is not one (pickles refused)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as found:
            return {k: found[k] for k in found.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"The update file is not a readable .npz of float arrays ({exc})") from None


# --- the worker's side: plans, waiting, aggregation, registration ---------


@dataclass
class ServerData:
    """The server's own pictures as backbone features: validation images for
    the exports' parity checks, test images for each aggregate's accuracy."""

    images_val: torch.Tensor
    f_train: torch.Tensor
    f_val: torch.Tensor
    f_test: torch.Tensor


def start_model(round_: TrainingRound, classes: list[str], *, session: Session) -> Path:
    """The network the round starts from: the production model, saved in the
    round's folder on the first attempt (a resumed round keeps it even if
    production changed since). UserError when there is no production model
    for this class list."""
    saved = round_dir(round_) / "federated" / "start.pt"
    if saved.is_file():
        return saved
    production = registry.production_version(session=session)
    problem = federated_problem(classes, production)
    if problem:
        raise UserError(problem)
    save_checkpoint(saved, {"state_dict": registry.load_checkpoint(production)["state_dict"]})
    return saved


def run_federated(round_: TrainingRound, reporter: RoundReporter, *, session: Session) -> ModelVersion | None:
    """A federated round in the worker: for each aggregation round, publish
    the plan, wait for the phones, aggregate; then register the last
    aggregate as a version. Returns None (the round failed, with the reason
    in its history and error) when too few phones reported by a deadline.

    Resumable: closed plans are replayed from their stored aggregate, an open
    one is waited on again with the updates already stored."""
    config = TrainingConfig(**round_.parameters)
    classes = list(round_.classes)
    torch.set_num_threads(get_settings().training_threads)
    reporter.phase("preparing")
    start = start_model(round_, classes, session=session)
    model = build_model(config.architecture, len(classes))
    model.load_state_dict(torch.load(start, map_location="cpu", weights_only=True)["state_dict"])
    model.eval().requires_grad_(False)
    data = load_split(round_, config, classes, reporter, session=session)
    session.rollback()  # a writing session holds SQLite's write lock: none while computing
    identity = f"federated-{file_sha256(start)[:20]}"
    features = partial(extract_features, model, size=config.image_size, backbone=identity)
    server = ServerData(
        normalize(data.x_val),
        features(data.x_train, data.sha_train),
        features(data.x_val, data.sha_val),
        features(data.x_test, data.sha_test),
    )
    # Each aggregate is scored on the test images (the validation ones when a tiny dataset has none).
    scoring = (server.f_test, data.y_test) if len(data.y_test) else (server.f_val, data.y_val)
    for number in range(1, config.rounds + 1):
        plan = session.exec(
            select(FederatedPlan).where(FederatedPlan.round_id == round_.id, FederatedPlan.number == number)
        ).first()
        if plan is None:
            reporter.phase("exporting")
            plan = publish_plan(round_, number, model, config, server, data.y_val, session=session)
        if plan.status != "closed":
            reporter.phase("training")  # on the phones: the worker waits for their updates
            if not wait_for_updates(round_, plan, config, reporter, session=session):
                return None
            aggregate(round_, plan, model, *scoring, session=session)
            reporter.note(
                f"federated round {number} of {config.rounds}: {plan.clients} phones averaged, "
                f"test accuracy {plan.test_accuracy:.1f}% (n = {plan.test_images})"
            )
        else:
            load_head(model, aggregate_path(plan))
        round_.progress = number / (config.rounds + 1)
        session.add(round_)
        session.commit()
    linear = head(model)
    with torch.inference_mode():
        logits = [linear(f).float() for f in (server.f_train, server.f_val, server.f_test)]
    if not len(data.y_test):
        logits[2] = torch.empty(0, len(classes))
    trained = Trained(config, classes, model, data, config.rounds, config.rounds, *logits)
    return register(round_, trained, reporter, session=session)


def publish_plan(
    round_: TrainingRound,
    number: int,
    model: nn.Module,
    config: TrainingConfig,
    server: ServerData,
    y_val: torch.Tensor,
    *,
    session: Session,
) -> FederatedPlan:
    """Export this round's files (the backbone once, the trainable head each
    round), check them against PyTorch, and open the plan (committed)."""
    folder = round_dir(round_) / "federated"
    data_dir = get_settings().data_dir
    first = session.exec(
        select(FederatedPlan).where(FederatedPlan.round_id == round_.id, FederatedPlan.number == 1)
    ).first()
    session.rollback()  # no transaction (and no lock) during the exports
    if first is not None:
        backbone_file = next(f for f in first.files if f["name"] == "backbone")
    else:
        backbone = backbone_of(model)
        with torch.inference_mode():
            eager = backbone(server.images_val)
        record = publish_artifact(
            backbone, "pte", folder / "backbone.pte", server.images_val, eager, server.images_val[:1].contiguous()
        )
        backbone_file = {"name": "backbone", **record}
    linear = head(model)
    head_path = folder / f"head_{number}.pt"
    save_checkpoint(head_path, head_state(linear))
    program = head_program(linear, config.fedprox_mu)
    gap = step_differences(program, linear, config.fedprox_mu, server.f_val, y_val)
    if max(gap.values()) > HEAD_PARITY:
        raise ExportError(
            f"the trainable head does not match PyTorch: loss differs by {gap['loss']:.2e}, gradients by "
            f"{gap['gradients']:.2e} (at most {HEAD_PARITY:g} allowed)"
        )
    head_file = folder / f"head_{number}.pte"
    tmp = temp_path_for(head_file)
    tmp.write_bytes(program)
    commit_temp(tmp, head_file)
    head_record = {
        "name": "head",
        "format": "pte",
        "path": head_file.relative_to(data_dir).as_posix(),
        "sha256": file_sha256(head_file),
        "size_bytes": head_file.stat().st_size,
        "runtime": "executorch training",
        "parity": {"max_loss_diff": gap["loss"], "max_grad_diff": gap["gradients"], "threshold": HEAD_PARITY},
    }
    plan = FederatedPlan(
        round_id=round_.id,
        number=number,
        deadline_at=utcnow() + timedelta(minutes=config.deadline_minutes),
        files=[backbone_file, head_record],
        head_path=head_path.relative_to(data_dir).as_posix(),
    )
    session.add(plan)
    session.flush()
    record_audit(
        "federated.plan",
        session=session,
        actor=SYSTEM_ACTOR,
        target=f"job:{round_.job_id}",
        after={"plan_id": plan.id, "round": number, "deadline": plan.deadline_at.isoformat(), "files": plan.files},
    )
    session.commit()
    return plan


def accepted_updates(plan_id: int, *, session: Session) -> list[FederatedUpdate]:
    return list(
        session.exec(
            select(FederatedUpdate)
            .where(FederatedUpdate.plan_id == plan_id, FederatedUpdate.status == "accepted")
            .order_by(FederatedUpdate.id)
        )
    )


def wait_for_updates(
    round_: TrainingRound, plan: FederatedPlan, config: TrainingConfig, reporter: RoundReporter, *, session: Session
) -> bool:
    """Wait until `min_clients` updates are accepted (True) or the deadline
    passes with fewer: then the plan and the round fail saying so (False)."""
    while True:
        count = len(accepted_updates(plan.id, session=session))
        if count >= config.min_clients:
            break
        if utcnow() >= as_utc(plan.deadline_at):
            reason = (
                f"federated round {plan.number}: {count} of the {config.min_clients} phones needed sent an "
                f"accepted update by the deadline ({as_utc(plan.deadline_at):%Y-%m-%d %H:%M:%S} UTC); no model "
                "was made. Start it again with a later deadline (deadline_minutes) or fewer min_clients"
            )
            session.rollback()
            plan.status, plan.error, plan.closed_at, plan.clients = "failed", reason, utcnow(), count
            round_.error = reason
            finish(round_, RoundStatus.failed, reason)
            session.add_all([plan, round_])
            record_audit(
                "federated.aggregate",
                session=session,
                actor=SYSTEM_ACTOR,
                target=f"job:{round_.job_id}",
                after={"plan_id": plan.id, "round": plan.number, "status": "failed", "reason": reason},
            )
            session.commit()
            return False
        reporter.check_cancel()
        session.rollback()  # no transaction while asleep (a writing one locks SQLite), a fresh read next time
        time.sleep(POLL_SECONDS)
    # Closed to new updates before they are read, so none arrives unaveraged.
    plan.status = "aggregating"
    session.add(plan)
    session.commit()
    return True


def aggregate_path(plan: FederatedPlan) -> Path:
    """Where the plan's averaged head is kept (next to the head it started from)."""
    start = get_settings().data_dir / plan.head_path
    return start.with_name(f"{start.stem}_aggregate.pt")


def load_head(model: nn.Module, path: Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    with torch.no_grad():
        for name in HEAD_PARAMS:
            getattr(head(model), name).copy_(state[name])


def fedavg(updates: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, torch.Tensor]:
    """The average of the heads, each weighted by its number of examples (McMahan et al., FedAvg)."""
    total = sum(n for _, n in updates)
    return {
        name: torch.from_numpy(sum(w[name].astype(np.float64) * (n / total) for w, n in updates).astype(np.float32))
        for name in HEAD_PARAMS
    }


def aggregate(
    round_: TrainingRound,
    plan: FederatedPlan,
    model: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    session: Session,
) -> None:
    """Average the plan's accepted updates into `model`'s head, score it on
    the server's images (`features`, `labels`) and close the plan (committed)."""
    crash_point("federated_aggregation")  # CRASH_AT, for the recovery test
    updates = accepted_updates(plan.id, session=session)
    averaged = fedavg([(from_npz(u.weights), u.num_examples) for u in updates])
    path = aggregate_path(plan)
    save_checkpoint(path, averaged)
    load_head(model, path)
    with torch.inference_mode():
        predicted = head(model)(features).argmax(1)
    plan.test_accuracy = round(100.0 * float((predicted == labels).float().mean()), 2) if len(labels) else None
    plan.test_images = len(labels)
    plan.status, plan.clients, plan.closed_at = "closed", len(updates), utcnow()
    session.add(plan)
    record_audit(
        "federated.aggregate",
        session=session,
        actor=SYSTEM_ACTOR,
        target=f"job:{round_.job_id}",
        after={
            "plan_id": plan.id,
            "round": plan.number,
            "status": "closed",
            "clients": plan.clients,
            "examples": sum(u.num_examples for u in updates),
            "test_accuracy": plan.test_accuracy,
            "test_images": plan.test_images,
        },
    )
    session.commit()


# --- the phones' side: the plan, its files, their updates -----------------


def current_plan(*, session: Session) -> tuple[FederatedPlan, TrainingRound]:
    """The plan phones should work on now: the newest open one of a running
    round; NotFoundError when there is none."""
    found = session.exec(
        select(FederatedPlan, TrainingRound)
        .join(TrainingRound, col(TrainingRound.id) == FederatedPlan.round_id)
        .where(FederatedPlan.status == "open", TrainingRound.status == RoundStatus.in_progress)
        .order_by(col(FederatedPlan.id).desc())
    ).first()
    if found is None or utcnow() >= as_utc(found[0].deadline_at):
        raise NotFoundError("No federated round is open now: ask again later (the operator starts one)")
    return found


def plan_document(plan: FederatedPlan, round_: TrainingRound, file_url: Callable[[int, str], str]) -> dict:
    """What a phone needs to take part: the files (URL, SHA-256, size), the
    local training parameters, the classes and input, and the update's form."""
    config = TrainingConfig(**round_.parameters)
    head_weights = torch.load(get_settings().data_dir / plan.head_path, map_location="cpu", weights_only=True)
    return {
        "plan_id": plan.id,
        "job_id": round_.job_id,
        "round": plan.number,
        "rounds": config.rounds,
        "status": plan.status,
        "deadline": as_utc(plan.deadline_at).isoformat(),
        "local_epochs": config.local_epochs,
        "learning_rate": config.learning_rate,
        "batch_size": config.batch_size,
        "fedprox_mu": config.fedprox_mu,
        "min_clients": config.min_clients,
        "classes": list(round_.classes),
        "image_size": config.image_size,
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "files": [
            {
                "name": f["name"],
                "url": file_url(plan.id, f["name"]),
                "sha256": f["sha256"],
                "size_bytes": f["size_bytes"],
            }
            for f in plan.files
        ],
        "update": {
            "arrays": {name: list(head_weights[name].shape) for name in HEAD_PARAMS},
            "kinds": ["weights", "delta"],
            "max_norm": get_settings().federated_max_update_norm,
        },
    }


def plan_etag(plan: FederatedPlan) -> str:
    """Changes whenever the plan a phone would get changes."""
    text = f"{plan.id}:{plan.status}:" + ",".join(f["sha256"] for f in plan.files)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def plan_file(plan_id: int, name: str, *, session: Session) -> tuple[Path, str]:
    """A plan's file (`backbone` or `head`) and its SHA-256."""
    plan = session.get(FederatedPlan, plan_id)
    record = next((f for f in plan.files if f["name"] == name), None) if plan is not None else None
    if record is None:
        raise NotFoundError(f"No file '{name}' in federated plan {plan_id}; the plan lists its files")
    path = get_settings().data_dir / record["path"]
    if not path.is_file():
        raise NotFoundError(f"Federated plan {plan_id} is over and its files are gone; fetch the current plan")
    return path, record["sha256"]


def record_fetch(plan_id: int, token_id: int, device: str, *, session: Session) -> None:
    """A phone fetched the plan's head: it is working on the plan, and the
    Live metrics page names it as pending until its update arrives. Written
    once per phone and plan (a later fetch, or one racing it, changes nothing)."""
    if session.exec(
        select(FederatedFetch.id).where(FederatedFetch.plan_id == plan_id, FederatedFetch.token_id == token_id)
    ).first():
        return
    session.add(FederatedFetch(plan_id=plan_id, token_id=token_id, device=device))
    try:
        session.flush()
    except IntegrityError:
        session.rollback()


@dataclass(frozen=True)
class Receipt:
    """What became of an update: stored accepted or refused, and, when
    refused, the error the phone gets (raised by the edge after the commit,
    so the refusal stays on record)."""

    update: FederatedUpdate
    error: UserError | None = None


def parse_update(kind: str, arrays: Mapping) -> dict[str, np.ndarray]:
    """The update's arrays as float arrays; UserError naming what is wrong."""
    if kind not in ("weights", "delta"):
        raise UserError(f"kind must be 'weights' (the head's new weights) or 'delta' (their change); got {kind!r}")
    if not isinstance(arrays, Mapping) or set(arrays) != set(HEAD_PARAMS):
        got = sorted(arrays) if isinstance(arrays, Mapping) else type(arrays).__name__
        raise UserError(f"The update must hold exactly the arrays {', '.join(HEAD_PARAMS)} (got {got})")
    parsed = {}
    for name, value in arrays.items():
        try:
            parsed[name] = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise UserError(f"Update array {name} must be numbers (nested lists of floats)") from None
    return parsed


def receive_update(
    plan_id: int,
    *,
    session: Session,
    actor: Actor,
    token_id: int,
    kind: str,
    arrays: Mapping,
    num_examples,
    metrics,
) -> Receipt:
    """Check a phone's update for `plan_id` and store it, accepted or refused.

    Refused (stored with the reason, and the phone told why): a plan that is
    closed or past its deadline, a second update from the same device
    (token), arrays of the wrong shape, values that are not finite, or a
    change from the plan's head larger than FEDERATED_MAX_UPDATE_NORM. A
    request that names no plan, or whose fields are malformed, raises at
    once and stores nothing."""
    if isinstance(plan_id, bool) or not isinstance(plan_id, int) or not 1 <= plan_id <= MAX_ID:
        raise NotFoundError(f"No federated plan {plan_id!r}; GET /api/federated/plan/ gives the current one")
    num_examples = _check_examples(num_examples)
    metrics = _check_metrics(metrics)
    parsed = parse_update(kind, arrays)
    # Locked, so the aggregation (which closes the plan first) never misses an update it let in.
    plan = session.exec(select(FederatedPlan).where(FederatedPlan.id == plan_id).with_for_update()).first()
    if plan is None:
        raise NotFoundError(f"No federated plan {plan_id}; GET /api/federated/plan/ gives the current one")
    round_ = session.get(TrainingRound, plan.round_id)
    weights, norm, error = None, None, _refusal(plan, round_, token_id, session=session)
    if error is None:  # an open plan's files are there (a finished round's folder is gone)
        start = torch.load(get_settings().data_dir / plan.head_path, map_location="cpu", weights_only=True)
        weights, norm, error = _check_arrays(parsed, start, kind)
    update = FederatedUpdate(
        plan_id=plan.id,
        token_id=token_id,
        device=actor.name,
        accepted_token_id=token_id if error is None else None,
        status="accepted" if error is None else "refused",
        reason=str(error) if error else None,
        num_examples=num_examples,
        metrics=metrics,
        weights=to_npz(weights) if weights is not None else None,
        update_norm=norm,
    )
    try:
        with session.begin_nested():
            session.add(update)
    except IntegrityError:  # the same device's other update won a race
        error = ConflictError(_duplicate_text(plan))
        update = FederatedUpdate(
            plan_id=plan.id, token_id=token_id, device=actor.name, status="refused", reason=str(error),
            num_examples=num_examples, metrics=metrics,
        )  # fmt: skip
        session.add(update)
    session.flush()
    record_audit(
        "federated.update",
        session=session,
        actor=actor,
        target=f"job:{round_.job_id}",
        after={
            "plan_id": plan.id,
            "round": plan.number,
            "status": update.status,
            "reason": update.reason,
            "num_examples": num_examples,
            "update_norm": norm,
        },
    )
    return Receipt(update, error)


def _duplicate_text(plan: FederatedPlan) -> str:
    return (
        f"This device already sent an update for federated round {plan.number} (plan {plan.id}); "
        "one update per device and round is counted: wait for the next round's plan"
    )


def _refusal(plan: FederatedPlan, round_: TrainingRound, token_id: int, *, session: Session) -> UserError | None:
    if plan.status != "open" or round_.status != RoundStatus.in_progress or utcnow() >= as_utc(plan.deadline_at):
        return ConflictError(
            f"Federated round {plan.number} (plan {plan.id}) is closed ({plan.status}, deadline "
            f"{as_utc(plan.deadline_at):%Y-%m-%d %H:%M:%S} UTC): this update came too late; fetch the current plan"
        )
    mine = session.exec(
        select(FederatedUpdate.id).where(
            FederatedUpdate.plan_id == plan.id, FederatedUpdate.accepted_token_id == token_id
        )
    ).first()
    return ConflictError(_duplicate_text(plan)) if mine is not None else None


def _check_arrays(
    parsed: dict[str, np.ndarray], start: dict[str, torch.Tensor], kind: str
) -> tuple[dict[str, np.ndarray] | None, float | None, UserError | None]:
    """The head's new weights and their distance from the start, or the reason they are refused."""
    for name in HEAD_PARAMS:
        expected = tuple(start[name].shape)
        if parsed[name].shape != expected:
            return (
                None,
                None,
                UserError(
                    f"Update array {name} has shape {list(parsed[name].shape)}; the plan's head needs {list(expected)}"
                ),
            )
        if not np.isfinite(parsed[name]).all():
            bad = int((~np.isfinite(parsed[name])).sum())
            return (
                None,
                None,
                UserError(f"Update array {name} holds {bad} value(s) that are not finite (NaN or infinity)"),
            )
    base = {name: start[name].numpy().astype(np.float64) for name in HEAD_PARAMS}
    weights = {n: parsed[n] + base[n] for n in HEAD_PARAMS} if kind == "delta" else parsed
    norm = math.sqrt(sum(float(((weights[n] - base[n]) ** 2).sum()) for n in HEAD_PARAMS))
    bound = get_settings().federated_max_update_norm
    if not math.isfinite(norm) or norm > bound:
        return (
            None,
            norm,
            UserError(
                f"The update moves the head by {norm:.3g} (L2 norm), more than the {bound:g} allowed "
                "(FEDERATED_MAX_UPDATE_NORM): train with the plan's learning rate and local epochs"
            ),
        )
    return weights, norm, None


def _check_examples(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_EXAMPLES:
        raise UserError(f"num_examples must be a whole number between 1 and {MAX_EXAMPLES:,} (got {value!r})")
    return value


def _check_metrics(value) -> dict:
    value = {} if value is None else value
    if not isinstance(value, Mapping) or len(value) > MAX_METRICS:
        raise UserError(f'metrics must be a JSON object of at most {MAX_METRICS} numbers (e.g. {{"loss": 0.4}})')
    clean = {}
    for key, number in value.items():
        if (
            not isinstance(key, str)
            or len(key) > 40
            or isinstance(number, bool)
            or not isinstance(number, (int, float))
        ):
            raise UserError(f"metrics must map short names to numbers (got {key!r}: {number!r})")
        if not math.isfinite(number):
            raise UserError(f"metrics value {key!r} must be a finite number (got {number!r})")
        clean[key] = float(number)
    return clean


def round_view(round_: TrainingRound, *, session: Session) -> dict:
    """A federated round for the Live metrics page: one row per plan
    (status, phones averaged, test accuracy with its images and 95 %
    interval, how many more are needed, the phones working on it by name) and
    one per update received (device, accepted or refused and why, pictures,
    local metrics)."""
    plans = session.exec(
        select(FederatedPlan).where(FederatedPlan.round_id == round_.id).order_by(FederatedPlan.number)
    ).all()
    updates = session.exec(
        select(FederatedUpdate)
        .where(col(FederatedUpdate.plan_id).in_([p.id for p in plans]))
        .order_by(FederatedUpdate.id)
    ).all()
    fetches = session.exec(
        select(FederatedFetch).where(col(FederatedFetch.plan_id).in_([p.id for p in plans])).order_by(FederatedFetch.id)
    ).all()
    number = {p.id: p.number for p in plans}
    needed = round_.parameters.get("min_clients") or 0
    sent = {(u.plan_id, u.token_id) for u in updates}
    working = {p.id: [f.device for f in fetches if f.plan_id == p.id and (p.id, f.token_id) not in sent] for p in plans}
    accepted = {p.id: sum(u.plan_id == p.id and u.status == "accepted" for u in updates) for p in plans}
    return {
        "rounds": round_.parameters.get("rounds"),
        "plans": [
            {
                "round": p.number,
                "status": p.status,
                "reported": accepted[p.id],
                "pending": max(0, needed - accepted[p.id]) if p.status == "open" else 0,
                # Phones that fetched the plan's head and have not sent an update yet.
                "working": ", ".join(working[p.id]) if p.status == "open" else "",
                "deadline": as_utc(p.deadline_at).strftime("%Y-%m-%d %H:%M:%S UTC"),
                "test_accuracy": p.test_accuracy,
                "test_images": p.test_images or None,
                "test_interval": interval_text(p.test_accuracy, p.test_images),
                "error": p.error,
            }
            for p in plans
        ],
        "updates": [
            {
                "round": number[u.plan_id],
                "device": u.device,
                "status": u.status,
                "reason": u.reason or "",
                "pictures": u.num_examples,
                "local_loss": u.metrics.get("loss"),
                "local_accuracy": u.metrics.get("accuracy"),
                "received": as_utc(u.received_at).strftime("%H:%M:%S"),
            }
            for u in updates
        ],
    }
