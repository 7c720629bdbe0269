"""Whether training can start now, and with what: the dataset rules, the
image size "auto" picks, and the existing-model or backbone choice."""

import math
import statistics
from collections import Counter
from dataclasses import dataclass

from sqlmodel import Session, select

from core import registry
from core.config import get_settings
from core.models import Category, ImageStatus, ModelVersion, TrainingImage
from core.training.config import AUTO, AUTO_IMAGE_SIZE_RANGE, FEDERATED, TrainingConfig
from core.training.networks import existing_model_notice, find_backbone, no_backbone_reason


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
    """Every validated image with its category's name, oldest first."""
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
            problems.append(no_backbone_reason(config, session=session))
        else:
            notices.append(f"Head mode: {backbone.describe()} is frozen; only the classifier is trained.")
    elif config is not None and config.training_mode == FEDERATED:
        problem = federated_problem(sorted(per_category), registry.production_version(session=session))
        if problem:
            problems.append(problem)
    elif config is not None and config.use_existing_model:
        notices.extend(existing_model_notice(config, sorted(per_category), session=session))
    return Preflight(len(rows), per_category, problems, notices, image_size)


def federated_problem(classes: list[str], production: ModelVersion | None) -> str | None:
    """Why a federated round cannot start (it fine-tunes production's head on
    the phones, keeping production's network and categories), or None."""
    if production is None:
        return (
            "Training mode federated fine-tunes the production model's classifier on the phones, but no model "
            "is in production yet: train one in training mode full or head first, and promote it"
        )
    if list(production.classes) != classes:
        return (
            f"Training mode federated keeps the production model's categories, but production model "
            f"{production.version} knows {', '.join(production.classes)} and the dataset has {', '.join(classes)}: "
            "train in training mode full or head for a new class list"
        )
    return None


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
        f"Image size auto: {size} px, from the median short side ({median:g} px) of the {len(sizes)} validated "
        f"images, rounded to a multiple of 32 between {low} and {high}; give an image size to choose another."
    )
    return size, why
