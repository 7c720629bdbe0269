"""Look-alikes: genuine copies of one picture, grouped around one representative.

The method, chosen by measurement (`python -m bench.lookalikes`, BENCHMARKS.md,
"Look-alikes"): a 256-bit perceptual hash (imagehash's `phash` at hash size
16: the low 16 x 16 frequencies of the picture's cosine transform, each bit
saying whether a coefficient is above their median), compared by Hamming
distance, with two rules on top.

- Why this hash: on four kinds of real-looking pictures (handwritten digits,
  letters in many fonts, scanned-document crops, photo crops) with planted
  copies (re-encoded, resized, brighter, darker, cropped 1-3 % a side,
  EXIF-rotated), 64-bit hashes could not keep copies in and different
  pictures out: at 95 % recall of copies the old 64-bit dHash had 38,382
  false pairs among 1,200 digits and 938 among 1,200 letters. Of dHash and
  pHash at 64 and 256 bits and plain correlation of 8- and 16-pixel
  thumbnails, the 256-bit pHash kept the fewest different pictures together
  on three of the four kinds (2 false pairs among the letters, none among
  documents and photos); no single threshold served the digits (8 x 8 scans,
  enlarged), whose different pictures are closer to each other than a
  cropped copy is to its original.
- No chaining: an image joins the cluster of its nearest *representative*
  (an earlier image that matched none), never of another member, so every
  member is within `MAX_DISTANCE` of the one representative and a chain
  A~B~C cannot pull in A and C.
- Relative distance: a match must also be much nearer than the other
  representatives around it (at most `RATIO` times the median distance to
  its `NEIGHBOURS` next-nearest representatives). Where pictures are all
  alike (digits, glyphs) being within `MAX_DISTANCE` is not enough evidence;
  a copy stands out from its surroundings, a different digit does not.
  It raised pair precision on the digits from 13 % to 93 % and on the
  letters from 59 % to 94 %, at a cost in the digits' recall (84 % to 57 %)
  and 3-4 points on documents and photos (BENCHMARKS.md, section 7).

Production-model embeddings were not used: a fresh install has none, they
change with every version (and so would the clusters and splits), and
clusters must be stable because splits follow them.

A picture with next to no detail (a flat colour) has a hash with almost no
bit set: all such pictures hash alike whatever their colour, so they never
match (`featureless`).
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image
from sqlmodel import Session, col, func, select

from core.models import Category, ImageStatus, TrainingImage

HASH_SIZE = 16
WORDS = HASH_SIZE * HASH_SIZE // 64
# 95-98 % of the planted copies of glyphs, documents and photos were within
# 54 of 256 bits; different pictures of those kinds rarely were.
MAX_DISTANCE = 54
# Measured from 0.4 to 0.6 (BENCHMARKS.md, section 7): lower loses copies of
# documents and photos, higher lets different letters and digits match.
RATIO = 0.45
NEIGHBOURS = 10
# A hash with at most this many bits set, or unset, comes from a picture with
# next to no detail: such pictures all hash alike.
FEATURELESS_BITS = 16


def image_hash(image: Image.Image) -> str:
    """The 256-bit perceptual hash of `image` (already EXIF-transposed), as 64 hex digits."""
    return str(imagehash.phash(image.convert("L"), hash_size=HASH_SIZE))


def featureless(phash: str) -> bool:
    """Whether `phash` says too little about the picture to match it with others."""
    bits = int(phash, 16).bit_count()
    return bits <= FEATURELESS_BITS or bits >= HASH_SIZE * HASH_SIZE - FEATURELESS_BITS


def as_array(hashes: Iterable[str]) -> np.ndarray:
    """Hex hashes as an (n, 4) array of uint64 words."""
    rows = [[int(h[i : i + 16], 16) for i in range(0, 16 * WORDS, 16)] for h in hashes]
    return np.array(rows, dtype=np.uint64).reshape(-1, WORDS)


def distances(target: str, hashes: np.ndarray) -> np.ndarray:
    """Hamming distances between one hash and an (n, 4) array of hashes."""
    return np.bitwise_count(np.bitwise_xor(hashes, as_array([target]))).sum(axis=1)


def best_match(found: np.ndarray) -> int | None:
    """Which of the representatives at distances `found` a picture is a copy of, or None.

    The nearest, when it is within `MAX_DISTANCE` and at most `RATIO` times
    the median distance to the `NEIGHBOURS` next-nearest representatives."""
    if not found.size:
        return None
    order = np.argsort(found, kind="stable")[: NEIGHBOURS + 1]
    nearest = found[order[0]]
    if nearest > MAX_DISTANCE:
        return None
    if len(order) > NEIGHBOURS // 2 and nearest > RATIO * float(np.median(found[order[1:]])):
        return None
    return int(order[0])


@dataclass
class Representatives:
    """Representatives' ids and hashes, growing as new representatives are found."""

    ids: list[int]
    hashes: np.ndarray

    @classmethod
    def load(cls, *, session: Session) -> "Representatives":
        rows = [
            row
            for row in session.exec(
                select(TrainingImage.id, TrainingImage.phash)
                .where(TrainingImage.representative_id == TrainingImage.id, col(TrainingImage.phash).is_not(None))
                .order_by(TrainingImage.id)
            )
            if not featureless(row[1])
        ]
        return cls([r[0] for r in rows], as_array(r[1] for r in rows))

    def match(self, phash: str | None) -> int | None:
        """The id of the representative `phash` is a copy of, or None."""
        if phash is None or featureless(phash) or not self.ids:
            return None
        found = best_match(distances(phash, self.hashes))
        return None if found is None else self.ids[found]

    def add(self, image_id: int, phash: str | None) -> None:
        if phash is not None and not featureless(phash):
            self.ids.append(image_id)
            self.hashes = np.concatenate([self.hashes, as_array([phash])])


def group(hashes: Sequence[str | None]) -> list[int]:
    """For each hash in order, the position of its representative (itself
    when it matches no earlier representative): the rule applied on ingest,
    for a list of pictures at once (the benchmark, the migration)."""
    reps = Representatives([], np.zeros((0, WORDS), dtype=np.uint64))
    out = []
    for i, phash in enumerate(hashes):
        found = reps.match(phash)
        out.append(i if found is None else found)
        if found is None:
            reps.add(i, phash)
    return out


def labelled_images(ids: Sequence[int], *, session: Session) -> list[tuple[TrainingImage, str]]:
    """The images with these ids and their category names, in the order of `ids` (missing ones left out)."""
    rows = session.exec(
        select(TrainingImage, Category.name)
        .join(Category, Category.id == TrainingImage.category_id)
        .where(col(TrainingImage.id).in_(list(ids)))
    ).all()
    found = {image.id: (image, name) for image, name in rows}
    return [found[i] for i in ids if i in found]


def look_alikes(image: TrainingImage, *, session: Session) -> list[tuple[TrainingImage, str, int]]:
    """The other images of `image`'s cluster with their category and their
    distance in bits from `image`, nearest first (rejected ones included)."""
    if image.representative_id is None or image.phash is None:
        return []
    ids = session.exec(
        select(TrainingImage.id).where(
            TrainingImage.representative_id == image.representative_id, TrainingImage.id != image.id
        )
    ).all()
    found = labelled_images(list(ids), session=session)
    scored = [(img, name, int(distances(image.phash, as_array([img.phash]))[0])) for img, name in found if img.phash]
    return sorted(scored, key=lambda row: (row[2], row[0].id))


def near_duplicates(image: TrainingImage, *, session: Session) -> list[TrainingImage]:
    """Other images that look like `image`, nearest first (rejected ones included)."""
    return [img for img, _, _ in look_alikes(image, session=session)]


def look_alike_counts(images: Sequence[TrainingImage], *, session: Session) -> dict[int, int]:
    """How many other images share each image's cluster (rejected ones
    included), in one query: cheap enough for every page of the review grid."""
    reps = {image.representative_id for image in images if image.representative_id is not None}
    sizes = dict(
        session.exec(
            select(TrainingImage.representative_id, func.count(TrainingImage.id))
            .where(col(TrainingImage.representative_id).in_(list(reps)))
            .group_by(TrainingImage.representative_id)
        ).all()
    )
    return {image.id: sizes.get(image.representative_id, 1) - 1 for image in images}


def _clustered(exclude_rejected: bool):
    """The images that belong to a look-alike group (and are not rejected)."""
    condition = col(TrainingImage.representative_id).is_not(None)
    return condition & (TrainingImage.status != ImageStatus.rejected) if exclude_rejected else condition


def _groups_query(exclude_rejected: bool):
    size = func.count(TrainingImage.id)
    return (
        select(TrainingImage.representative_id)
        .where(_clustered(exclude_rejected))
        .group_by(TrainingImage.representative_id)
        .having(size > 1)
        .order_by(size.desc(), func.min(TrainingImage.id))
    )


def clusters(
    *, session: Session, exclude_rejected: bool = True, offset: int = 0, limit: int | None = None
) -> list[list[int]]:
    """Groups of two or more look-alikes (a representative and the images
    that matched it), largest first; each group's ids in ascending order.
    `offset` and `limit` pick one page of groups, counted in SQL."""
    representatives = list(session.exec(_groups_query(exclude_rejected).offset(offset).limit(limit)))
    groups: dict[int, list[int]] = {r: [] for r in representatives}
    members = select(TrainingImage.id, TrainingImage.representative_id).where(
        _clustered(exclude_rejected), col(TrainingImage.representative_id).in_(representatives)
    )
    for image_id, representative in session.exec(members.order_by(TrainingImage.id)):
        groups[representative].append(image_id)
    return list(groups.values())


def count_clusters(*, session: Session, exclude_rejected: bool = True) -> int:
    """How many groups `clusters` gives without a limit."""
    return session.exec(
        select(func.count()).select_from(_groups_query(exclude_rejected).order_by(None).subquery())
    ).one()
