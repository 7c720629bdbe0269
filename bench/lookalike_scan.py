"""Time of the look-alike scan (every picture matched against the
representatives before it, core/duplicates.py `group`) at the product's scale.

    python -m bench.lookalike_scan [--images 10000]

The pictures: all the kinds of bench/datasets.py (digits, glyphs, photos,
and documents to make up the count), one in ten given a genuine copy. Printed:
the time to fingerprint them (hash and thumbnail, done once per image at
ingest) and the time of the scan, which is what `assign_splits` adds to an
import of that many images.
"""

import argparse
import io
import random
import time

from PIL import Image, ImageOps

from bench import datasets
from core import duplicates


def pictures(count: int, seed: int = 0) -> list[Image.Image]:
    images = datasets.digits()[0] + datasets.glyphs()[0] + datasets.photos()[0]
    originals = round(count / 1.1)
    images = (images + datasets.documents(max(0, originals - len(images)))[0])[:originals]
    rng = random.Random(seed)
    copies = [
        ImageOps.exif_transpose(Image.open(io.BytesIO(datasets.copy_bytes(images[i], kind, rng))))
        for i, kind in zip(rng.sample(range(len(images)), count - len(images)), datasets.COPIES * count, strict=False)
    ]
    everything = images + copies
    rng.shuffle(everything)
    return everything


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    args = parser.parse_args()
    everything = pictures(args.images)
    started = time.perf_counter()
    prints = [(duplicates.image_hash(im), duplicates.image_thumb(im)) for im in everything]
    fingerprinted = time.perf_counter() - started
    started = time.perf_counter()
    groups = duplicates.group(prints)
    scanned = time.perf_counter() - started
    clustered = sum(rep != i for i, rep in enumerate(groups))
    print(
        f"{len(everything)} images: fingerprints {fingerprinted:.1f} s, scan {scanned:.1f} s "
        f"({clustered} joined a cluster)"
    )


if __name__ == "__main__":
    main()
