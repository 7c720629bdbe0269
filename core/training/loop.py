"""The epoch loop: set a round up (data, trainer, optimizer, resume from its
checkpoint), train epoch by epoch as pytorch/examples' `train()` does,
validate and checkpoint after each epoch on rank 0, and hand the best epoch
to `core.training.register`.

`train_and_register` runs in the queue worker for a one-process job, and in
every rank of a DDP group (`train_rank`, started by `core.training.ranks`).
"""

import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from sqlmodel import Session, delete
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from core.config import get_settings
from core.db import get_engine, read_engine
from core.errors import NotFoundError, TrainingCancelled
from core.faults import crash_point
from core.models import EpochMetric, ModelVersion, TrainingRound
from core.training import recipe
from core.training.config import TrainingConfig
from core.training.evaluation import accuracy
from core.training.placement import CPU, Placement
from core.training.progress import RoundReporter, SilentReporter, round_dir, save_checkpoint
from core.training.register import Trained, register
from core.training.trainers import FullTrainer, HeadTrainer, Split, load_split

# How old the cancel and stop answers the epoch loop acts on may be: a
# request is heard within a quarter of a second, without a read every batch.
REQUESTS_MAX_AGE = 0.25


@dataclass
class TrainState:
    """Where a round's training stands; saved in each epoch's checkpoint."""

    epoch: int = 0
    best_accuracy: float = -1.0
    best_epoch: int = 0
    best_state: dict | None = None


@dataclass
class Batches:
    """One rank's share of the training images, batch by batch. Each rank
    takes its share of every batch, so one step still sees `batch_size`
    images (the learning rate means the same for any count of processes)."""

    sampler: DistributedSampler
    size: int
    count: int

    @classmethod
    def for_rank(cls, n_train: int, config: TrainingConfig, placement: Placement) -> "Batches":
        sampler = DistributedSampler(
            range(n_train), num_replicas=placement.world_size, rank=placement.rank, shuffle=True, seed=config.seed
        )
        size = math.ceil(config.batch_size / placement.world_size)
        return cls(sampler, size, max(1, math.ceil(len(sampler) / size)))

    def epoch(self, epoch: int) -> list[torch.Tensor]:
        """The image indices of each batch of `epoch` (reshuffled each epoch from the seed)."""
        self.sampler.set_epoch(epoch)
        order = torch.tensor(list(self.sampler), dtype=torch.long)
        return [order[b * self.size : (b + 1) * self.size] for b in range(self.count)]


@dataclass
class Run:
    """What a round's epochs need, set up once by `set_up`."""

    round_id: int
    config: TrainingConfig
    classes: list[str]
    data: Split
    trainer: FullTrainer
    # The trainer's trainable part, in DDP when in a group.
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: nn.Module
    scaler: torch.amp.GradScaler
    batches: Batches
    placement: Placement
    reporter: RoundReporter
    # None for Auto's trials, which keep no checkpoint.
    checkpoint: Path | None


def train_and_register(
    round_: TrainingRound, reporter: RoundReporter, placement: Placement, *, session: Session
) -> ModelVersion | None:
    """Train and, on rank 0, export and register; other ranks return None after the last epoch."""
    run, state = set_up(round_, reporter, placement, session=session)
    reporter.phase("training")
    train(run, state)
    if not placement.leader:
        return None
    return register(round_, keep_best(run, state), reporter, session=session)


def set_up(
    round_: TrainingRound, reporter: RoundReporter, placement: Placement, *, session: Session
) -> tuple[Run, TrainState]:
    """The round's data, trainer and optimizer; resumed from the round's
    checkpoint when an earlier attempt left one."""
    config = TrainingConfig(**round_.parameters)
    classes = list(round_.classes)
    torch.set_num_threads(placement.threads(get_settings().training_threads))
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    reporter.phase("preparing")
    trainer_class = HeadTrainer if config.training_mode == "head" else FullTrainer
    if placement.leader:  # another rank's change would be flushed: its session only reads
        round_.device = placement.describe(trainer_class.amp_architecture(config))
        reporter.note(f"training on {round_.device}")
    data = load_split(round_, config, classes, reporter, session=session)
    trainer = trainer_class(config, classes, data, placement)
    checkpoint = round_dir(round_) / "checkpoint.pt"
    resume = checkpoint.is_file()
    trainer.setup(round_, reporter, resume, session=session)
    run = make_run(round_.id, config, classes, data, trainer, placement, reporter, checkpoint)
    state = TrainState()
    if resume:
        state = resume_from(checkpoint, trainer.trainable, run.optimizer, run.scheduler, run.batches.count)
        if placement.leader:
            delete_epoch_metrics_after(round_.id, state.epoch, session=session)
        reporter.note(
            f"attempt {round_.attempts}: resumed from the checkpoint of epoch {state.epoch}, at epoch {state.epoch + 1}"
        )
    return run, state


def make_run(
    round_id: int,
    config: TrainingConfig,
    classes: list[str],
    data: Split,
    trainer: FullTrainer,
    placement: Placement,
    reporter: RoundReporter,
    checkpoint: Path | None,
) -> Run:
    """The epochs' pieces around a set-up `trainer`: this rank's batches and
    the training recipe (core/training/recipe.py: optimizer, per-step
    schedule over `config.epochs`, loss). Used by `set_up` and by Auto's trials."""
    batches = Batches.for_rank(len(data.y_train), config, placement)
    optimizer = recipe.build_optimizer(trainer.trainable, config.learning_rate)
    return Run(
        round_id=round_id,
        config=config,
        classes=classes,
        data=data,
        trainer=trainer,
        net=placement.wrap(trainer.trainable),
        optimizer=optimizer,
        scheduler=recipe.build_scheduler(optimizer, config.epochs, batches.count),
        loss_fn=recipe.build_loss(),
        scaler=placement.grad_scaler(trainer.amp_architecture(config)),
        batches=batches,
        placement=placement,
        reporter=reporter,
        checkpoint=checkpoint,
    )


def train(run: Run, state: TrainState) -> None:
    """The epochs after `state`'s to the last, or until a stop request; rank
    0 validates and checkpoints each one, the others go on to the next."""
    for epoch in range(state.epoch + 1, run.config.epochs + 1):
        crash_point(f"rank{run.placement.rank}_epoch{epoch}")  # CRASH_AT, for the recovery tests
        started = time.perf_counter()
        learning_rate = run.optimizer.param_groups[0]["lr"]
        # Only once an epoch has been validated is there a best to keep.
        totals = train_epoch(run, epoch, can_stop=state.best_state is not None)
        if totals is None:
            # The unfinished epoch is dropped: the best validated one is kept.
            run.reporter.note(f"training stopped on request in epoch {epoch}; keeping epoch {state.best_epoch}")
            return
        loss, correct, seen = run.placement.sum(*totals)
        if run.placement.leader:
            train_metrics = {"train_loss": loss / max(1, seen), "train_accuracy": 100.0 * correct / max(1, seen)}
            validate_epoch(run, state, epoch, train_metrics, learning_rate, started)


def train_epoch(run: Run, epoch: int, can_stop: bool) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """One pass over this rank's share of the training images: (summed loss,
    correct predictions, images seen), or None when asked to stop (heard
    once `can_stop`). A cancel, which rank 0 hears and every rank follows,
    raises TrainingCancelled."""
    config, placement, reporter = run.config, run.placement, run.reporter
    run.net.train()
    generator = epoch_generator(config.seed, epoch, placement.rank)
    total_loss = torch.zeros((), device=placement.device)
    correct = torch.zeros((), dtype=torch.long, device=placement.device)
    seen = 0
    for b, idx in enumerate(run.batches.epoch(epoch)):
        reporter.batch(epoch, b + 1, run.batches.count, config.epochs)
        cancel, stop = reporter.requests(max_age=REQUESTS_MAX_AGE)
        if placement.agree(cancel):
            raise TrainingCancelled()
        if placement.agree(stop and can_stop):
            return None
        if len(idx) < 2:
            continue  # BatchNorm cannot train on a single image (every rank's share is the same size)
        x = run.trainer.batch(idx, generator)
        y = run.data.y_train[idx].to(placement.device, non_blocking=True)
        run.optimizer.zero_grad(set_to_none=True)
        with placement.autocast(run.trainer.amp_architecture(config)):
            logits = run.net(x)
            loss = run.loss_fn(logits, y)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()  # per step: warm-up, then a cosine to zero
        total_loss += loss.detach().float() * len(idx)
        correct += (logits.argmax(1) == y).sum()
        seen += len(idx)
    return total_loss, correct, seen


def validate_epoch(
    run: Run, state: TrainState, epoch: int, train_metrics: dict, learning_rate: float, started: float
) -> None:
    """Rank 0: validate `epoch`, keep it when it is the best so far, write its
    metric row and then its checkpoint."""
    trainer = run.trainer
    trainer.end_epoch()
    val_loss, val_logits = trainer.validate()
    val_accuracy = accuracy(val_logits, run.data.y_val)
    state.epoch = epoch
    if val_accuracy > state.best_accuracy:
        state.best_accuracy, state.best_epoch = val_accuracy, epoch
        state.best_state = {k: v.detach().clone() for k, v in trainer.trainable.state_dict().items()}
    # The metric row first, then the checkpoint: a crash in between resumes
    # from the previous checkpoint, deletes this row and trains the epoch
    # again, so every epoch keeps exactly one row.
    run.reporter.epoch(
        EpochMetric(
            round_id=run.round_id,
            epoch=epoch,
            **train_metrics,
            val_loss=val_loss,
            val_accuracy=val_accuracy,
            learning_rate=learning_rate,
            seconds=time.perf_counter() - started,
        )
    )
    payload = checkpoint_payload(run.config, run.classes, state, trainer.trainable, run.optimizer, run.scheduler)
    save_checkpoint(run.checkpoint, payload)


def keep_best(run: Run, state: TrainState) -> Trained:
    """Rank 0: the best epoch's model and its logits, for `register`."""
    trainer = run.trainer
    trainer.trainable.load_state_dict(state.best_state)
    run.reporter.note(
        f"training done; best epoch {state.best_epoch} with validation accuracy {state.best_accuracy:.1f}%"
    )
    train_logits, val_logits, test_logits = trainer.final_logits()
    # Exported from the CPU, in the default layout: the mobile runtimes expect
    # it, and the parity checks run there.
    model = trainer.model.to(CPU, memory_format=torch.contiguous_format)
    return Trained(
        run.config, run.classes, model, run.data, state.best_epoch, state.epoch, train_logits, val_logits, test_logits
    )


def train_rank(round_id: int, placement: Placement) -> None:
    """One rank of a round's DDP group (`python -m core.training.ranks`): rank
    0 writes as a single-process job does, the others read through a
    read-only engine and never write. Errors propagate to
    `core.training.ranks`, which reports them to the worker that started the ranks."""
    engine = get_engine() if placement.leader else read_engine(get_settings().db_url)
    with Session(engine, expire_on_commit=False) as session:
        round_ = session.get(TrainingRound, round_id)
        if round_ is None:
            raise NotFoundError(f"No training round {round_id}")
        reporter = RoundReporter(round_, session) if placement.leader else SilentReporter(round_)
        train_and_register(round_, reporter, placement, session=session)


def epoch_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The random flips of one rank's epoch: the same on a resumed attempt."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1_009 + rank)


def checkpoint_payload(config, classes, state: TrainState, model, optimizer, scheduler) -> dict:
    """`model` is what trains: the whole network, or in `head` mode only the
    head (the frozen backbone is saved once per round, as backbone.pt). The
    data order and flips follow from the seed and the epoch, so no sampler
    state is needed."""
    return {
        "config": config.to_dict(),
        "classes": classes,
        "epoch": state.epoch,
        "best_accuracy": state.best_accuracy,
        "best_epoch": state.best_epoch,
        # None when this epoch is the best: its weights are `state_dict` (a
        # quarter of the file, and of its write time, saved).
        "best_state": None if state.best_epoch == state.epoch else state.best_state,
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"python": random.getstate(), "torch": torch.get_rng_state()},
    }


def resume_from(path: Path, model, optimizer, scheduler, steps_per_epoch: int) -> TrainState:
    """Load a checkpoint of `checkpoint_payload` into `model`, the optimizer,
    the scheduler and the random generators; where training stood."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(payload["state_dict"])
    try:
        recipe.load_optimizer_state(optimizer, payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
    except (KeyError, ValueError):
        # A checkpoint written before the training recipe (one parameter
        # group, a schedule stepped per epoch): the weights and the epoch
        # resume; the optimizer's moments start afresh, the schedule where it stood.
        with warnings.catch_warnings():  # "step() before optimizer.step()": on purpose here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(payload["epoch"] * steps_per_epoch):
                scheduler.step()
    random.setstate(payload["rng"]["python"])
    torch.set_rng_state(payload["rng"]["torch"])
    best_state = payload["best_state"]
    if best_state is None:
        best_state = {k: v.clone() for k, v in payload["state_dict"].items()}
    return TrainState(payload["epoch"], payload["best_accuracy"], payload["best_epoch"], best_state)


def delete_epoch_metrics_after(round_id: int, epoch: int, *, session: Session) -> None:
    """Drop the metric rows of epochs a resumed attempt trains again."""
    session.exec(delete(EpochMetric).where(EpochMetric.round_id == round_id, EpochMetric.epoch > epoch))
