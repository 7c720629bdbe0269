"""The networks a round trains: torchvision architectures, their classifier
head, ImageNet weights (found on disk or downloaded once), the production
model to fine-tune, and `head` mode's frozen backbone.
"""

import hashlib
import http.client
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from sqlmodel import Session
from torch import nn

from core import registry
from core.config import get_settings
from core.ingest import file_sha256
from core.models import ModelVersion
from core.storage import commit_temp, temp_path_for
from core.training import recipe
from core.training.config import TrainingConfig
from core.training.progress import RoundReporter


def build_model(architecture: str, num_classes: int) -> nn.Module:
    """A torchvision model with a `num_classes` head, randomly initialised
    (with the training recipe's initial-weight changes)."""
    return recipe.init_model(torchvision.models.get_model(architecture, weights=None, num_classes=num_classes))


def head_name(model: nn.Module) -> str:
    """The classifier head's name in `model`: `fc` (ResNet), else the last
    layer of `classifier` (MobileNet, EfficientNet)."""
    return "fc" if hasattr(model, "fc") else f"classifier.{len(model.classifier) - 1}"


def head(model: nn.Module) -> nn.Linear:
    """`model`'s classifier head (the layer that names the classes)."""
    return model.get_submodule(head_name(model))


def set_head(model: nn.Module, module: nn.Module) -> None:
    """Put `module` in the place of `model`'s classifier head."""
    model.set_submodule(head_name(model), module)


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


def fetch_pretrained_weights(architecture: str, reporter: RoundReporter) -> Path | None:
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
    download: bool = True,
) -> nn.Module:
    """The production model to fine-tune, else ImageNet weights (downloaded
    once where allowed; with `download` False only a file already on disk),
    else random."""
    model = build_model(config.architecture, len(classes))
    if config.use_existing_model:
        notice = existing_model_notice(config, classes, session=session)
        production = registry.production_version(session=session)
        if not notice and production is not None:
            model.load_state_dict(registry.load_checkpoint(production)["state_dict"])
            reporter.note(f"fine-tuning production model {production.version}")
            return model
    weights_file = find_pretrained_weights(config.architecture) or (
        fetch_pretrained_weights(config.architecture, reporter) if download else None
    )
    if weights_file is None:
        return model
    load_keeping_head(model, torch.load(weights_file, map_location="cpu", weights_only=True))
    reporter.note(f"starting from ImageNet weights ({weights_file.name})")
    return model


def load_keeping_head(model: nn.Module, state: dict) -> None:
    """Load every weight of `state` but the classifier head, which stays as
    initialised (ImageNet's has 1000 outputs, another model's other classes)."""
    prefix = head_name(model)
    state = {k: v for k, v in state.items() if not k.startswith(prefix + ".")}
    state.update({f"{prefix}.{k}": v for k, v in head(model).state_dict().items()})
    model.load_state_dict(state)


def existing_model_notice(config: TrainingConfig, classes: list[str], *, session: Session) -> list[str]:
    """Why the production model cannot be fine-tuned for `config` and `classes`
    (a new model is trained from scratch), or nothing when it can."""
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
            load_keeping_head(model, torch.load(self.path, map_location="cpu", weights_only=True))
            return model
        state = registry.load_checkpoint(self.production)["state_dict"]
        if list(self.production.classes) == classes:
            model.load_state_dict(state)
        else:
            load_keeping_head(model, state)
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


def no_backbone_reason(config: TrainingConfig, *, session: Session) -> str:
    """Why `find_backbone` found none, and what to do about it."""
    production = registry.production_version(session=session)
    if production is None:
        other = "no model is in production yet"
    elif production.architecture != config.architecture:
        other = f"the production model {production.version} is a {production.architecture}"
    else:
        other = "using the existing model is turned off, so the production model may not be used"
    return (
        f"Training mode head trains only the classifier on top of a pretrained backbone, but there is none: "
        f"no ImageNet weights for {config.architecture} are on this machine (the weights folder or the torch hub "
        "cache; a full-mode round downloads them where WEIGHTS_DOWNLOAD allows) "
        f"and {other}. Train in training mode full first, or add the weights."
    )
