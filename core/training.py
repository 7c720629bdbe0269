"""Training rounds: validate and snapshot a request, then train, export, register.

A round's life: `start_training` checks the request and freezes the dataset
(status `queued`); `run_training_round` (called by the queue worker) trains,
writes an `EpochMetric` and a checkpoint per epoch, exports the best epoch and
commits the `ModelVersion` together with the round's `completed` status.
"""

import hashlib
import http.client
import json
import logging
import math
import random
import re
import shutil
import statistics
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torchvision
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, delete, select, update
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from core import gate, recipe, registry, suspects
from core.access import SYSTEM_ACTOR
from core.cache import feature_key, get_cache
from core.config import get_settings
from core.dataset import load_images, normalize
from core.db import get_engine, read_engine
from core.distributed import Placement, run_ranks
from core.errors import ConflictError, NotFoundError, TrainingCancelled, UserError
from core.export import artifact_path, export_model, remove_files
from core.faults import crash_point
from core.ingest import file_sha256, image_path
from core.models import (
    FINISHED_STATUSES,
    Category,
    EpochMetric,
    ImageStatus,
    ModelVersion,
    RoundStatus,
    TrainingImage,
    TrainingRound,
    as_utc,
    utcnow,
)
from core.splits import assign_splits, split_snapshot
from core.storage import commit_temp, temp_path_for

log = logging.getLogger(__name__)

ARCHITECTURES = ("mobilenet_v3_small", "resnet18", "efficientnet_b0")
# `full` trains every layer; `head` freezes a pretrained backbone, computes its
# features once per image and trains only the classifier (a quick retrain).
TRAINING_MODES = ("full", "head")
# `image_size` "auto": chosen from the snapshot's pictures (`choose_image_size`).
AUTO = "auto"
# What "auto" may choose: a multiple of 32 between these (224 is what the
# architectures were designed for; more costs compute and adds no information).
AUTO_IMAGE_SIZE_RANGE = (32, 224)


@dataclass(frozen=True)
class TrainingConfig:
    """A job's parameters; checkpoints carry it so a model can be rebuilt."""

    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 0.001
    use_existing_model: bool = True
    architecture: str = "mobilenet_v3_small"
    # "auto": the pictures' median short side (`choose_image_size`), resolved
    # to a number when the round is queued; a number always wins.
    image_size: int | str = AUTO
    val_split: float = 0.2
    seed: int = 42
    # `full` by default: it works on a fresh install (no pretrained backbone
    # needed) and adapts every layer to the images; `head` is the quick retrain.
    training_mode: str = "full"
    # Processes (DDP ranks) that train the job together; at most MAX_TRAINING_PROCESSES.
    processes: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_params(cls, params: Mapping | None) -> "TrainingConfig":
        """Validate user-supplied parameters; unknown, missing-typed or
        out-of-range values raise UserError naming the field and the range."""
        params = dict(params or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise UserError(f"Unknown parameter(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        values = {}
        for name, value in params.items():
            if value is None:
                continue
            values[name] = _check_param(name, value)
        config = cls(**values)
        if config.training_mode == "head" and config.processes > 1:
            raise UserError(
                "training_mode 'head' runs in one process: it trains one linear layer on cached features, "
                f"which several processes cannot speed up. Set processes to 1 (got {config.processes}) "
                "or use training_mode 'full'"
            )
        return config


# name -> (type, minimum, maximum)
PARAM_RANGES: dict[str, tuple[type, float, float]] = {
    "epochs": (int, 1, 500),
    "batch_size": (int, 2, 1024),
    "learning_rate": (float, 1e-6, 1.0),
    "image_size": (int, 32, 512),
    "val_split": (float, 0.05, 0.5),
    "seed": (int, 0, 2**31 - 1),
    # The maximum is MAX_TRAINING_PROCESSES (see `param_range`).
    "processes": (int, 1, 1),
}


def param_range(name: str) -> tuple[type, float, float]:
    """(type, minimum, maximum) of a numeric parameter, with today's settings."""
    kind, low, high = PARAM_RANGES[name]
    if name == "processes":
        high = get_settings().max_training_processes
    return kind, low, high


def _check_param(name: str, value, label: str | None = None):
    """`value` as the parameter's type, or UserError naming it by `label`
    (the field's name in the API; the dashboard passes the form's labels)."""
    label = label or name
    if name == "use_existing_model":
        if not isinstance(value, bool):
            raise UserError(f"{label} must be true or false (got {value!r})")
        return value
    if name == "architecture":
        if value not in ARCHITECTURES:
            raise UserError(f"{label} must be one of {', '.join(ARCHITECTURES)} (got {value!r})")
        return value
    if name == "image_size" and value == AUTO:
        return value
    if name == "training_mode":
        if value not in TRAINING_MODES:
            raise UserError(f"{label} must be one of {', '.join(TRAINING_MODES)} (got {value!r})")
        return value
    kind, low, high = param_range(name)
    top = f"MAX_TRAINING_PROCESSES={high:g}" if name == "processes" else f"{high:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        also = f" or {AUTO!r}" if name == "image_size" else ""
        raise UserError(f"{label} must be a number between {low:g} and {top}{also} (got {value!r})")
    if kind is int and (isinstance(value, float) and not value.is_integer()):
        raise UserError(f"{label} must be a whole number between {low:g} and {top} (got {value!r})")
    if not math.isfinite(value) or not low <= value <= high:
        raise UserError(f"{label} must be between {low:g} and {top} (got {value!r})")
    return kind(value)


def param_problems(params: Mapping, labels: Mapping[str, str]) -> dict[str, str]:
    """What is wrong with each field of a parameter form, by field name, in
    the words of `from_params` but naming each field by its label; empty when
    `from_params` accepts them all."""
    problems = {}
    for name, value in params.items():
        try:
            _check_param(name, value, labels.get(name))
        except UserError as exc:
            problems[name] = str(exc)
    if not problems:
        try:
            TrainingConfig.from_params(params)
        except UserError as exc:  # a rule across fields (head mode in one process)
            problems["processes"] = str(exc)
    return problems


def last_parameters(requested_by: str, *, session: Session) -> dict | None:
    """The parameters of the last job `requested_by` asked for (the Train
    form starts from them), or None when they never asked for one."""
    query = (
        select(TrainingRound.parameters)
        .where(TrainingRound.requested_by == requested_by, col(TrainingRound.trigger).is_(None))
        .order_by(col(TrainingRound.id).desc())
        .limit(1)
    )
    return session.exec(query).first()


@dataclass
class Preflight:
    """What training would use now, and why it cannot start (if it cannot)."""

    total: int
    per_category: dict[str, int]
    problems: list[str]
    notices: list[str]
    # What image_size "auto" picks from today's validated images (None: a
    # number was given, or there are no images).
    image_size: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def validated_images(*, session: Session) -> list[tuple[TrainingImage, str]]:
    rows = session.exec(
        select(TrainingImage, Category.name)
        .join(Category, Category.id == TrainingImage.category_id)
        .where(TrainingImage.status == ImageStatus.validated)
        .order_by(TrainingImage.id)
    ).all()
    return list(rows)


def preflight(config: TrainingConfig | None = None, *, session: Session) -> Preflight:
    """Check the dataset rules (and, given a config, the existing-model choice)."""
    settings = get_settings()
    rows = validated_images(session=session)
    per_category = dict(sorted(Counter(label for _, label in rows).items()))
    problems = []
    if len(rows) < settings.min_training_images:
        problems.append(
            f"Training needs at least {settings.min_training_images} validated images; "
            f"there are {len(rows)}. Validate {settings.min_training_images - len(rows)} more."
        )
    if len(per_category) < 2:
        have = ", ".join(per_category) or "none"
        problems.append(
            f"Training needs validated images in at least 2 categories; found {len(per_category)} ({have})."
        )
    small = {c: n for c, n in per_category.items() if n < settings.min_images_per_category}
    if small:
        listed = ", ".join(f"'{c}' has {n}" for c, n in small.items())
        problems.append(
            f"Each category needs at least {settings.min_images_per_category} validated images "
            f"(one to train on, one to validate with): {listed}. Add images or reject them."
        )
    notices = []
    image_size = None
    if config is not None and config.image_size == AUTO and rows:
        image_size, why = choose_image_size([(img.width, img.height) for img, _ in rows])
        notices.append(why)
    if config is not None and config.training_mode == "head":
        backbone = find_backbone(config, session=session)
        if backbone is None:
            problems.append(_no_backbone_reason(config, session=session))
        else:
            notices.append(f"Head mode: {backbone.describe()} is frozen; only the classifier is trained.")
    elif config is not None and config.use_existing_model:
        notices.extend(_existing_model_notice(config, sorted(per_category), session=session))
    return Preflight(len(rows), per_category, problems, notices, image_size)


def choose_image_size(sizes: list[tuple[int, int]]) -> tuple[int, str]:
    """The input size for image_size "auto", and why, from (width, height) of
    the pictures: their median short side rounded to the nearest multiple of
    32, within AUTO_IMAGE_SIZE_RANGE. Scaling 64-px pictures up to 224 costs
    about 12x the compute and adds no information; the median ignores a few
    odd large or small pictures."""
    low, high = AUTO_IMAGE_SIZE_RANGE
    median = statistics.median(min(w, h) for w, h in sizes)
    size = min(high, max(low, 32 * math.floor(median / 32 + 0.5)))
    why = (
        f"image_size auto: {size} px, from the median short side ({median:g} px) of the {len(sizes)} validated "
        f"images, rounded to a multiple of 32 between {low} and {high}; give image_size to choose another."
    )
    return size, why


def _existing_model_notice(config: TrainingConfig, classes: list[str], *, session: Session) -> list[str]:
    production = registry.production_version(session=session)
    if production is None:
        return ["Use existing model: no model is in production yet, so a new model is trained from scratch."]
    if list(production.classes) != classes:
        text = (
            f"Use existing model: production model {production.version} knows {len(production.classes)} "
            f"categories ({', '.join(production.classes)}) but the dataset has {len(classes)} "
            f"({', '.join(classes)}), so a new model is trained from scratch."
        )
        return [text]
    if production.architecture != config.architecture:
        text = (
            f"Use existing model: production model {production.version} is a {production.architecture}, "
            f"not a {config.architecture}, so a new model is trained from scratch."
        )
        return [text]
    return []


def snapshot_hash(snapshot: list[dict]) -> str:
    return hashlib.sha256(json.dumps(snapshot, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def start_training(
    params: Mapping | None, *, session: Session, requested_by: str | None = None, trigger: str | None = None
) -> TrainingRound:
    """Validate a request and create a `queued` round with a frozen dataset snapshot.

    `trigger` names the automatic trigger that asked for it (None: a person).
    The caller enqueues the round (see `jobs.submit_training`)."""
    config = TrainingConfig.from_params(params)
    check = preflight(config, session=session)
    if not check.ok:
        raise UserError(" ".join(check.problems))
    if config.image_size == AUTO:
        config = replace(config, image_size=check.image_size)
    assign_splits(session=session)  # images stored before split keys existed
    rows = validated_images(session=session)
    snapshot = [{"id": img.id, "sha256": img.sha256, "label": label, "split_key": img.split_key} for img, label in rows]
    round_ = TrainingRound(
        parameters=config.to_dict(),
        requested_by=requested_by,
        trigger=trigger,
        snapshot=snapshot,
        snapshot_hash=snapshot_hash(snapshot),
        total_images=len(snapshot),
        category_distribution=check.per_category,
        classes=sorted(check.per_category),
        warnings=check.notices,
        history=[
            _line(
                f"queued by {requested_by or 'unknown'}"
                + (f" (automatic trigger: {trigger})" if trigger else "")
                + f" with {len(snapshot)} images"
            )
        ],
    )
    session.add(round_)
    session.flush()
    return round_


def _line(text: str) -> str:
    return f"{utcnow():%Y-%m-%d %H:%M:%S}Z {text}"


# A numeric round id: ASCII digits, few enough for the database's integer column.
ROUND_ID = re.compile(r"[0-9]{1,12}")


def get_round(job_id_or_id: str | int, *, session: Session) -> TrainingRound:
    """A round by public job id (UUID) or numeric id."""
    text = str(job_id_or_id).strip()
    query = select(TrainingRound).where(
        (TrainingRound.job_id == text)
        | (TrainingRound.id == int(text) if ROUND_ID.fullmatch(text) else TrainingRound.job_id == text)
    )
    found = session.exec(query).first()
    if found is None:
        raise NotFoundError(f"No training job with id '{text}'")
    return found


def list_rounds(*, session: Session, limit: int = 50) -> list[TrainingRound]:
    return list(session.exec(select(TrainingRound).order_by(col(TrainingRound.id).desc()).limit(limit)))


def epoch_metrics(round_id: int, *, session: Session) -> list[EpochMetric]:
    return list(session.exec(select(EpochMetric).where(EpochMetric.round_id == round_id).order_by(EpochMetric.epoch)))


def request_cancel(job_id: str, *, session: Session, by: str | None = None) -> TrainingRound:
    """Cancel a queued round now, or ask a running one to stop after its batch."""
    round_ = get_round(job_id, session=session)
    if round_.status in FINISHED_STATUSES:
        raise ConflictError(
            f"Job {round_.job_id} is already {round_.status.value}; only queued or running jobs can be cancelled"
        )
    round_.cancel_requested = True
    if round_.status == RoundStatus.queued:
        _finish(
            round_,
            RoundStatus.cancelled,
            f"cancelled by {by or 'unknown'} before it started",
        )
    else:
        round_.history = [
            *round_.history,
            _line(f"cancel requested by {by or 'unknown'}"),
        ]
    session.add(round_)
    session.flush()
    return round_


def request_stop(job_id: str, *, session: Session, by: str | None = None) -> TrainingRound:
    """Stop and keep the best so far: a running round ends training after
    its current batch (once one epoch has been validated) and registers its
    best epoch as a version, through the gate; a queued one has nothing to
    keep and is cancelled."""
    round_ = get_round(job_id, session=session)
    if round_.status == RoundStatus.queued:
        return request_cancel(job_id, session=session, by=by)
    if round_.status in FINISHED_STATUSES:
        raise ConflictError(f"Job {round_.job_id} is already {round_.status.value}; only a running job can be stopped")
    round_.stop_requested = True
    round_.history = [*round_.history, _line(f"stop requested by {by or 'unknown'}: keeping the best epoch so far")]
    session.add(round_)
    session.flush()
    return round_


def _finish(round_: TrainingRound, status: RoundStatus, note: str) -> None:
    round_.status = status
    round_.phases = _enter_phase(round_.phases, None)
    round_.finished_at = utcnow()
    round_.history = [*round_.history, _line(note)]
    shutil.rmtree(round_dir(round_), ignore_errors=True)


def round_dir(round_: TrainingRound) -> Path:
    return get_settings().rounds_dir / round_.job_id


# --- the job itself ---------------------------------------------------------


class RoundReporter:
    """Writes progress and epoch rows; notices cancellation between batches."""

    def __init__(self, round_: TrainingRound, session: Session, min_interval: float = 1.0):
        self.round = round_
        self.session = session
        self.min_interval = min_interval
        self._last = 0.0
        # Cancel checks read through their own deferred transactions, so the
        # per-batch check never holds the database's write lock.
        self._reader = read_engine(str(session.get_bind().url))

    def requests(self) -> tuple[bool, bool]:
        """Whether someone asked to cancel, and to stop keeping the best epoch."""
        query = select(TrainingRound.cancel_requested, TrainingRound.stop_requested).where(
            TrainingRound.id == self.round.id
        )
        with Session(self._reader) as reader:
            cancel, stop = reader.exec(query).one()
        return cancel, stop

    def cancel_requested(self) -> bool:
        return self.requests()[0]

    def check_cancel(self) -> None:
        if self.cancel_requested():
            raise TrainingCancelled()

    def batch(self, epoch: int, batch: int, total_batches: int, epochs: int) -> None:
        """Progress (at most every `min_interval` seconds); the loop checks for a cancel."""
        now = time.monotonic()
        if now - self._last >= self.min_interval or batch == total_batches:
            self._last = now
            self.round.current_epoch = epoch
            self.round.current_batch = batch
            self.round.total_batches = total_batches
            self.round.progress = ((epoch - 1) + batch / total_batches) / epochs
            self.session.add(self.round)
            self.session.commit()

    def epoch(self, metric: EpochMetric) -> None:
        self.session.add(metric)
        self.session.add(self.round)
        self.session.commit()

    def phase(self, name: str) -> None:
        """The job enters phase `name` (one of PHASES); the one running ends."""
        self.round.phases = _enter_phase(self.round.phases, name)
        self.session.add(self.round)
        self.session.commit()

    def note(self, text: str, warning: bool = False) -> None:
        self.round.history = [*self.round.history, _line(text)]
        if warning:
            self.round.warnings = [*self.round.warnings, text]
        self.session.add(self.round)
        self.session.commit()


class SilentReporter(RoundReporter):
    """The reporter of ranks other than 0: they never write, and follow rank 0's cancel decision."""

    def __init__(self, round_: TrainingRound):
        self.round = round_

    def requests(self) -> tuple[bool, bool]:
        return False, False

    def batch(self, epoch: int, batch: int, total_batches: int, epochs: int) -> None:
        pass

    def epoch(self, metric: EpochMetric) -> None:
        pass

    def phase(self, name: str) -> None:
        pass

    def note(self, text: str, warning: bool = False) -> None:
        pass


def _enter_phase(phases: list, name: str | None) -> list:
    """`phases` with the running one ended now and, given a `name`, that one begun."""
    now = utcnow().isoformat()
    out = [dict(p) for p in phases]
    if out and out[-1]["ended_at"] is None:
        out[-1]["ended_at"] = now
    if name is not None:
        out.append({"name": name, "started_at": now, "ended_at": None})
    return out


class Heartbeat:
    """Stamps `heartbeat_at` every few seconds from a thread while a job runs,
    including long steps without batches (loading images, exporting)."""

    def __init__(self, round_id: int, engine, interval: float):
        self.round_id, self.engine, self.interval = round_id, engine, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{round_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with Session(self.engine) as session:
                    session.exec(
                        update(TrainingRound).where(TrainingRound.id == self.round_id).values(heartbeat_at=utcnow())
                    )
                    session.commit()
            except Exception:  # a missed beat is retried at the next interval
                log.exception("heartbeat for round %s failed", self.round_id)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def max_attempts() -> int:
    return 1 + get_settings().training_retries


def build_model(architecture: str, num_classes: int) -> nn.Module:
    """A torchvision model with a `num_classes` head, randomly initialised
    (with the training recipe's initial-weight changes)."""
    return recipe.init_model(torchvision.models.get_model(architecture, weights=None, num_classes=num_classes))


def _head(model: nn.Module) -> nn.Linear:
    return model.fc if hasattr(model, "fc") else model.classifier[-1]


def pretrained_weights_url(architecture: str) -> str:
    """Where torchvision publishes the ImageNet weights of `architecture`, or
    the same file on the WEIGHTS_URL mirror. The file name carries the first
    hex digits of the file's SHA-256 (torch.hub's convention)."""
    url = torchvision.models.get_model_weights(architecture).DEFAULT.url
    mirror = get_settings().weights_url
    return f"{mirror.rstrip('/')}/{url.rsplit('/', 1)[-1]}" if mirror else url


def find_pretrained_weights(architecture: str) -> Path | None:
    """torchvision's ImageNet weight file for `architecture` if it is on disk
    (the weights folder or the torch hub cache). Never downloads."""
    filename = pretrained_weights_url(architecture).rsplit("/", 1)[-1]
    for folder in (get_settings().weights_folder, Path(torch.hub.get_dir()) / "checkpoints"):
        if (folder / filename).is_file():
            return folder / filename
    return None


def download_pretrained_weights(architecture: str, progress: Callable[[str], None]) -> Path:
    """Download torchvision's ImageNet weights for `architecture` into the
    weights folder and return the file; `progress` hears how far it got.

    The file is kept only when its SHA-256 starts with the digits its published
    name carries, as torch.hub's `check_hash` does; otherwise ValueError and
    nothing is left behind. An unreachable server raises OSError. Written here
    rather than calling `torch.hub.download_url_to_file`, which checks the hash
    the same way but shows progress only on a terminal, not on the round."""
    settings = get_settings()
    url = pretrained_weights_url(architecture)
    filename = url.rsplit("/", 1)[-1]
    published = torch.hub.HASH_REGEX.search(filename)
    if published is None:
        raise ValueError(f"{filename} carries no hash in its name, so the download could not be verified")
    target = settings.weights_folder / filename
    tmp = temp_path_for(target)
    digest = hashlib.sha256()
    try:
        progress(f"downloading ImageNet weights for {architecture} from {url}")
        with urllib.request.urlopen(url, timeout=settings.weights_timeout) as response, open(tmp, "wb") as out:
            total, done, told = int(response.headers.get("Content-Length") or 0), 0, 0
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if total and 4 * done // total > told:
                    told = 4 * done // total
                    progress(f"downloaded {done / 1e6:.1f} of {total / 1e6:.1f} MB of {filename}")
        if not digest.hexdigest().startswith(published.group(1)):
            raise ValueError(
                f"{filename} from {url} has SHA-256 {digest.hexdigest()[:16]}..., not the published "
                f"{published.group(1)}...: refused (a damaged or substituted file)"
            )
        commit_temp(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    progress(f"verified {filename} (SHA-256 starts with {published.group(1)}) and kept it in {target.parent}")
    return target


def _fetch_pretrained_weights(architecture: str, reporter: RoundReporter) -> Path | None:
    """The weights file, downloaded now if need be; None (and a warning on the
    round saying how to add the file) when that is off or fails."""
    settings = get_settings()
    if not settings.weights_download:
        why = "downloading them is off (WEIGHTS_DOWNLOAD=false)"
    else:
        try:
            return download_pretrained_weights(architecture, reporter.note)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            why = f"the download failed ({exc})"
    url = torchvision.models.get_model_weights(architecture).DEFAULT.url
    reporter.note(
        f"No ImageNet weights for {architecture} on this machine and {why}: the model trains from random "
        f"initialisation, so it needs more epochs and data. To start from them, put {url.rsplit('/', 1)[-1]} "
        f"(from {url}) into {settings.weights_folder}, or set WEIGHTS_URL to a mirror that has it.",
        warning=True,
    )
    return None


def initial_model(
    config: TrainingConfig,
    classes: list[str],
    reporter: RoundReporter,
    *,
    session: Session,
) -> nn.Module:
    """The production model to fine-tune, else ImageNet weights (downloaded
    once where allowed), else random."""
    model = build_model(config.architecture, len(classes))
    if config.use_existing_model:
        notice = _existing_model_notice(config, classes, session=session)
        production = registry.production_version(session=session)
        if not notice and production is not None:
            model.load_state_dict(registry.load_checkpoint(production)["state_dict"])
            reporter.note(f"fine-tuning production model {production.version}")
            return model
    weights_file = find_pretrained_weights(config.architecture) or _fetch_pretrained_weights(
        config.architecture, reporter
    )
    if weights_file is None:
        return model
    _load_keeping_head(model, torch.load(weights_file, map_location="cpu", weights_only=True))
    reporter.note(f"starting from ImageNet weights ({weights_file.name})")
    return model


def _head_prefix(model: nn.Module) -> str:
    return "fc" if hasattr(model, "fc") else f"classifier.{len(model.classifier) - 1}"


def _load_keeping_head(model: nn.Module, state: dict) -> None:
    """Load every weight of `state` but the classifier head, which stays as
    initialised (ImageNet's has 1000 outputs, another model's other classes)."""
    prefix = _head_prefix(model)
    state = {k: v for k, v in state.items() if not k.startswith(prefix + ".")}
    state.update({f"{prefix}.{k}": v for k, v in _head(model).state_dict().items()})
    model.load_state_dict(state)


def _set_head(model: nn.Module, module: nn.Module) -> None:
    if hasattr(model, "fc"):
        model.fc = module
    else:
        model.classifier[-1] = module


@dataclass(frozen=True)
class Backbone:
    """Where `head` mode's frozen backbone comes from: ImageNet weights, or
    the production model (same architecture) for a quick retrain."""

    architecture: str
    path: Path
    production: ModelVersion | None = None

    def describe(self) -> str:
        if self.production is None:
            return f"the ImageNet {self.architecture} backbone ({self.path.name})"
        return f"the backbone of production model {self.production.version} ({self.architecture})"

    def identity(self) -> str:
        """Names the weights, so cached features never outlive them."""
        return f"{self.architecture}-{file_sha256(self.path)[:20]}"

    def build(self, classes: list[str]) -> nn.Module:
        """The whole network: these backbone weights and a head for `classes`
        (the production model's own head when its classes are the same)."""
        model = build_model(self.architecture, len(classes))
        if self.production is None:
            _load_keeping_head(model, torch.load(self.path, map_location="cpu", weights_only=True))
            return model
        state = registry.load_checkpoint(self.production)["state_dict"]
        if list(self.production.classes) == classes:
            model.load_state_dict(state)
        else:
            _load_keeping_head(model, state)
        return model


def find_backbone(config: TrainingConfig, *, session: Session) -> Backbone | None:
    """ImageNet weights for the architecture, else the production model's own
    (when it is that architecture and `use_existing_model` is on), else None."""
    weights_file = find_pretrained_weights(config.architecture)
    if weights_file is not None:
        return Backbone(config.architecture, weights_file)
    production = registry.production_version(session=session)
    if config.use_existing_model and production is not None and production.architecture == config.architecture:
        return Backbone(config.architecture, get_settings().data_dir / production.checkpoint_path, production)
    return None


def _no_backbone_reason(config: TrainingConfig, *, session: Session) -> str:
    production = registry.production_version(session=session)
    if production is None:
        other = "no model is in production yet"
    elif production.architecture != config.architecture:
        other = f"the production model {production.version} is a {production.architecture}"
    else:
        other = "use_existing_model is off, so the production model may not be used"
    return (
        f"training_mode 'head' trains only the classifier on top of a pretrained backbone, but there is none: "
        f"no ImageNet weights for {config.architecture} are on this machine (the weights folder or the torch hub "
        "cache; a full-mode round downloads them where WEIGHTS_DOWNLOAD allows) "
        f"and {other}. Train with training_mode 'full' first, or add the weights."
    )


def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, max_images: int = 512, batch_size: int = 64) -> None:
    """Recompute BatchNorm running statistics from the current weights.

    The running averages lag behind weights that change quickly (a model
    trained from scratch), so evaluation with them is far worse than the
    training accuracy; a no-grad pass over training images fixes that."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or x.shape[0] < 2:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches below
    # A fixed random sample: the rows of `x` are grouped by class.
    sample = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:max_images]]
    device = _device_of(model)
    model.train()
    with torch.no_grad():
        for start in range(0, sample.shape[0], batch_size):
            chunk = sample[start : start + batch_size]
            if chunk.shape[0] > 1:
                model(prepare_batch(chunk, device))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 128) -> tuple[float, torch.Tensor]:
    """Mean loss and the logits of every image (eval mode, no autograd, full
    precision: the figures recorded are those of the exported float model)."""
    device = _device_of(model)
    model.eval()
    logits = []
    with torch.inference_mode():
        for start in range(0, x.shape[0], batch_size):
            logits.append(model(prepare_batch(x[start : start + batch_size], device)).float().cpu())
    out = torch.cat(logits) if logits else torch.empty(0, _head(model).out_features)
    loss = float(nn.functional.cross_entropy(out, y)) if len(y) else 0.0
    return loss, out


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean() * 100) if len(y) else 0.0


def summarise(logits: torch.Tensor, y: torch.Tensor, classes: list[str]) -> dict:
    """Per-class accuracy (percent) and the confusion matrix (rows: truth)."""
    n = len(classes)
    matrix = torch.zeros((n, n), dtype=torch.long)
    for truth, pred in zip(y.tolist(), logits.argmax(1).tolist(), strict=True):
        matrix[truth, pred] += 1
    per_class = {}
    for i, name in enumerate(classes):
        total = int(matrix[i].sum())
        per_class[name] = round(100.0 * int(matrix[i, i]) / total, 2) if total else None
    return {"per_class_accuracy": per_class, "confusion_matrix": matrix.tolist()}


def _save_checkpoint(path: Path, payload: dict) -> None:
    tmp = temp_path_for(path)
    try:
        torch.save(payload, tmp)
        commit_temp(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run_training_round(round_id: int, *, session: Session, task_id: str | None = None) -> ModelVersion | None:
    """Train one queued round to a registered ModelVersion.

    Commits as it goes (progress, epoch rows, checkpoints), since other
    processes watch the round, and resumes from the round's last checkpoint
    when an earlier attempt got that far. On error the round goes back to
    `queued` and the error is re-raised (the queue retries it), unless this
    was the last of `1 + TRAINING_RETRIES` attempts: then it is marked
    `failed`. Returns None when the round was cancelled, failed or had
    already finished, or when `task_id` (the queue task delivering it) is not
    the round's current one: the sweeper replaced it (`missing_from_queue`)."""
    # Locked (PostgreSQL) so a second delivery of the same job waits here and
    # then sees it running; SQLite's write lock does the same.
    round_ = session.exec(select(TrainingRound).where(TrainingRound.id == round_id).with_for_update()).first()
    if round_ is None:
        raise NotFoundError(f"No training round {round_id}")
    if round_.status in FINISHED_STATUSES:
        return None
    if task_id is not None and round_.queue_task_id not in (None, task_id):
        log.warning("round %s: task %s was replaced by %s; ignoring it", round_id, task_id, round_.queue_task_id)
        session.rollback()
        return None
    if round_.status == RoundStatus.in_progress and not _is_stale(round_):
        log.warning("round %s is already running elsewhere; ignoring a duplicate delivery", round_id)
        session.rollback()
        return None
    if round_.cancel_requested:
        _finish(round_, RoundStatus.cancelled, "cancelled before it started")
        session.add(round_)
        session.commit()
        return None
    round_.status = RoundStatus.in_progress
    round_.attempts += 1
    round_.started_at = round_.started_at or utcnow()
    round_.heartbeat_at = utcnow()
    round_.error = None
    round_.history = [*round_.history, _line(f"attempt {round_.attempts} of {max_attempts()} started")]
    session.add(round_)
    session.commit()
    try:
        with Heartbeat(round_.id, session.get_bind(), get_settings().heartbeat_interval):
            if round_.parameters.get("processes", 1) > 1:
                return _train_in_ranks(round_, session=session)
            reporter = RoundReporter(round_, session)
            return _train_and_register(round_, reporter, Placement.local(), session=session)
    except TrainingCancelled:
        session.rollback()
        _finish(round_, RoundStatus.cancelled, "cancelled while training; no model was made")
        session.add(round_)
        session.commit()
        return None
    except Exception as exc:
        session.rollback()
        round_.error = f"{type(exc).__name__}: {exc}"
        log.exception("round %s attempt %s failed", round_.id, round_.attempts)
        if round_.attempts >= max_attempts():
            _finish(round_, RoundStatus.failed, f"attempt {round_.attempts} failed, giving up: {round_.error}")
            session.add(round_)
            session.commit()
            return None
        round_.status = RoundStatus.queued
        round_.history = [*round_.history, _line(f"attempt {round_.attempts} failed, will retry: {round_.error}")]
        session.add(round_)
        session.commit()
        raise


def _train_in_ranks(round_: TrainingRound, *, session: Session) -> ModelVersion:
    """The training part in `processes` DDP ranks (see `core.distributed`);
    rank 0 writes the round's progress, history and outcome itself."""
    try:
        run_ranks(round_.id, round_.parameters["processes"])
    except Exception:
        session.refresh(round_)
        # A rank that failed after rank 0 committed the version changes nothing.
        if round_.status != RoundStatus.completed:
            raise
    session.refresh(round_)
    version = session.get(ModelVersion, round_.model_version_id)
    session.commit()
    return version


def _is_stale(round_: TrainingRound) -> bool:
    if round_.heartbeat_at is None:
        return True
    age = utcnow() - as_utc(round_.heartbeat_at)
    return age > timedelta(seconds=get_settings().heartbeat_timeout)


def recover_stale_rounds(*, session: Session) -> list[int]:
    """Rounds `in_progress` whose worker died (stale heartbeat): put them back
    in the queue to resume from their checkpoint, or fail them when no attempt
    is left. Returns the ids to enqueue again; the caller commits."""
    cutoff = utcnow() - timedelta(seconds=get_settings().heartbeat_timeout)
    # FOR UPDATE: two consumers checking at once must not both re-enqueue a round.
    stale = session.exec(
        select(TrainingRound)
        .where(TrainingRound.status == RoundStatus.in_progress, TrainingRound.heartbeat_at < cutoff)
        .with_for_update()
    ).all()
    requeue = []
    for round_ in stale:
        seen = f"{round_.heartbeat_at:%H:%M:%S}Z" if round_.heartbeat_at else "never"
        lost = f"worker lost during attempt {round_.attempts} (last heartbeat {seen})"
        if round_.attempts >= max_attempts():
            round_.error = f"{lost}; no attempts left"
            _finish(round_, RoundStatus.failed, round_.error)
        else:
            checkpoint = round_dir(round_) / "checkpoint.pt"
            where = "its last checkpoint" if checkpoint.is_file() else "the start (no checkpoint yet)"
            round_.status = RoundStatus.queued
            round_.history = [*round_.history, _line(f"{lost}; re-enqueued to resume from {where}")]
            requeue.append(round_.id)
        session.add(round_)
    session.flush()
    return requeue


def missing_from_queue(task_ids: set[str], *, session: Session, grace: float | None = None) -> list[TrainingRound]:
    """`queued` rounds whose queue task is not among `task_ids` (what the queue
    holds, waiting or scheduled for a retry): the queue lost them, or was not
    writable when they were recorded. Rounds queued in the last `grace`
    seconds (default HEARTBEAT_TIMEOUT) are left alone, since their task may
    be on its way in (or just taken out by a consumer)."""
    grace = get_settings().heartbeat_timeout if grace is None else grace
    cutoff = utcnow() - timedelta(seconds=grace)
    rounds = session.exec(select(TrainingRound).where(TrainingRound.status == RoundStatus.queued)).all()
    return [
        r
        for r in rounds
        if r.queue_task_id not in task_ids
        and max(as_utc(r.created_at), as_utc(r.heartbeat_at or r.created_at)) < cutoff
    ]


def replace_queue_task(round_id: int, old: str | None, new: str, *, session: Session) -> bool:
    """Give a still-queued round the task `new` in place of `old`; False when
    someone else changed it first. A compare-and-set, so two sweepers running
    at once enqueue a lost round once, not twice."""
    changed = session.exec(
        update(TrainingRound)
        .where(
            TrainingRound.id == round_id,
            TrainingRound.status == RoundStatus.queued,
            col(TrainingRound.queue_task_id) == old if old is not None else col(TrainingRound.queue_task_id).is_(None),
        )
        .values(queue_task_id=new)
    )
    return changed.rowcount == 1


def active_rounds(*, session: Session) -> int:
    """How many rounds are running now (their files must not be touched)."""
    return len(session.exec(select(TrainingRound.id).where(TrainingRound.status == RoundStatus.in_progress)).all())


# Measured with bench/cpu_settings.py on this project's 2-core machine, one
# thread (BENCHMARKS.md): channels_last trains mobilenet_v3_small at 64 px at
# 776 images/s against 414 in the default layout, at 160 px 219 against 125,
# resnet18 at 160 px 35 against 27 (at 64 px, the same); inference gains as much.
MEMORY_FORMAT = torch.channels_last
CPU = torch.device("cpu")
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


def prepare_batch(x: torch.Tensor, device: torch.device = CPU) -> torch.Tensor:
    """uint8 images to the model's input on `device`: normalised, in the fast
    memory layout. The pixels travel as uint8 (a quarter of the bytes)."""
    return normalize(x.to(device, non_blocking=True)).contiguous(memory_format=MEMORY_FORMAT)


@dataclass
class Split:
    """A round's images (uint8) and labels: training, validation and test."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    sha_train: list[str]
    sha_val: list[str]
    x_test: torch.Tensor
    y_test: torch.Tensor
    sha_test: list[str]


class FullTrainer:
    """`full` mode: every layer trains on the decoded images."""

    def __init__(self, config: TrainingConfig, classes: list[str], data: Split, placement: Placement):
        self.config, self.classes, self.data, self.placement = config, classes, data, placement

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
                raise UserError(_no_backbone_reason(self.config, session=session))
            model, identity = backbone.build(self.classes), backbone.identity()
            _save_checkpoint(saved, {"state_dict": model.state_dict(), "identity": identity})
            reporter.note(f"training_mode head: {backbone.describe()} is frozen; only the classifier trains")
        device = self.placement.device
        self.model = model.eval().to(device, memory_format=MEMORY_FORMAT)
        self.model.requires_grad_(False)
        self.trainable = _head(self.model).requires_grad_(True)
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
        head = _head(model)
        device = _device_of(model)
        _set_head(model, nn.Identity())
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
            _set_head(model, head)
    return torch.stack(found) if found else torch.empty(0)


def train_rank(round_id: int, placement: Placement) -> None:
    """One rank of a round's DDP group (`python -m core.distributed`): rank 0
    writes as a single-process job does, the others read through a read-only
    engine and never write. Errors propagate to `core.distributed`, which
    reports them to the worker that started the ranks."""
    engine = get_engine() if placement.leader else read_engine(get_settings().db_url)
    with Session(engine, expire_on_commit=False) as session:
        round_ = session.get(TrainingRound, round_id)
        if round_ is None:
            raise NotFoundError(f"No training round {round_id}")
        reporter = RoundReporter(round_, session) if placement.leader else SilentReporter(round_)
        _train_and_register(round_, reporter, placement, session=session)


def _epoch_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The random augmentation of one rank's epoch: the same on a resumed attempt."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1_009 + rank)


def _train_and_register(
    round_: TrainingRound, reporter: RoundReporter, placement: Placement, *, session: Session
) -> ModelVersion | None:
    """Train and, on rank 0, export and register; other ranks return None after the last epoch."""
    config = TrainingConfig(**round_.parameters)
    classes = list(round_.classes)
    index = {name: i for i, name in enumerate(classes)}
    settings = get_settings()
    torch.set_num_threads(placement.threads(settings.training_threads))
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    reporter.phase("preparing")
    if placement.leader:  # another rank's change would be flushed: its session only reads
        round_.device = placement.describe()
        reporter.note(f"training on {round_.device}")

    images = {
        img.id: img
        for img in session.exec(
            select(TrainingImage).where(col(TrainingImage.id).in_([s["id"] for s in round_.snapshot]))
        )
    }
    missing = [s["id"] for s in round_.snapshot if s["id"] not in images]
    if missing:
        raise RuntimeError(f"{len(missing)} image(s) of the snapshot are no longer in the database (ids {missing[:5]})")
    paths = [image_path(images[s["id"]]) for s in round_.snapshot]
    shas = [s["sha256"] for s in round_.snapshot]
    labels = [index[s["label"]] for s in round_.snapshot]
    parts = split_snapshot(
        [s.get("split_key") for s in round_.snapshot], labels, classes, config.val_split, config.seed
    )
    for note in parts.notes:
        reporter.note(note)
    train_idx, val_idx, test_idx = parts.train, parts.val, parts.test
    x_all = load_images(paths, config.image_size, shas)
    y_all = torch.tensor(labels, dtype=torch.long)
    data = Split(
        x_all[train_idx],
        y_all[train_idx],
        x_all[val_idx],
        y_all[val_idx],
        [shas[i] for i in train_idx],
        [shas[i] for i in val_idx],
        x_all[test_idx],
        y_all[test_idx],
        [shas[i] for i in test_idx],
    )
    del x_all

    trainer = (HeadTrainer if config.training_mode == "head" else FullTrainer)(config, classes, data, placement)
    ckpt_path = round_dir(round_) / "checkpoint.pt"
    resume = ckpt_path.is_file()
    trainer.setup(round_, reporter, resume, session=session)
    trainable = trainer.trainable
    net = placement.wrap(trainable)
    n_train = len(train_idx)
    # Each rank takes its share of every batch, so one step still sees
    # `batch_size` images (the learning rate means the same for any count).
    sampler = DistributedSampler(
        range(n_train), num_replicas=placement.world_size, rank=placement.rank, shuffle=True, seed=config.seed
    )
    rank_batch = math.ceil(config.batch_size / placement.world_size)
    n_batches = max(1, math.ceil(len(sampler) / rank_batch))
    # The training recipe (core/recipe.py): optimizer, per-step schedule, loss.
    optimizer = recipe.build_optimizer(trainable, config.learning_rate)
    scheduler = recipe.build_scheduler(optimizer, config.epochs, n_batches)
    loss_fn = recipe.build_loss()
    scaler = placement.grad_scaler()
    state = TrainState()
    if resume:
        state = _resume(ckpt_path, trainable, optimizer, scheduler)
        if placement.leader:
            delete_epoch_metrics_after(round_.id, state.epoch, session=session)
        reporter.note(
            f"attempt {round_.attempts}: resumed from the checkpoint of epoch {state.epoch}, at epoch {state.epoch + 1}"
        )

    reporter.phase("training")
    for epoch in range(state.epoch + 1, config.epochs + 1):
        crash_point(f"rank{placement.rank}_epoch{epoch}")  # CRASH_AT, for the recovery tests
        started = time.perf_counter()
        net.train()
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), dtype=torch.long)
        generator = _epoch_generator(config.seed, epoch, placement.rank)
        total_loss = torch.zeros((), device=placement.device)
        correct = torch.zeros((), dtype=torch.long, device=placement.device)
        seen = 0
        lr = optimizer.param_groups[0]["lr"]
        stopped = False
        for b in range(n_batches):
            reporter.batch(epoch, b + 1, n_batches, config.epochs)
            cancel, stop = reporter.requests()
            if placement.agree(cancel):
                raise TrainingCancelled()
            # Only once an epoch has been validated is there a best to keep.
            stopped = placement.agree(stop and state.best_state is not None)
            if stopped:
                break
            idx = order[b * rank_batch : (b + 1) * rank_batch]
            if len(idx) < 2:
                continue  # BatchNorm cannot train on a single image (every rank's share is the same size)
            x = trainer.batch(idx, generator)
            y = data.y_train[idx].to(placement.device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with placement.autocast():
                logits = net(x)
                loss = loss_fn(logits, y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            total_loss += loss.detach().float() * len(idx)
            correct += (logits.argmax(1) == y).sum()
            seen += len(idx)
        if stopped:
            # The unfinished epoch is dropped: the best validated one is kept.
            reporter.note(f"training stopped on request in epoch {epoch}; keeping epoch {state.best_epoch}")
            break
        total_loss, correct, seen = placement.sum(total_loss, correct, seen)
        if not placement.leader:
            continue  # rank 0 validates and checkpoints; the others go on to the next epoch
        trainer.end_epoch()
        val_loss, val_logits = trainer.validate()
        val_acc = accuracy(val_logits, data.y_val)
        state.epoch = epoch
        if val_acc > state.best_accuracy:
            state.best_accuracy, state.best_epoch = val_acc, epoch
            state.best_state = {k: v.detach().clone() for k, v in trainable.state_dict().items()}
        # The metric row first, then the checkpoint: a crash in between resumes
        # from the previous checkpoint, deletes this row and trains the epoch
        # again, so every epoch keeps exactly one row.
        reporter.epoch(
            EpochMetric(
                round_id=round_.id,
                epoch=epoch,
                train_loss=total_loss / max(1, seen),
                train_accuracy=100.0 * correct / max(1, seen),
                val_loss=val_loss,
                val_accuracy=val_acc,
                learning_rate=lr,
                seconds=time.perf_counter() - started,
            )
        )
        payload = _checkpoint_payload(config, classes, state, trainable, optimizer, scheduler)
        _save_checkpoint(ckpt_path, payload)

    if not placement.leader:
        return None
    trainable.load_state_dict(state.best_state)
    reporter.note(f"training done; best epoch {state.best_epoch} with validation accuracy {state.best_accuracy:.1f}%")
    train_logits, val_logits, test_logits = trainer.final_logits()
    ids = [entry["id"] for entry in round_.snapshot]
    test_ids = [ids[i] for i in test_idx]
    test_labels = [round_.snapshot[i]["label"] for i in test_idx]
    predicted = {i: classes[p] for i, p in zip(test_ids, test_logits.argmax(1).tolist(), strict=True)}
    test_truth = dict(zip(test_ids, test_labels, strict=True))
    test_accuracy, test_per_class = gate.accuracy_on(predicted, test_truth, test_ids)
    metrics = {
        "train_accuracy": round(accuracy(train_logits, data.y_train), 2),
        "val_accuracy": round(accuracy(val_logits, data.y_val), 2),
        "best_epoch": state.best_epoch,
        "epochs_trained": state.epoch,
        "train_images": n_train,
        "val_images": len(val_idx),
        **summarise(val_logits, data.y_val, classes),
        "misclassified": _misclassified(val_logits, data.y_val, [ids[i] for i in val_idx], classes),
        "test_accuracy": test_accuracy,
        "test_per_class_accuracy": test_per_class,
        **gate.test_summary(predicted, test_truth),
    }
    # Every image of the snapshot, scored by the kept model (suspected mislabels).
    order = [*train_idx, *val_idx, *test_idx]
    scores = Scores(
        image_ids=[ids[i] for i in order],
        labels=[round_.snapshot[i]["label"] for i in order],
        probabilities=torch.cat([train_logits, val_logits, test_logits]).float().softmax(1),
    )
    test_images = TestImages(
        ids=test_ids,
        labels=test_labels,
        paths=[paths[i] for i in test_idx],
        shas=[shas[i] for i in test_idx],
        predicted=predicted,
    )
    # Exported from the CPU, in the default layout: the mobile runtimes expect
    # it, and the parity checks run there.
    model = trainer.model.to(CPU, memory_format=torch.contiguous_format)
    val_images = normalize(data.x_val)
    return _export_and_register(
        round_, model, config, classes, metrics, val_images, reporter, Outcome(scores, test_images), session=session
    )


@dataclass
class Scores:
    """The kept model's probabilities for every image of the snapshot."""

    image_ids: list[int]
    labels: list[str]
    probabilities: torch.Tensor


@dataclass
class TestImages:
    ids: list[int]
    labels: list[str]
    paths: list[Path]
    shas: list[str]
    # The new model's prediction for each of them.
    predicted: dict[int, str]


@dataclass
class Outcome:
    """What a round learnt besides the model: scores for the suspects list, and
    the test images the promotion gate compares it with production on."""

    scores: Scores
    test: TestImages


def predict_test_images(version: ModelVersion, test: TestImages) -> dict[int, str]:
    """`version`'s prediction for each test image whose label it knows."""
    known = [i for i, label in enumerate(test.labels) if label in version.classes]
    if not known:
        return {}
    payload = registry.load_checkpoint(version)
    model = build_model(version.architecture, len(version.classes))
    model.load_state_dict(payload["state_dict"])
    model = model.to(memory_format=MEMORY_FORMAT)
    x = load_images([test.paths[i] for i in known], version.image_size, [test.shas[i] for i in known])
    _, logits = evaluate(model, x, torch.zeros(len(known), dtype=torch.long))
    return {test.ids[i]: version.classes[p] for i, p in zip(known, logits.argmax(1).tolist(), strict=True)}


def _production_predictions(test: TestImages, reporter: "RoundReporter", *, session: Session) -> tuple:
    """(production version, its test predictions or None, why not) for the gate."""
    production = registry.production_version(session=session)
    session.rollback()
    if production is None:
        return None, None, None
    try:
        return production.version, predict_test_images(production, test), None
    except Exception as exc:  # a missing or unreadable checkpoint must not lose the new model
        log.exception("could not score production %s on the test images", production.version)
        reporter.note(f"production {production.version} could not be scored on the test images: {exc}")
        return production.version, None, f"production {production.version} could not be scored: {exc}"


@dataclass
class TrainState:
    """Where a round's training stands; saved in each epoch's checkpoint."""

    epoch: int = 0
    best_accuracy: float = -1.0
    best_epoch: int = 0
    best_state: dict | None = None


def _checkpoint_payload(config, classes, state: TrainState, model, optimizer, scheduler) -> dict:
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


def _resume(path: Path, model, optimizer, scheduler) -> TrainState:
    payload = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(payload["state_dict"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    random.setstate(payload["rng"]["python"])
    torch.set_rng_state(payload["rng"]["torch"])
    best_state = payload["best_state"]
    if best_state is None:
        best_state = {k: v.clone() for k, v in payload["state_dict"].items()}
    return TrainState(payload["epoch"], payload["best_accuracy"], payload["best_epoch"], best_state)


def _misclassified(logits: torch.Tensor, y: torch.Tensor, image_ids: list[int], classes: list[str]) -> list[dict]:
    probs = logits.softmax(1)
    out = []
    for i, (truth, pred) in enumerate(zip(y.tolist(), probs.argmax(1).tolist(), strict=True)):
        if truth != pred:
            out.append(
                {
                    "image_id": image_ids[i],
                    "true": classes[truth],
                    "predicted": classes[pred],
                    "confidence": round(float(probs[i, pred]), 4),
                }
            )
    return out


def _export_and_register(
    round_: TrainingRound,
    model: nn.Module,
    config: TrainingConfig,
    classes: list[str],
    metrics: dict,
    val_images: torch.Tensor,
    reporter: RoundReporter,
    outcome: Outcome,
    *,
    session: Session,
) -> ModelVersion:
    settings = get_settings()
    version = registry.next_version(classes, session=session)
    session.rollback()  # release the read transaction while exporting
    reporter.note(f"exporting model {version}")
    artifacts = export_model(model, version, val_images, on_step=reporter.phase)
    ckpt = registry.checkpoint_path(version)
    _save_checkpoint(ckpt, {"config": config.to_dict(), "classes": classes, "state_dict": model.state_dict()})
    files = [settings.data_dir / a["path"] for a in artifacts] + [ckpt]
    duration = (utcnow() - as_utc(round_.started_at)).total_seconds() if round_.started_at else 0.0
    metrics = {
        **metrics,
        "model_size_mb": round(artifacts[0]["size_bytes"] / 1e6, 3),
        "training_duration_seconds": round(duration, 1),
    }
    reporter.phase("scoring")
    reporter.note("scoring production on the test images for the promotion gate")
    production = _production_predictions(outcome.test, reporter, session=session)
    reporter.phase("registering")
    try:
        reporter.check_cancel()
        crash_point("before_commit")
        for _ in range(5):
            try:
                mv = _commit_version(
                    round_, version, config, classes, metrics, artifacts, ckpt, outcome, production, session=session
                )
                break
            except IntegrityError:
                # Another job took this version number between our export and commit.
                session.rollback()
                new_version = registry.next_version(classes, session=session)
                files, artifacts, ckpt = _rename_version(files, artifacts, ckpt, version, new_version)
                version = new_version
        else:
            raise RuntimeError("could not allocate a unique version number")
    except BaseException:
        remove_files(files)
        raise
    shutil.rmtree(round_dir(round_), ignore_errors=True)
    return mv


def _commit_version(
    round_, version, config, classes, metrics, artifacts, ckpt, outcome: Outcome, production: tuple, *, session: Session
) -> ModelVersion:
    """The version row, its gate decision, the suspect scores and the round's
    completion, in one transaction."""
    settings = get_settings()
    major, minor, patch = registry.parse_version(version)
    current = registry.production_version(session=session)
    decision = _gate_decision(outcome.test, production, current, session=session)
    mv = ModelVersion(
        version=version,
        major=major,
        minor=minor,
        patch=patch,
        round_id=round_.id,
        classes=classes,
        architecture=config.architecture,
        image_size=config.image_size,
        checkpoint_path=ckpt.relative_to(settings.data_dir).as_posix(),
        metrics=metrics,
        artifacts=artifacts,
        gate=decision,
    )
    session.add(mv)
    session.flush()
    gate.record_predictions(mv, outcome.test.predicted, session=session)
    scores = outcome.scores
    n_suspects = suspects.record_scores(
        version, scores.image_ids, scores.labels, scores.probabilities, classes, session=session
    )
    promote = should_promote(settings.auto_promote, current is not None, decision)
    if promote:
        registry.promote(version, session=session, actor=SYSTEM_ACTOR, action="auto")
    round_.status = RoundStatus.completed
    round_.phases = _enter_phase(round_.phases, None)
    round_.model_version_id = mv.id
    round_.progress = 1.0
    round_.finished_at = utcnow()
    outcome_text = "in production" if promote else "a candidate: " + "; ".join(decision["reasons"])
    round_.history = [
        *round_.history,
        _line(f"{n_suspects} suspected mislabels among {len(scores.image_ids)} images"),
        _line(f"completed: model {version} ({outcome_text})"),
    ]
    session.add(round_)
    session.commit()
    return mv


def should_promote(mode: str, in_production: bool, decision: dict) -> bool:
    """Whether a new version goes to production by itself (AUTO_PROMOTE): the
    first one only when clearly better than chance (core/gate.py)."""
    if mode == "always":
        return True
    if not in_production:
        return mode in ("first", "gate") and decision["passed"]
    return mode == "gate" and decision["passed"]


def _gate_decision(test: TestImages, production: tuple, current: ModelVersion | None, *, session: Session) -> dict:
    """`production` as scored before the commit; `current`: production now."""
    predicted_version, predictions, failure = production
    rules = gate.rules(session=session)
    if current is not None and current.version != predicted_version:
        reason = f"production changed to {current.version} while this version was made; compare them by hand"
        return {"passed": False, "production": current.version, "reasons": [reason], **rules}
    if failure:
        return {"passed": False, "production": predicted_version, "reasons": [failure], **rules}
    truth = dict(zip(test.ids, test.labels, strict=True))
    return gate.decide(test.predicted, predictions, truth, production_version=predicted_version, **rules)


def _rename_version(files, artifacts, ckpt, old: str, new: str):
    settings = get_settings()
    renamed_artifacts = []
    for record in artifacts:
        target = artifact_path(new, record["format"])
        (settings.data_dir / record["path"]).replace(target)
        renamed_artifacts.append({**record, "path": target.relative_to(settings.data_dir).as_posix()})
    new_ckpt = registry.checkpoint_path(new)
    ckpt.replace(new_ckpt)
    new_files = [settings.data_dir / a["path"] for a in renamed_artifacts] + [new_ckpt]
    return new_files, renamed_artifacts, new_ckpt


def delete_epoch_metrics_after(round_id: int, epoch: int, *, session: Session) -> None:
    session.exec(delete(EpochMetric).where(EpochMetric.round_id == round_id, EpochMetric.epoch > epoch))
