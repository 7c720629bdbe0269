"""What trains in a round, and on what: the round's images split into
training, validation and test (`load_split`), and the two trainers, `full`
(every layer, on the images) and `head` (the classifier only, on a frozen
backbone's cached features). The epoch loop (`core.training.loop`) drives
either through the same five steps: setup, batch, end_epoch, validate,
final_logits.
"""

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from sqlmodel import Session, col, select
from torch import nn

from core.cache import feature_key, get_cache
from core.config import get_settings
from core.dataset import Images, load_images, write_image_file
from core.errors import UserError
from core.ingest import image_path
from core.models import TrainingImage, TrainingRound
from core.splits import split_snapshot
from core.training import recipe
from core.training.config import TrainingConfig
from core.training.evaluation import evaluate, recalibrate_batchnorm
from core.training.networks import build_model, find_backbone, head, initial_model, no_backbone_reason, set_head
from core.training.placement import MEMORY_FORMAT, Placement, device_of, prepare_batch
from core.training.progress import RoundReporter, round_dir, save_checkpoint

# Images per forward pass when extracting `head` mode features: at 224 px,
# channels_last, batches of 16 ran resnet18 at 64 images/s (32: 55, 64: 45,
# 128: 42) and mobilenet_v3_small at 645 (32: 675, 64: 399, 128: 341).
FEATURE_BATCH = 16
# Per-epoch BatchNorm recalibration looks at this many training images: enough
# for the per-epoch validation figure, and a small part of an epoch (a forward
# pass over every training image cost a third of the epoch; 128 images still
# held mobilenet_v3_small at 160 px to a/c 0.68 in BENCHMARKS.md). The model
# that is kept is recalibrated on up to 512 images before its final metrics.
EPOCH_RECALIBRATION_IMAGES = 64


@dataclass
class Split:
    """A round's images (uint8, in memory or read from a file as needed),
    labels, SHA-256s and image ids: training, validation and test, each in
    the order of the round's snapshot."""

    x_train: Images
    y_train: torch.Tensor
    x_val: Images
    y_val: torch.Tensor
    sha_train: list[str]
    sha_val: list[str]
    x_test: Images
    y_test: torch.Tensor
    sha_test: list[str]
    ids_train: list[int]
    ids_val: list[int]
    ids_test: list[int]
    # The test images' files: the promotion gate runs production on them.
    paths_test: list[Path]


def load_split(
    round_: TrainingRound, config: TrainingConfig, classes: list[str], reporter: RoundReporter, *, session: Session
) -> Split:
    """The snapshot's images, decoded at the round's size and split by their
    fixed split keys (`core.splits`); an image gone from the database fails the round."""
    snapshot = round_.snapshot
    images = {
        img.id: img
        for img in session.exec(select(TrainingImage).where(col(TrainingImage.id).in_([s["id"] for s in snapshot])))
    }
    missing = [s["id"] for s in snapshot if s["id"] not in images]
    if missing:
        raise RuntimeError(f"{len(missing)} image(s) of the snapshot are no longer in the database (ids {missing[:5]})")
    index = {name: i for i, name in enumerate(classes)}
    paths = [image_path(images[s["id"]]) for s in snapshot]
    shas = [s["sha256"] for s in snapshot]
    ids = [s["id"] for s in snapshot]
    labels = [index[s["label"]] for s in snapshot]
    parts = split_snapshot([s.get("split_key") for s in snapshot], labels, classes, config.val_split, config.seed)
    for note in parts.notes:
        reporter.note(note)
    y_all = torch.tensor(labels, dtype=torch.long)
    train, val, test = parts.train, parts.val, parts.test
    size = config.image_size
    # Decoded in training, validation, test order: each part is a run of rows, no copy.
    order = [*train, *val, *test]
    ordered = [paths[i] for i in order], size, [shas[i] for i in order]
    if len(order) * 3 * size * size > get_settings().training_images_max_bytes:
        rows = write_image_file(round_dir(round_) / f"images_{size}px.u8", *ordered)
        reporter.note(f"{len(order)} images at {size} px are read from disk batch by batch (TRAINING_IMAGES_MAX_BYTES)")
    else:
        rows = load_images(*ordered)
    x_train, x_val, x_test = rows.split([len(train), len(val), len(test)])
    return Split(
        x_train,
        y_all[train],
        x_val,
        y_all[val],
        [shas[i] for i in train],
        [shas[i] for i in val],
        x_test,
        y_all[test],
        [shas[i] for i in test],
        [ids[i] for i in train],
        [ids[i] for i in val],
        [ids[i] for i in test],
        [paths[i] for i in test],
    )


class FullTrainer:
    """`full` mode: every layer trains on the decoded images."""

    def __init__(self, config: TrainingConfig, classes: list[str], data: Split, placement: Placement):
        self.config, self.classes, self.data, self.placement = config, classes, data, placement

    @staticmethod
    def amp_architecture(config: TrainingConfig) -> str | None:
        """The architecture whose mixed precision the training steps take
        (`placement.amp_dtype`): the whole network trains."""
        return config.architecture

    def setup(self, round_: TrainingRound, reporter: RoundReporter, resume: bool, *, session: Session) -> None:
        # Ranks other than 0 start from any weights: DDP copies rank 0's to them.
        if resume or not self.placement.leader:
            model = build_model(self.config.architecture, len(self.classes))
        else:
            model = initial_model(self.config, self.classes, reporter, session=session)
        self.model = self.trainable = model.to(self.placement.device, memory_format=MEMORY_FORMAT)

    def batch(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The training images `idx`, augmented as the recipe says, ready for the model."""
        return prepare_batch(recipe.augment_batch(self.data.x_train[idx], generator), self.placement.device)

    def end_epoch(self) -> None:
        recalibrate_batchnorm(self.model, self.data.x_train, max_images=EPOCH_RECALIBRATION_IMAGES)

    def validate(self) -> tuple[float, torch.Tensor]:
        return evaluate(self.model, self.data.x_val, self.data.y_val)

    def final_logits(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits of the kept model for the training, validation and test images."""
        recalibrate_batchnorm(self.model, self.data.x_train)
        _, train_logits = evaluate(self.model, self.data.x_train, self.data.y_train)
        _, test_logits = evaluate(self.model, self.data.x_test, self.data.y_test)
        return train_logits, self.validate()[1], test_logits


class HeadTrainer(FullTrainer):
    """`head` mode: a frozen backbone's features, computed once per image and
    cached, feed the only layer that trains (the classifier head). One
    process only (`TrainingConfig` refuses more)."""

    @staticmethod
    def amp_architecture(config: TrainingConfig) -> str | None:
        # One linear layer on cached features: no CPU bfloat16 (nothing to gain).
        return None

    def setup(self, round_: TrainingRound, reporter: RoundReporter, resume: bool, *, session: Session) -> None:
        saved = round_dir(round_) / "backbone.pt"
        if resume:
            # The backbone this round started with, even if production changed since.
            payload = torch.load(saved, map_location="cpu", weights_only=True)
            model = build_model(self.config.architecture, len(self.classes))
            model.load_state_dict(payload["state_dict"])
            identity = payload["identity"]
        else:
            backbone = find_backbone(self.config, session=session)
            if backbone is None:
                raise UserError(no_backbone_reason(self.config, session=session))
            model, identity = backbone.build(self.classes), backbone.identity()
            save_checkpoint(saved, {"state_dict": model.state_dict(), "identity": identity})
            reporter.note(f"Training mode head: {backbone.describe()} is frozen; only the classifier trains")
        device = self.placement.device
        self.model = model.eval().to(device, memory_format=MEMORY_FORMAT)
        self.model.requires_grad_(False)
        self.trainable = head(self.model).requires_grad_(True)
        data, size = self.data, self.config.image_size
        features = partial(extract_features, self.model, size=size, backbone=identity, reporter=reporter)
        self.f_train = features(data.x_train, data.sha_train).to(device)
        # Flipped copies stand in for the full mode's random flips.
        self.f_train_flip = features(data.x_train, data.sha_train, flipped=True).to(device)
        self.f_val = features(data.x_val, data.sha_val).to(device)
        self.f_test = features(data.x_test, data.sha_test).to(device)

    def batch(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        flip = (torch.rand(len(idx), generator=generator) < 0.5).to(self.placement.device).view(-1, 1)
        return torch.where(flip, self.f_train_flip[idx], self.f_train[idx])

    def end_epoch(self) -> None:
        pass  # the frozen backbone's BatchNorm statistics do not change

    def validate(self) -> tuple[float, torch.Tensor]:
        with torch.inference_mode():
            logits = self.trainable(self.f_val).float().cpu()
        return float(nn.functional.cross_entropy(logits, self.data.y_val)), logits

    def final_logits(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            train, val = self.trainable(self.f_train).float().cpu(), self.trainable(self.f_val).float().cpu()
            if len(self.data.y_test):
                return train, val, self.trainable(self.f_test).float().cpu()
            return train, val, torch.empty(0, train.shape[1])


def extract_features(
    model: nn.Module,
    x: torch.Tensor,
    shas: list[str],
    *,
    size: int,
    backbone: str,
    reporter: RoundReporter | None = None,
    flipped: bool = False,
) -> torch.Tensor:
    """The input of `model`'s classifier head for each image (N, D), on the
    CPU, from the cache where an earlier epoch or job computed it."""
    cache = get_cache()
    keys = [feature_key(sha, size, backbone, flipped) for sha in shas]
    found = [cache.get(key) for key in keys]
    todo = [i for i, f in enumerate(found) if f is None]
    if todo:
        kept = head(model)
        device = device_of(model)
        set_head(model, nn.Identity())
        try:
            model.eval()
            for start in range(0, len(todo), FEATURE_BATCH):
                if reporter is not None:
                    reporter.check_cancel()
                chunk = todo[start : start + FEATURE_BATCH]
                images = x[chunk].flip(3) if flipped else x[chunk]
                with torch.inference_mode():
                    out = model(prepare_batch(images, device)).float().cpu()
                for i, row in zip(chunk, out, strict=True):
                    found[i] = row.clone()
                    cache.put(keys[i], found[i])
        finally:
            set_head(model, kept)
    return torch.stack(found) if found else torch.empty(0)
