"""Which images train, validate and test: decided once per image, kept for good.

Each image gets a `split_key`, a number in [0, 1) taken from the SHA-256 of
its content, the first time it is seen; a near-duplicate of an image that
already has a key takes that key instead (pictures with next to no detail,
whose hashes all look alike, keep their own: `duplicates.featureless`), so look-alikes always share a split
and no version is scored on a copy of a picture it trained on. Keys never
change afterwards, whatever is added or removed.

    key < TEST_SPLIT                 -> test (never trained on)
    otherwise, rescaled to [0, 1):
        rescaled < the job's val_split -> validation (picks the best epoch)
        else                           -> training

So the test set is the same for every job, and the validation set is the same
for every job with the same `val_split`.
"""

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from sqlmodel import Session, col, select

from core.config import get_settings
from core.duplicates import MAX_DISTANCE, as_array, dhash, distances, featureless
from core.models import TrainingImage

SPLITS = ("train", "val", "test")


def key_from_sha(sha256: str) -> float:
    """A uniform number in [0, 1) from a hex digest."""
    return int(sha256[:13], 16) / 16**13


def split_of(key: float, val_split: float, test_split: float | None = None) -> str:
    """`train`, `val` or `test` for an image's key."""
    test = get_settings().test_split if test_split is None else test_split
    if key < test:
        return "test"
    return "val" if (key - test) / (1.0 - test) < val_split else "train"


def file_dhash(path: Path) -> str | None:
    """The hash of a stored image file, or None when it cannot be read."""
    try:
        with Image.open(path) as im:
            return dhash(ImageOps.exif_transpose(im))
    except OSError:
        return None


def assign_splits(*, session: Session) -> int:
    """Give every image without a key one (and a hash, for images stored
    before hashes existed); returns how many were assigned. The caller commits."""
    todo = list(
        session.exec(select(TrainingImage).where(col(TrainingImage.split_key).is_(None)).order_by(TrainingImage.id))
    )
    if not todo:
        return 0
    for image in todo:
        if image.phash is None:
            image.phash = file_dhash(get_settings().data_dir / image.path)
    rows = [
        row
        for row in session.exec(
            select(TrainingImage.phash, TrainingImage.split_key).where(
                col(TrainingImage.split_key).is_not(None), col(TrainingImage.phash).is_not(None)
            )
        )
        if not featureless(row[0])
    ]
    # Hashes and keys of the images with a key so far; the new ones join as they get theirs.
    keys = [r[1] for r in rows] + [0.0] * len(todo)
    hashes = np.zeros(len(keys), dtype=np.uint64)
    hashes[: len(rows)] = as_array(r[0] for r in rows)
    known = len(rows)
    for image in todo:
        matchable = image.phash is not None and not featureless(image.phash)
        found = distances(image.phash, hashes[:known]) if matchable and known else np.empty(0)
        nearest = int(found.argmin()) if found.size else -1
        if nearest >= 0 and found[nearest] <= MAX_DISTANCE:
            image.split_key = keys[nearest]
        else:
            image.split_key = key_from_sha(image.sha256)
        session.add(image)
        if matchable:
            hashes[known], keys[known] = np.uint64(int(image.phash, 16)), image.split_key
            known += 1
    session.flush()
    return len(todo)


def stratified_split(labels: list[int], val_split: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices for training and validation, the same for the same inputs.

    Every class gets at least one validation and one training image. Used for
    rounds queued before split keys existed, and when the keys leave the
    validation set empty."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    train, val = [], []
    for label in sorted(by_class):
        members = by_class[label][:]
        rng.shuffle(members)
        n_val = min(max(1, round(len(members) * val_split)), len(members) - 1)
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    return sorted(train), sorted(val)


@dataclass
class RoundSplit:
    """Positions in a round's snapshot, and what had to give way."""

    train: list[int]
    val: list[int]
    test: list[int]
    notes: list[str]


def split_snapshot(
    keys: list[float | None], labels: list[int], classes: list[str], val_split: float, seed: int
) -> RoundSplit:
    """Train, validation and test positions of a snapshot's images, from their keys.

    A category left with no training image trains on its validation images
    (it could not be learnt otherwise); an empty validation set falls back to
    a stratified split of the non-test images. Both are noted."""
    if any(key is None for key in keys):
        train, val = stratified_split(labels, val_split, seed)
        return RoundSplit(train, val, [], ["this round predates fixed splits: no test set"])
    test_fraction = get_settings().test_split
    parts: dict[str, list[int]] = {name: [] for name in SPLITS}
    for i, key in enumerate(keys):
        parts[split_of(key, val_split, test_fraction)].append(i)
    notes = []
    trained = {labels[i] for i in parts["train"]}
    for label in sorted({labels[i] for i in parts["val"]} - trained):
        moved = [i for i in parts["val"] if labels[i] == label]
        parts["val"] = [i for i in parts["val"] if labels[i] != label]
        parts["train"] = sorted(parts["train"] + moved)
        notes.append(
            f"category '{classes[label]}' had no training image outside the validation set, "
            f"so its {len(moved)} validation image(s) train instead"
        )
    untrained = sorted(set(labels) - {labels[i] for i in parts["train"]})
    for label in untrained:
        notes.append(
            f"category '{classes[label]}' has only test images this round, so the model cannot learn it: add images"
        )
    if not parts["val"]:
        rest = sorted(parts["train"])
        train, val = stratified_split([labels[i] for i in rest], val_split, seed)
        parts["train"], parts["val"] = [rest[i] for i in train], [rest[i] for i in val]
        notes.append("no image fell in the validation set; validation images were drawn from the training images")
    return RoundSplit(parts["train"], parts["val"], parts["test"], notes)
