"""Real-looking pictures for measuring look-alikes and splits (not the demo drawings).

Four kinds, all made from what is on disk (no download):

- `digits`: scikit-learn's 1,797 handwritten digits (8 x 8, 16 grey levels),
  enlarged to 64 px: low detail, many pairs of different digits look alike.
- `glyphs`: letters rendered in every font installed (`fc-list`), at a few
  sizes, offsets and slants, 64 px.
- `documents`: crops of rendered text lines on paper with grain and a tint,
  as a scanner gives them, 96 px.
- `photos`: crops of the two photos scikit-learn ships (`load_sample_images`)
  at several scales, each shifted half a crop from its neighbours, 96 px;
  crops of plain sky are left out (nothing tells two of them apart, by eye
  or by any hash).

And the genuine copies a phone or a pipeline makes of one picture
(`plant_copy`): re-encoded, resized, brighter or darker, lightly cropped (1-3 % a side), or
stored rotated with an EXIF orientation tag.
"""

import io
import random
import subprocess
from collections.abc import Callable
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZabdefghmnqrt"
WORDS = [
    "invoice",
    "total",
    "amount",
    "due",
    "date",
    "account",
    "number",
    "payment",
    "received",
    "balance",
    "customer",
    "reference",
    "order",
    "quantity",
    "price",
    "tax",
    "delivery",
    "address",
    "signature",
    "page",
    "section",
    "report",
    "annual",
    "summary",
    "office",
]


# Grey-level spread below which a crop is plain sky.
PLAIN = 8.0


@cache
def font_files() -> list[str]:
    """Every scalable font file installed, sorted."""
    out = subprocess.run(["fc-list", "--format", "%{file}\n"], capture_output=True, text=True, check=False).stdout
    return sorted({line for line in out.splitlines() if line.endswith((".ttf", ".otf"))})


def digits(n: int | None = None) -> tuple[list[Image.Image], list[str]]:
    """scikit-learn's handwritten digits as 64-px greyscale pictures, and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    count = len(data.images) if n is None else n
    images = [
        Image.fromarray((255 - pixels * 16).clip(0, 255).astype(np.uint8)).resize((64, 64), Image.Resampling.BILINEAR)
        for pixels in data.images[:count]
    ]
    return images, [str(t) for t in data.target[:count]]


def glyphs(n: int = 1200, seed: int = 0) -> tuple[list[Image.Image], list[str]]:
    """Letters rendered in the installed fonts, 64 px, with their letters as labels.

    Each letter once per font: two renderings of one letter in one font a
    pixel apart would be the same picture, not a different one."""
    rng = random.Random(seed)
    fonts = font_files()
    pairs = [(letter, font) for font in fonts for letter in LETTERS]
    images, labels = [], []
    for letter, font_file in rng.sample(pairs, min(n, len(pairs))):
        font = ImageFont.truetype(font_file, rng.randint(34, 50))
        canvas = Image.new("L", (64, 64), 255)
        draw = ImageDraw.Draw(canvas)
        left, top, right, bottom = draw.textbbox((0, 0), letter, font=font)
        x = (64 - (right - left)) / 2 - left + rng.uniform(-6, 6)
        y = (64 - (bottom - top)) / 2 - top + rng.uniform(-6, 6)
        draw.text((x, y), letter, fill=rng.randint(0, 60), font=font)
        images.append(canvas.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BILINEAR, fillcolor=255))
        labels.append(letter)
    return images, labels


def documents(n: int = 1000, seed: int = 0) -> tuple[list[Image.Image], list[str]]:
    """Scanned-looking crops of text lines, 96 px; the label is the font's family file."""
    rng = random.Random(seed)
    fonts = font_files()[:10]
    images, labels = [], []
    for i in range(n):
        font_file = fonts[i % len(fonts)]
        font = ImageFont.truetype(font_file, rng.randint(11, 16))
        paper = rng.randint(215, 250)
        page = Image.new("L", (96, 96), paper)
        draw = ImageDraw.Draw(page)
        y = rng.randint(-6, 4)
        while y < 96:
            line = " ".join(rng.choice(WORDS) for _ in range(4))
            draw.text((rng.randint(-20, 6), y), line, fill=rng.randint(10, 70), font=font)
            y += rng.randint(14, 22)
        grain = np.random.default_rng(seed * 100_003 + i).normal(0, 6, (96, 96))
        scanned = Image.fromarray((np.asarray(page, dtype=np.float32) + grain).clip(0, 255).astype(np.uint8))
        images.append(scanned.filter(ImageFilter.GaussianBlur(0.5)).convert("RGB"))
        labels.append(font_file.rsplit("/", 1)[-1].split(".")[0])
    return images, labels


def photos(size: int = 96) -> tuple[list[Image.Image], list[str]]:
    """Crops of scikit-learn's two sample photos at three scales, neighbours half a crop apart."""
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    images, labels = [], []
    for name, pixels in zip(data.filenames, data.images, strict=True):
        photo = Image.fromarray(pixels)
        for crop in (64, 96, 144):
            step = crop // 2
            for top in range(0, photo.height - crop + 1, step):
                for left in range(0, photo.width - crop + 1, step):
                    box = (left, top, left + crop, top + crop)
                    picture = photo.crop(box).resize((size, size), Image.Resampling.LANCZOS)
                    if np.asarray(picture.convert("L"), dtype=np.float32).std() < PLAIN:
                        continue
                    images.append(picture)
                    labels.append(name.rsplit("/", 1)[-1].split(".")[0])
    return images, labels


KINDS: dict[str, Callable[[], tuple[list[Image.Image], list[str]]]] = {
    "digits": digits,
    "glyphs": glyphs,
    "documents": documents,
    "photos": photos,
}


def _encoded(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


COPIES = ("jpeg", "resize", "brighter", "darker", "crop", "exif")


def copy_bytes(image: Image.Image, kind: str, rng: random.Random) -> bytes:
    """A genuine copy of `image` as a file a phone or a pipeline would send."""
    rgb = image.convert("RGB")
    if kind == "jpeg":
        return _encoded(rgb, "JPEG", quality=rng.randint(35, 85))
    if kind == "resize":
        side = round(image.width * rng.choice([0.5, 0.75, 1.5, 2.0, 3.0]))
        return _encoded(rgb.resize((side, side), Image.Resampling.BICUBIC))
    if kind in ("brighter", "darker"):
        factor = 1 + rng.uniform(0.08, 0.15) * (1 if kind == "brighter" else -1)
        return _encoded(ImageEnhance.Brightness(rgb).enhance(factor))
    if kind == "crop":
        w, h = image.size
        cut = [round(rng.uniform(0.01, 0.03) * s) for s in (w, h, w, h)]
        return _encoded(rgb.crop((cut[0], cut[1], w - cut[2], h - cut[3])))
    if kind == "exif":
        # Stored turned, with the EXIF tag that turns it back (as phones save).
        orientation, turn = rng.choice(
            [(3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)]
        )
        exif = Image.Exif()
        exif[0x0112] = orientation
        return _encoded(rgb.transpose(turn), "JPEG", quality=92, exif=exif)
    raise ValueError(f"unknown copy kind {kind!r}; one of {', '.join(COPIES)}")


def png(image: Image.Image) -> bytes:
    """`image` as a PNG file."""
    return _encoded(image, "PNG")
