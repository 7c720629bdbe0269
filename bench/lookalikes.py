"""Look-alikes and splits on real-looking pictures with planted copies.

    python -m bench.lookalikes [--copies 0.1] [--kinds digits,glyphs,documents,photos]

For each kind of picture (bench/datasets.py): a fresh DATA_DIR, the pictures
imported as validated images of their categories, a genuine copy planted for
a share of them (re-encoded, resized, brighter, darker, cropped, EXIF-rotated,
in turn), all through the product's own ingest and `assign_splits`. Printed
per kind: look-alike recall on the planted copies (a copy in its original's
cluster), pair precision (of all pairs of images sharing a cluster, the share
that are a picture and its copy), the largest false cluster (most different
pictures in one cluster, as a share of the dataset), and the test and
validation shares (test: of all images, against TEST_SPLIT; validation: of
the images that are not test images, against val_split 0.2, as
`core.splits.split_of` reads it).
"""

import argparse
import random
import time

from sqlmodel import select

from bench import datasets
from bench.common import fresh_data_dir

VAL_SPLIT = 0.2


def measure(kind: str, copies: float, seed: int = 0) -> dict:
    fresh_data_dir(f"lookalikes-{kind}")
    from core.config import get_settings
    from core.db import session_scope
    from core.ingest import NewFile, ingest_files
    from core.models import ImageStatus, TrainingImage
    from core.splits import split_of

    images, labels = datasets.KINDS[kind]()
    rng = random.Random(seed)
    planted = sorted(rng.sample(range(len(images)), round(copies * len(images))))
    files = [(datasets.png(image), label, i) for i, (image, label) in enumerate(zip(images, labels, strict=True))]
    files += [
        (datasets.copy_bytes(images[i], datasets.COPIES[n % len(datasets.COPIES)], rng), labels[i], i)
        for n, i in enumerate(planted)
    ]
    rng.shuffle(files)  # copies arrive before or after their original, as they would
    stored_at = []

    def stored_then_marked():
        # ingest_files assigns the splits once its files run out: the mark splits the two timings.
        yield from (NewFile(data, f"{n}.png", label) for n, (data, label, _) in enumerate(files))
        stored_at.append(time.perf_counter())

    started = time.perf_counter()
    with session_scope() as session:
        report = ingest_files(stored_then_marked(), session=session, status=ImageStatus.validated)
        ingested = stored_at[0] - started
        assigned = time.perf_counter() - stored_at[0]
        source = {r.image_id: original for r, (_, _, original) in zip(report.results, files, strict=True)}
        rows = session.exec(select(TrainingImage.id, TrainingImage.representative_id, TrainingImage.split_key)).all()
    clusters: dict[int, list[int]] = {}
    for image_id, representative, _ in rows:
        clusters.setdefault(representative, []).append(source[image_id])
    cluster_of = {source[image_id]: [] for image_id, _, _ in rows}
    for image_id, representative, _ in rows:
        cluster_of[source[image_id]].append(representative)
    found = sum(len(set(cluster_of[i])) == 1 for i in planted)
    pairs = true_pairs = 0
    largest_false = 0
    for members in clusters.values():
        pairs += len(members) * (len(members) - 1) // 2
        counts: dict[int, int] = {}
        for original in members:
            counts[original] = counts.get(original, 0) + 1
        true_pairs += sum(c * (c - 1) // 2 for c in counts.values())
        if len(counts) > 1:
            largest_false = max(largest_false, len(counts))
    test = get_settings().test_split
    splits = [split_of(key, VAL_SPLIT, test) for _, _, key in rows]
    return {
        "kind": kind,
        "images": len(rows),
        "copies": len(planted),
        "recall": found / len(planted) if planted else None,
        "pair_precision": true_pairs / pairs if pairs else 1.0,
        "false_pairs": pairs - true_pairs,
        "largest_false_cluster": largest_false,
        "largest_false_share": largest_false / len(images),
        "test_share": splits.count("test") / len(splits),
        "val_share": splits.count("val") / max(1, len(splits) - splits.count("test")),
        "ingest_s": ingested,
        "assign_s": assigned,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=float, default=0.1, help="share of pictures given a planted copy")
    parser.add_argument("--kinds", default=",".join(datasets.KINDS), help="comma-separated kinds")
    args = parser.parse_args()
    print(
        f"{'kind':<10} {'images':>6} {'copies':>6} {'recall':>7} {'pair prec':>9} {'false pairs':>11} "
        f"{'largest false':>13} {'test':>6} {'val':>6} {'ingest s':>8} {'assign s':>8}"
    )
    for kind in args.kinds.split(","):
        r = measure(kind, args.copies)
        largest = f"{r['largest_false_cluster']} ({r['largest_false_share']:.1%})"
        print(
            f"{r['kind']:<10} {r['images']:>6} {r['copies']:>6} {r['recall']:>7.1%} {r['pair_precision']:>9.1%} "
            f"{r['false_pairs']:>11} {largest:>13} {r['test_share']:>6.1%} {r['val_share']:>6.1%} "
            f"{r['ingest_s']:>8.1f} {r['assign_s']:>8.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
