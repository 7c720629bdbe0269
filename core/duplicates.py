"""Look-alikes: genuine copies of one picture, grouped around one representative.

The method, chosen by measurement (`python -m bench.lookalikes`, BENCHMARKS.md,
"Look-alikes"): two independent checks, a cheap one that finds candidates and
an exact one that confirms them.

1. Candidates: a 256-bit perceptual hash (imagehash's `phash` at hash size
   16: the low 16 x 16 frequencies of the picture's cosine transform, each
   bit saying whether a coefficient is above their median), compared by
   Hamming distance. The `CANDIDATES` nearest representatives within
   `MAX_DISTANCE` bits are candidates. The threshold is loose on purpose
   (all planted copies of glyphs, documents and photos were within 64
   bits, and 98 % of those of digits): on its own it cannot tell copies
   from different low-detail pictures (within 54 bits the digits had 2,428
   false pairs), so it only decides which pairs are worth the second
   check, which keeps the scan cheap.
2. Confirmation: the pictures themselves, as 64 x 64 grey thumbnails
   (`image_thumb`, stored in `LookAlikeThumb`), compared by normalised
   correlation at 16 x 16 after aligning them (`similarity`): one thumbnail
   is cropped by up to `MAX_CROP` of each side (in `CROP_STEP` steps, the
   other way round too) and the best correlation counts. Correlation does
   not change with brightness or contrast, the alignment absorbs a light
   crop, and 16 x 16 averages away re-encoding noise and resampling. A
   match needs at least `MIN_SIMILARITY`: planted copies scored 0.991 -
   1.0 (most above 0.998; the lowest are brightened digits, whose white
   clips), different pictures rarely above 0.99 (a handful of handwritten
   digits that differ by a few grey levels, letters in two metric-
   compatible fonts).

Why not one measure: a cropped copy of a digit is farther in pHash bits
from its original than many different digits are from each other, and
plain correlation without alignment loses cropped copies of text (0.79).
Alone, the hash at 54 bits with a relative rule reached 57 % recall on the
digits and 93 % pair precision on digits and letters (BENCHMARKS.md,
section 7); the two checks together find 97-100 % of the copies with
99.4-100 % pair precision on every kind but the letters (98.4 %: two fonts
of one design draw some letters alike, up to a scale the alignment absorbs).

- No chaining: an image joins the cluster of its best-confirmed
  *representative* (an earlier image that matched none), never of another
  member, so every member is a close copy of the one representative and a
  chain A~B~C cannot pull in A and C.

Production-model embeddings were not used: a fresh install has none, they
change with every version (and so would the clusters and splits), and
clusters must be stable because splits follow them.

A picture with next to no detail (a flat colour) has a hash with almost no
bit set: all such pictures hash alike whatever their colour, so they never
match (`featureless`).
"""

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache
from itertools import islice
from pathlib import Path

import faiss
import imagehash
import numpy as np
from PIL import Image
from sqlmodel import Session, col, func, select
from threadpoolctl import threadpool_limits

from core.config import get_settings
from core.images import load_upright
from core.models import Category, ImageStatus, LookAlikeThumb, TrainingImage

HASH_SIZE = 16
WORDS = HASH_SIZE * HASH_SIZE // 64
CODE_BYTES = HASH_SIZE * HASH_SIZE // 8
# All planted copies of glyphs, documents and photos, and 98 % of those of
# digits, were within 64 of 256 bits (BENCHMARKS.md, section 7).
MAX_DISTANCE = 64
# Confirming the 10 nearest found 1-2 % more copies of digits than the 3
# nearest, for three times the work (BENCHMARKS.md, section 7).
CANDIDATES = 3
# Stored thumbnail side, and the side the thumbnails are compared at.
THUMB = 64
COMPARE = 16
# Crops tried when aligning two thumbnails, as a share of a side.
MAX_CROP = 0.04
CROP_STEP = 0.01
# Measured from 0.985 to 0.994 (BENCHMARKS.md, section 7): lower lets
# near-identical different digits match, higher loses cropped copies of text.
MIN_SIMILARITY = 0.993
# One thread for faiss's searches: beside an import's checking processes on
# two cores, its second OpenMP thread mostly waited (0.58 ms a search of
# 200,000 hashes in an import against 0.51 ms with one thread alone).
faiss.omp_set_num_threads(1)
# The most the fine pass of `similarity` may add to the coarse pass's best
# correlation for it to be tried: measured at most 0.032 (scanned text, whose
# crops matter most), 0.010 on photos and drawings, 0.008 on letters and
# 0.002 on digits, over 8,000 candidate pairs of five kinds (BENCHMARKS.md,
# section 9c); three times the largest.
FINE_GAIN = 0.1
# Representatives' thumbnails kept in memory during an import (4 KB each),
# counted at each batch (`Representatives.prefetch`).
KEPT_THUMBS = 50_000
# A hash with at most this many bits set, or unset, comes from a picture with
# next to no detail: such pictures all hash alike.
FEATURELESS_BITS = 16


def image_hash(image: Image.Image) -> str:
    """The 256-bit perceptual hash of `image` (already EXIF-transposed), as 64
    hex digits: imagehash's text, written by numpy (imagehash's own `str`
    joins the bits one by one, a third of the hash's time)."""
    bits = imagehash.phash(image.convert("L"), hash_size=HASH_SIZE).hash
    return np.packbits(bits.ravel()).tobytes().hex()


def image_thumb(image: Image.Image) -> bytes:
    """`image` (already EXIF-transposed) as a `THUMB` x `THUMB` grey thumbnail, row by row.

    Lanczos-filtered: a box filter aliases fine detail such as text, and a
    cropped copy's thumbnail then no longer lines up with its original's."""
    return image.convert("L").resize((THUMB, THUMB), Image.Resampling.LANCZOS).tobytes()


def fingerprint(image: Image.Image) -> tuple[str, bytes]:
    """`image_hash` and `image_thumb` of `image` (already EXIF-transposed)
    with one resize: pHash's first step is the very picture the thumbnail
    is (grey, `THUMB` x `THUMB`, Lanczos), and resizing it to its own size
    is a copy, so its hash is the same. A phone's photo is resized once,
    not twice."""
    thumb = image_thumb(image)
    return image_hash(Image.frombytes("L", (THUMB, THUMB), thumb)), thumb


def file_fingerprint(path: Path) -> tuple[str | None, bytes | None]:
    """The hash and thumbnail of a stored image file, or (None, None) when it cannot be read."""
    try:
        upright = load_upright(path)
    except OSError:
        return None, None
    return fingerprint(upright)


def stored_thumbs(ids: Sequence[int], *, session: Session) -> dict[int, bytes | None]:
    """The thumbnails of these images (None: unreadable). Images stored
    before thumbnails existed get theirs from their files now, kept for next
    time; the caller commits."""
    found: dict[int, bytes | None] = dict(saved_thumbs(ids, session=session))
    missing = [i for i in ids if i not in found]
    for start in range(0, len(missing), 500):  # under any database's limit on bound parameters
        chunk = missing[start : start + 500]
        rows = session.exec(select(TrainingImage.id, TrainingImage.path).where(col(TrainingImage.id).in_(chunk))).all()
        for image_id, path in rows:
            found[image_id] = file_fingerprint(get_settings().data_dir / path)[1]
            if found[image_id] is not None:
                session.add(LookAlikeThumb(image_id=image_id, pixels=found[image_id]))
    return found


def saved_thumbs(ids: Sequence[int], *, session: Session) -> dict[int, bytes]:
    """The thumbnails saved for these images; images without one are left out."""
    found: dict[int, bytes] = {}
    for start in range(0, len(ids), 500):  # under any database's limit on bound parameters
        chunk = list(ids[start : start + 500])
        query = select(LookAlikeThumb.image_id, LookAlikeThumb.pixels).where(col(LookAlikeThumb.image_id).in_(chunk))
        found |= dict(session.exec(query).all())
    return found


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


def _area_matrix(start: float, stop: float) -> np.ndarray:
    """The (COMPARE, THUMB) matrix that averages the pixels from `start` to
    `stop` (fractions of a pixel counted) into `COMPARE` cells."""
    edges = start + (stop - start) * np.arange(COMPARE + 1) / COMPARE
    left = np.arange(THUMB)[None, :]
    overlap = np.clip(np.minimum(edges[1:, None], left + 1) - np.maximum(edges[:-1, None], left), 0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def _normalised(x: np.ndarray) -> np.ndarray:
    """`x` flattened, centred and of unit length."""
    x = x.ravel() - x.mean()
    return x / max(float(np.linalg.norm(x)), 1e-9)


@cache
def _crop_matrices(crops: tuple[tuple[float, float], ...]) -> np.ndarray:
    """The area matrices of these crops of one side (start, end as shares of it), stacked: (k * COMPARE, THUMB)."""
    return np.concatenate([_area_matrix(start * THUMB, THUMB - end * THUMB) for start, end in crops])


@cache
def _crop_parts(
    crops: tuple[tuple[float, float], ...],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For `_best_crop`: the crops' stacked area matrices, their transpose,
    each crop's column sums (k, THUMB) and the (k * COMPARE, k) matrix that
    adds up each crop's `COMPARE` rows."""
    stacked = _crop_matrices(crops)
    k = len(crops)
    sums = stacked.reshape(k, COMPARE, THUMB).sum(axis=1)
    parts = stacked, stacked.T, sums, np.kron(np.eye(k), np.ones((COMPARE, 1)))
    return tuple(np.ascontiguousarray(part, dtype=np.float32) for part in parts)


def _best_crop(
    big: np.ndarray, target: np.ndarray, rows: tuple[tuple[float, float], ...], cols: tuple[tuple[float, float], ...]
) -> tuple[float, tuple[float, float], tuple[float, float]]:
    """The highest correlation of `big` cropped by any of `rows` x `cols` with
    the (normalised) `target`, and the crops that gave it."""
    k, m = len(rows), len(cols)
    row_matrices, _, row_sums, row_groups = _crop_parts(rows)
    _, col_matrices_t, col_sums, col_groups = _crop_parts(cols)
    # Every crop of rows (i) and of columns (j) at once: cell (i * COMPARE + s, j * COMPARE + t).
    cropped = row_matrices @ big @ col_matrices_t
    # Per crop (i, j), the sums over its cells (s, t), as products with the
    # 0/1 grouping matrices: several times faster than numpy's reductions here.
    per_crop = lambda cells: row_groups.T @ cells @ col_groups  # noqa: E731
    # The target is centred, so its product with a crop is the crop's centred product.
    tiled = (cropped.reshape(k, COMPARE, m, COMPARE) * target.reshape(1, COMPARE, 1, COMPARE)).reshape(cropped.shape)
    products = per_crop(tiled)
    sums = row_sums @ big @ col_sums.T
    spread = np.sqrt(np.maximum(per_crop(cropped * cropped) - sums**2 / COMPARE**2, 1e-18))
    scores = products / spread
    i, j = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return float(scores[i, j]), rows[i], cols[j]


@cache
def _around(crop: tuple[float, float]) -> tuple[tuple[float, float], ...]:
    """The crops one `CROP_STEP` or less from `crop` at each end, within [0, MAX_CROP]."""
    ends = [[round(c + d, 4) for d in (-CROP_STEP, 0.0, CROP_STEP) if 0 <= round(c + d, 4) <= MAX_CROP] for c in crop]
    return tuple((start, end) for start in ends[0] for end in ends[1])


# The first, coarse pass: no crop, half the most, the most, at each end.
COARSE = tuple((start, end) for start in (0.0, MAX_CROP / 2, MAX_CROP) for end in (0.0, MAX_CROP / 2, MAX_CROP))


def similarity(a: bytes, b: bytes) -> float:
    """How alike two thumbnails (`image_thumb`) are: the highest correlation
    of one, cropped by up to `MAX_CROP` a side, with the other, at `COMPARE`
    x `COMPARE` (1.0: the same picture up to brightness and contrast).

    Hand-written (scikit-image is not a dependency): a correlation over a
    grid of crops is a few small matrix products in numpy. The crops are
    searched coarse to fine (none, half of `MAX_CROP` or all of it at each
    end, then one `CROP_STEP` around the best), and not at all when the
    uncropped thumbnails already match (most copies).

    The fine pass is left out where the coarse one ended more than
    `FINE_GAIN` below `MIN_SIMILARITY`: it cannot reach the bar from there,
    so no decision changes (only the score of a pair that fails anyway),
    and an import's most common pair, two different pictures, costs half."""
    return _similarity(a, b, FINE_GAIN)


def _similarity(a: bytes, b: bytes, fine_gain: float) -> float:
    (big_a, small_a), (big_b, small_b) = _picture(a), _picture(b)
    best = float(small_a @ small_b)  # uncropped: the same both ways
    for big, target in ((big_a, small_b), (big_b, small_a)):
        if best >= MIN_SIMILARITY:
            return best
        coarse, rows, cols = _best_crop(big, target, COARSE, COARSE)
        best = max(best, coarse)
        if coarse >= MIN_SIMILARITY - fine_gain:
            best = max(best, _best_crop(big, target, _around(rows), _around(cols))[0])
    return best


@lru_cache(maxsize=4096)
def _picture(thumb: bytes) -> tuple[np.ndarray, np.ndarray]:
    """A thumbnail as numbers less their mean, and at `COMPARE` x `COMPARE`
    normalised (`_normalised`), in float32; kept for the next pair it is in
    (an import compares a representative with many pictures).

    Correlations ignore a picture's mean, and without it float32 keeps the
    crops' variances exact enough: scores within 5e-7 of float64's, no
    decision changed, over 8,000 candidate pairs of five kinds (BENCHMARKS.md,
    section 9), in two thirds of the time."""
    whole = _crop_parts(((0.0, 0.0),))[0]
    big = np.frombuffer(thumb, dtype=np.uint8).reshape(THUMB, THUMB).astype(np.float32)
    big -= big.mean()
    return big, _normalised(whole @ big @ whole.T)


def codes(hashes: Iterable[str]) -> np.ndarray:
    """Hex hashes as an (n, 32) array of bytes: faiss's binary codes."""
    return np.frombuffer(b"".join(bytes.fromhex(h) for h in hashes), dtype=np.uint8).reshape(-1, CODE_BYTES)


NO_CODES = np.zeros((0, CODE_BYTES), np.uint8)


def _index(rows: np.ndarray = NO_CODES) -> faiss.IndexBinaryFlat:
    """An exact binary index of these codes (none: an empty one)."""
    index = faiss.IndexBinaryFlat(HASH_SIZE * HASH_SIZE)
    if len(rows):
        index.add(rows)
    return index


@dataclass
class _Loaded:
    """The representatives of one database as last read by this process
    (`Representatives.load`): all those up to `last_id`, featureless ones
    counted in `rows` but not kept."""

    rows: int
    last_id: int
    last_hash: str
    ids: list[int]
    codes: np.ndarray


_loaded: dict[str, _Loaded] = {}
_loaded_lock = threading.Lock()


@dataclass
class Representatives:
    """Representatives' ids and hashes (in a faiss index, the same order),
    growing as new representatives are found; their thumbnails are fetched
    (`thumbs_of`) only when a candidate needs confirming, and kept.

    The nearest hashes are found by faiss's exhaustive binary index (the
    exact Hamming distances, as numpy gave them, with SIMD popcounts): 0.5 ms
    for a picture against 200,000 representatives, where numpy took 9 ms
    and an import of 200,000 pictures spent most of its time there.

    An import's checking processes can take the search and the scoring
    against the representatives there were when it started off its hands
    (`share`, `candidates`): `match` is then given their nearest and scores,
    and itself searches and scores only those found since."""

    ids: list[int]
    index: faiss.IndexBinaryFlat
    thumbs_of: Callable[[list[int]], dict[int, bytes | None]]
    thumbs: dict[int, bytes | None] = field(default_factory=dict)
    # Set by `prefetch`: the nearest representatives of the batch's hashes
    # among the first `_since`, and those added since, in their own index.
    _nearest: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    _since: int = 0
    _recent: faiss.IndexBinaryFlat = field(default_factory=_index)
    # Set by `share`: the first `_shared` are searched elsewhere, and those
    # after them are also in `_local`; whether the batch `prefetch` searched
    # was searched so.
    _shared: int = 0
    _local: faiss.IndexBinaryFlat | None = None
    _batch_shared: bool = False

    @classmethod
    def empty(cls, thumbs_of: Callable[[list[int]], dict[int, bytes | None]]) -> "Representatives":
        return cls([], _index(), thumbs_of)

    @classmethod
    def of(
        cls, shared: tuple[list[int], np.ndarray], thumbs_of: Callable[[list[int]], dict[int, bytes | None]]
    ) -> "Representatives":
        """The representatives `share` gave (ids, codes), for a checking process."""
        ids, rows = shared
        return cls(list(ids), _index(rows), thumbs_of)

    @classmethod
    def load(cls, *, session: Session, thumbs_of: Callable[[list[int]], dict[int, bytes | None]]) -> "Representatives":
        """The database's representatives. Read once per process and database,
        then only those added since: an upload to 200,000 images would read
        and parse every hash again. What was read is checked first (how many
        representatives up to the newest one read, and its hash), so rows
        rolled back, re-keyed or another database at the same address make
        it read everything again."""
        url = session.get_bind().url.render_as_string(hide_password=False)
        reps = (TrainingImage.representative_id == TrainingImage.id) & col(TrainingImage.phash).is_not(None)
        with _loaded_lock:
            known = _loaded.get(url)
        if known is not None:
            rows, last = session.exec(
                select(func.count(TrainingImage.id), func.max(TrainingImage.id)).where(
                    reps, TrainingImage.id <= known.last_id
                )
            ).one()
            last_hash = session.exec(select(TrainingImage.phash).where(TrainingImage.id == known.last_id)).first()
            if (rows, last or -1, last_hash or "") != (known.rows, known.last_id, known.last_hash):
                known = None
        since = -1 if known is None else known.last_id
        new = session.exec(
            select(TrainingImage.id, TrainingImage.phash)
            .where(reps, TrainingImage.id > since)
            .order_by(TrainingImage.id)
        ).all()
        if known is None or new:
            kept = [row for row in new if not featureless(row[1])]
            known = _Loaded(
                rows=(0 if known is None else known.rows) + len(new),
                last_id=new[-1][0] if new else since,
                last_hash=new[-1][1] if new else "",
                ids=([] if known is None else known.ids) + [row[0] for row in kept],
                codes=np.concatenate([NO_CODES if known is None else known.codes, codes(r[1] for r in kept)]),
            )
            with _loaded_lock:
                _loaded[url] = known
        return cls(list(known.ids), _index(known.codes), thumbs_of)

    def share(self) -> tuple[list[int], np.ndarray]:
        """The representatives as they are now (ids, codes), for checking
        processes to search and score pictures against (`of`, `candidates`);
        `match` then searches itself only those added after."""
        self._shared, self._local = len(self.ids), _index()
        rows = faiss.vector_to_array(self.index.xb).reshape(-1, CODE_BYTES)
        return list(self.ids), rows

    def prefetch(self, hashes: Sequence[str | None], shared: bool = False) -> None:
        """Look up at once the nearest representatives (as they are now) of
        these pictures, about to be matched one after another, and fetch
        their thumbnails in one query: `match` then only searches the
        representatives added since. At 200,000 representatives one search
        for a batch costs half of one search per picture. `shared`: the
        pictures come with their `candidates` among the shared ones, and
        only those after them are searched."""
        if len(self.thumbs) > KEPT_THUMBS:  # the oldest half goes (fetched again when needed)
            for image_id in list(islice(self.thumbs, len(self.thumbs) // 2)):
                del self.thumbs[image_id]
        hashes = sorted({h for h in hashes if h is not None and not featureless(h)})
        self._since, self._recent, self._nearest = len(self.ids), _index(), {}
        self._batch_shared = shared
        index, offset = self._searched(shared)
        if not hashes or not index.ntotal:
            return
        found, nearest = index.search(codes(hashes), CANDIDATES)
        for phash, row_found, row_nearest in zip(hashes, found, nearest, strict=True):
            self._nearest[phash] = [
                (int(d), offset + int(i)) for d, i in zip(row_found, row_nearest, strict=True) if i >= 0
            ]
        wanted = {self.ids[i] for pairs in self._nearest.values() for d, i in pairs if d <= MAX_DISTANCE}
        missing = sorted(wanted - self.thumbs.keys())
        if missing:
            self.thumbs |= self.thumbs_of(missing)

    def _searched(self, shared: bool) -> tuple[faiss.IndexBinaryFlat, int]:
        """The index this process searches (and the position of its first
        representative): all, or those after the shared ones."""
        if not shared:
            return self.index, 0
        if self._local is None:
            raise ValueError("share() first: no representatives were shared")
        return self._local, self._shared

    def _near(self, phash: str, given: Sequence[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
        """(distance, position) of the `CANDIDATES` nearest representatives
        within `MAX_DISTANCE` bits (the nearer first, then the older);
        `given`: those found among the shared ones, by a checking process."""
        pairs = self._nearest.get(phash) if self._batch_shared == (given is not None) else None
        if pairs is None:  # not prefetched: search them all
            index, offset = self._searched(given is not None)
            found, nearest = index.search(codes([phash]), CANDIDATES)
            pairs = [(int(d), offset + int(i)) for d, i in zip(found[0], nearest[0], strict=True) if i >= 0]
        elif self._recent.ntotal:
            found, nearest = self._recent.search(codes([phash]), CANDIDATES)
            pairs = pairs + [
                (int(d), self._since + int(i)) for d, i in zip(found[0], nearest[0], strict=True) if i >= 0
            ]
        return [(d, i) for d, i in sorted([*pairs, *(given or ())])[:CANDIDATES] if d <= MAX_DISTANCE]

    def candidates(self, pictures: Sequence[tuple[str | None, bytes | None]]) -> list[tuple[tuple, ...]]:
        """For each picture's (hash, thumbnail), its nearest representatives
        as (distance, position, similarity or None where this process has no
        thumbnail for it): what a checking process gives `match`."""
        self.prefetch([phash for phash, _ in pictures])
        out = []
        for phash, thumb in pictures:
            if phash is None or thumb is None or featureless(phash) or not self.ids:
                out.append(())
                continue
            near = self._near(phash)
            scores = self._scores(thumb, [i for _, i in near], {})
            out.append(tuple((d, i, scores.get(i)) for d, i in near))
        return out

    def match(
        self, phash: str | None, thumb: bytes | None, given: Sequence[tuple[int, int, float | None]] | None = None
    ) -> int | None:
        """The id of the representative the picture with `phash` and `thumb`
        is a copy of, or None. `given`: its `candidates` among the shared
        representatives (a score of None is made here)."""
        if phash is None or thumb is None or featureless(phash) or not self.ids:
            return None
        near = [i for _, i in self._near(phash, None if given is None else [(d, i) for d, i, _ in given])]
        scores = self._scores(thumb, near, {i: score for _, i, score in given or () if score is not None})
        best = max(((scores[i], -i) for i in near if i in scores), default=None)
        return None if best is None or best[0] < MIN_SIMILARITY else self.ids[-best[1]]

    def _scores(self, thumb: bytes, near: list[int], known: dict[int, float]) -> dict[int, float]:
        """`similarity` of `thumb` to the representatives at the positions
        `near` that have a thumbnail (fetched when not kept yet), beside the
        scores `known` already."""
        missing = [self.ids[i] for i in near if i not in known and self.ids[i] not in self.thumbs]
        if missing:
            self.thumbs |= self.thumbs_of(missing)
        scores = dict(known)
        for i in near:
            if i not in scores and self.thumbs.get(self.ids[i]) is not None:
                scores[i] = similarity(thumb, self.thumbs[self.ids[i]])
        return scores

    def add(self, image_id: int, phash: str | None, thumb: bytes | None) -> None:
        if phash is not None and not featureless(phash):
            self.index.add(codes([phash]))
            if self._local is not None:
                self._local.add(codes([phash]))
            self.ids.append(image_id)
            self.thumbs[image_id] = thumb
            if self._nearest:  # searched by the pictures prefetched that come after it
                self._recent.add(codes([phash]))


def one_blas_thread() -> threadpool_limits:
    """A context in which numpy's matrix products use one thread: the
    look-alike check's are so small that more threads only wait on each
    other (6 ms a pair on one thread, 70 ms on two busy cores)."""
    return threadpool_limits(limits=1, user_api="blas")


def group(pictures: Sequence[tuple[str | None, bytes | None]]) -> list[int]:
    """For each picture's (hash, thumbnail) in order, the position of its
    representative (itself when it matches no earlier representative): the
    rule applied on ingest, for a list of pictures at once (the benchmark,
    the migration)."""
    reps = Representatives.empty(thumbs_of=dict.fromkeys)
    out = []
    with one_blas_thread():
        for i, (phash, thumb) in enumerate(pictures):
            found = reps.match(phash, thumb)
            out.append(i if found is None else found)
            if found is None:
                reps.add(i, phash, thumb)
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
