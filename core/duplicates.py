"""Near-duplicate images, found with a 64-bit difference hash (dHash).

Why dHash and not backbone embeddings: it is computed on ingest in well under
a millisecond from the decoded picture, needs no model (a fresh install has no
pretrained backbone, and a randomly initialised one's embeddings say nothing),
and it is robust to what phones and pipelines do to the same picture: resizing,
re-compression, slight colour and brightness changes. It does not find the
same object photographed twice from another angle; that is a different
picture, and may rightly sit in another split.

The hash: the picture in grey, shrunk to 9 x 8 pixels (each the average of its area); each bit says whether
a pixel is brighter than its right-hand neighbour. Two pictures whose hashes
differ in at most `MAX_DISTANCE` of the 64 bits are near-duplicates.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from sqlmodel import Session, col, select

from core.models import Category, TrainingImage

# Measured on the demo's 96 px drawings (hard cases: small, flat areas): copies
# re-encoded as JPEG (quality 95, 70, 40), resized (64, 200 px) or 10% brighter
# or lower in contrast were at most 9 bits from the original, 90% at most 8;
# of 44,850 pairs of different drawings, 0.08% were within 8 bits.
MAX_DISTANCE = 8


# A hash with at most this many bits set, or unset, comes from a picture with
# next to no detail (a flat colour, a plain gradient): all such pictures hash
# alike whatever their colour, so they are not tied to each other's split.
FEATURELESS_BITS = 4


def featureless(phash: str) -> bool:
    """Whether `phash` says too little about the picture to match it with others."""
    bits = int(phash, 16).bit_count()
    return bits <= FEATURELESS_BITS or bits >= 64 - FEATURELESS_BITS


def dhash(image: Image.Image) -> str:
    """The 64-bit difference hash of `image`, as 16 hex digits."""
    small = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return f"{value:016x}"


def distances(target: str, hashes: np.ndarray) -> np.ndarray:
    """Hamming distances between one hash and an array of uint64 hashes."""
    return np.bitwise_count(np.bitwise_xor(hashes, np.uint64(int(target, 16))))


def as_array(hashes: Iterable[str]) -> np.ndarray:
    return np.array([int(h, 16) for h in hashes], dtype=np.uint64)


@dataclass
class HashIndex:
    """Image ids and their hashes, searchable by Hamming distance."""

    ids: list[int]
    hashes: np.ndarray

    @classmethod
    def load(cls, *, session: Session, exclude_rejected: bool = False) -> "HashIndex":
        query = select(TrainingImage.id, TrainingImage.phash).where(col(TrainingImage.phash).is_not(None))
        if exclude_rejected:
            query = query.where(TrainingImage.status != "rejected")
        rows = session.exec(query.order_by(TrainingImage.id)).all()
        return cls([r[0] for r in rows], as_array(r[1] for r in rows))

    def near(self, phash: str, max_distance: int = MAX_DISTANCE) -> list[tuple[int, int]]:
        """(image id, distance) of every indexed image within `max_distance`, nearest first."""
        if not self.ids:
            return []
        found = distances(phash, self.hashes)
        hits = np.nonzero(found <= max_distance)[0]
        return sorted(((self.ids[i], int(found[i])) for i in hits), key=lambda pair: (pair[1], pair[0]))


def labelled_images(ids: Sequence[int], *, session: Session) -> list[tuple[TrainingImage, str]]:
    """The images with these ids and their category names, in the order of `ids` (missing ones left out)."""
    rows = session.exec(
        select(TrainingImage, Category.name)
        .join(Category, Category.id == TrainingImage.category_id)
        .where(col(TrainingImage.id).in_(list(ids)))
    ).all()
    found = {image.id: (image, name) for image, name in rows}
    return [found[i] for i in ids if i in found]


def look_alikes(
    image: TrainingImage, *, session: Session, max_distance: int = MAX_DISTANCE
) -> list[tuple[TrainingImage, str, int]]:
    """Other images that look like `image`, with their category and distance
    in bits, nearest first (rejected ones included)."""
    if image.phash is None:
        return []
    pairs = [(i, d) for i, d in HashIndex.load(session=session).near(image.phash, max_distance) if i != image.id]
    found = {img.id: (img, name) for img, name in labelled_images([i for i, _ in pairs], session=session)}
    return [(*found[i], d) for i, d in pairs if i in found]


def near_duplicates(image: TrainingImage, *, session: Session, max_distance: int = MAX_DISTANCE) -> list[TrainingImage]:
    """Other images that look like `image`, nearest first (rejected ones included)."""
    return [img for img, _, _ in look_alikes(image, session=session, max_distance=max_distance)]


def look_alike_counts(
    images: Sequence[TrainingImage], *, session: Session, max_distance: int = MAX_DISTANCE
) -> dict[int, int]:
    """How many other images look like each of `images` (rejected ones
    included), from one load of the hash index: cheap enough for every page
    of the review grid."""
    hashed = [image for image in images if image.phash is not None]
    index = HashIndex.load(session=session)
    if not hashed or not index.ids:
        return {image.id: 0 for image in images}
    near = np.bitwise_count(np.bitwise_xor(index.hashes[None, :], as_array(i.phash for i in hashed)[:, None]))
    within = (near <= max_distance).sum(axis=1)
    indexed = set(index.ids)
    counts = {image.id: int(n) - (image.id in indexed) for image, n in zip(hashed, within, strict=True)}
    return {image.id: counts.get(image.id, 0) for image in images}


def clusters(*, session: Session, max_distance: int = MAX_DISTANCE, exclude_rejected: bool = True) -> list[list[int]]:
    """Groups of two or more near-duplicate images (connected through pairs
    within `max_distance`), largest first; each group's ids in ascending order."""
    index = HashIndex.load(session=session, exclude_rejected=exclude_rejected)
    parent = list(range(len(index.ids)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(index.ids)):
        near = np.nonzero(np.bitwise_count(np.bitwise_xor(index.hashes[i + 1 :], index.hashes[i])) <= max_distance)[0]
        for j in near:
            a, b = root(i), root(i + 1 + int(j))
            if a != b:
                parent[b] = a
    groups: dict[int, list[int]] = {}
    for i, image_id in enumerate(index.ids):
        groups.setdefault(root(i), []).append(image_id)
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))
