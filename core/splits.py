"""Which images train, validate and test: decided once per image, kept for good.

Each image gets a `split_key` in [0, 1) the first time it is seen, and the
image whose look-alike it is (`representative_id`, core/duplicates.py). A
representative's key is the next number of its category's low-discrepancy
sequence (`sequence_key`: the golden-ratio sequence, started at a point of
its own per category), so every category's keys spread evenly over [0, 1)
and the test and validation shares stay close to the settings on any size
of dataset, which random keys from the SHA-256 do not (on 1,000 images they
miss a 2-point band one time in fifteen). A look-alike takes its
representative's key, so copies always share a split and no version is
scored on a copy of a picture it trained on.

    key < TEST_SPLIT                 -> test (never trained on)
    otherwise, rescaled to [0, 1):
        rescaled < the job's val_split -> validation (picks the best epoch)
        else                           -> training

So the test set is the same for every job, and the validation set is the same
for every job with the same `val_split`. Keys never change, with one
exception: a category with `MIN_FOR_TEST` or more validated images and no
test image (a curator relabelled or rejected them) gets test images from its
images that no version has trained on or validated with (`ensure_test_images`).
"""

import math
import random
from dataclasses import dataclass

from sqlalchemy import case
from sqlmodel import Session, col, func, select

from core.config import get_settings
from core.duplicates import Representatives, file_fingerprint, one_blas_thread, stored_thumbs
from core.models import ImageStatus, ModelVersion, TrainingImage, TrainingRound

SPLITS = ("train", "val", "test")
# The golden ratio's fractional part: n steps of it leave gaps of at most
# about 1.6 / n on the circle (the three-gap theorem), so 10 keys always put
# one below a test share of 0.15 or more.
GOLDEN = (math.sqrt(5) - 1) / 2
MIN_FOR_TEST = 10


def key_from_sha(sha256: str) -> float:
    """A uniform number in [0, 1) from a hex digest."""
    return int(sha256[:13], 16) / 16**13


def sequence_key(category_id: int, position: int) -> float:
    """The `position`-th key of a category's sequence."""
    start = key_from_sha(f"{category_id:064x}"[::-1])
    return (start + position * GOLDEN) % 1.0


def split_of(key: float, val_split: float, test_split: float | None = None) -> str:
    """`train`, `val` or `test` for an image's key."""
    test = get_settings().test_split if test_split is None else test_split
    if key < test:
        return "test"
    return "val" if (key - test) / (1.0 - test) < val_split else "train"


def assign_splits(*, session: Session) -> int:
    """Give every image without a key its representative and key (and a hash,
    for images stored before hashes existed), then `ensure_test_images`;
    returns how many were assigned. The caller commits."""
    todo = list(
        session.exec(select(TrainingImage).where(col(TrainingImage.split_key).is_(None)).order_by(TrainingImage.id))
    )
    if todo:
        _assign(todo, session=session)
    ensure_test_images(session=session)
    return len(todo)


def _assign(todo: list[TrainingImage], *, session: Session) -> None:
    for image in todo:
        if image.phash is None:
            image.phash = file_fingerprint(get_settings().data_dir / image.path)[0]
    thumbs = stored_thumbs([image.id for image in todo], session=session)
    placed = KeyAssigner(session=session).place(
        [(image.id, image.category_id, image.phash, thumbs.get(image.id)) for image in todo]
    )
    for image, (representative_id, key) in zip(todo, placed, strict=True):
        image.representative_id, image.split_key = representative_id, key
        session.add(image)
    session.flush()


class KeyAssigner:
    """Gives new images, in the order of their ids, their representative and
    key (see the module's docstring). One serves a whole import, batch after
    batch (`core.ingest.ingest_files`), so the representatives are loaded
    once and the matching of a batch overlaps the checking of the next."""

    def __init__(self, *, session: Session):
        self.session = session
        self.reps = Representatives.load(session=session, thumbs_of=lambda ids: stored_thumbs(ids, session=session))
        self.keys: dict[int, float] = {}  # representatives' keys, read as they are matched
        # How many representatives each category has: the next one's position in its sequence.
        self.used = dict(
            session.exec(
                select(TrainingImage.category_id, func.count(TrainingImage.id))
                .where(TrainingImage.representative_id == TrainingImage.id, col(TrainingImage.split_key).is_not(None))
                .group_by(TrainingImage.category_id)
            ).all()
        )

    def place(
        self, images: list[tuple[int, int, str | None, bytes | None]], candidates: list[tuple | None] | None = None
    ) -> list[tuple[int, float]]:
        """(representative id, key) for each (id, category id, hash,
        thumbnail); `candidates`, when every image has them, are their
        nearest shared representatives, scored (`Representatives.share`)."""
        out = []
        shared = candidates is not None and all(c is not None for c in candidates)
        given = candidates if shared else [None] * len(images)
        # No flush of the caller's changes before each read of a key or thumbnail.
        with one_blas_thread(), self.session.no_autoflush:
            self.reps.prefetch([phash for _, _, phash, _ in images], shared=shared)
            for (image_id, category_id, phash, thumb), scored in zip(images, given, strict=True):
                found = self.reps.match(phash, thumb, scored)
                if found is None:
                    position = self.used.get(category_id, 0)
                    self.used[category_id] = position + 1
                    found, key = image_id, sequence_key(category_id, position)
                    self.reps.add(image_id, phash, thumb)
                else:
                    key = self.keys.get(found)
                    if key is None:
                        key = self.session.exec(select(TrainingImage.split_key).where(TrainingImage.id == found)).one()
                self.keys[image_id] = key
                out.append((found, key))
        return out


def trained_image_ids(*, session: Session) -> set[int]:
    """Images some version trained on or validated with (not in its test set)."""
    test = get_settings().test_split
    snapshots = session.exec(
        select(TrainingRound.snapshot).join(ModelVersion, ModelVersion.round_id == TrainingRound.id)
    ).all()
    return {
        entry["id"]
        for snapshot in snapshots
        for entry in snapshot
        if entry.get("split_key") is None or entry["split_key"] >= test
    }


def ensure_test_images(*, session: Session) -> int:
    """Give each category with `MIN_FOR_TEST` or more validated images and no
    validated test image its share of test images, taken from clusters none
    of whose images any version has trained on; returns how many images moved.
    Their keys are scaled into the test range, keeping their order."""
    test = get_settings().test_split
    keyed = (TrainingImage.status == ImageStatus.validated) & col(TrainingImage.split_key).is_not(None)
    # Counted in SQL first: every ingest calls this, and loading every
    # validated image took seconds at 200,000 to find, mostly, nothing to do.
    counts = session.exec(
        select(
            TrainingImage.category_id,
            func.count(TrainingImage.id),
            func.sum(case((TrainingImage.split_key < test, 1), else_=0)),
        )
        .where(keyed)
        .group_by(TrainingImage.category_id)
    ).all()
    candidates = [category for category, n, tests in counts if n >= MIN_FOR_TEST and not tests]
    if not candidates or test <= 0:
        return 0
    validated = session.exec(select(TrainingImage).where(keyed, col(TrainingImage.category_id).in_(candidates))).all()
    by_category: dict[int, list[TrainingImage]] = {}
    for image in validated:
        by_category.setdefault(image.category_id, []).append(image)
    short = {
        c: imgs
        for c, imgs in by_category.items()
        if len(imgs) >= MIN_FOR_TEST and all(i.split_key >= test for i in imgs)
    }
    if not short or test <= 0:
        return 0
    trained = trained_image_ids(session=session)
    members: dict[int, list[TrainingImage]] = {}
    for image in session.exec(select(TrainingImage).where(col(TrainingImage.representative_id).is_not(None))):
        members.setdefault(image.representative_id, []).append(image)
    moved = 0
    for images in short.values():
        wanted = max(1, round(test * len(images)))
        free = sorted(
            {i.representative_id for i in images if not any(m.id in trained for m in members[i.representative_id])},
            key=lambda rep: members[rep][0].split_key,
        )
        for rep in free[:wanted]:
            for image in members[rep]:
                image.split_key = image.split_key * test
                session.add(image)
                moved += 1
    session.flush()
    return moved


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
