"""A procedurally drawn demo dataset, so a newcomer can try the whole loop.

Five categories of shapes. Each picture varies the shape's colour (within a
hue band per category), size, position and rotation, the background (gradient
and tint) and adds noise and distractor dots, so a model has to learn shape and
colour, not memorise pixels.
"""

import colorsys
import io
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from sqlmodel import Session

from core.ingest import IngestReport, NewFile, ingest_files
from core.models import ImageSource, ImageStatus

# category -> (hue centre in 0..1, drawing function name)
DEMO_CATEGORIES = {
    "circle": 0.0,
    "square": 0.33,
    "triangle": 0.6,
    "star": 0.15,
    "cross": 0.8,
}


def _colour(rng: random.Random, hue: float) -> tuple[int, int, int]:
    h = (hue + rng.uniform(-0.05, 0.05)) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(0.6, 1.0), rng.uniform(0.65, 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _polygon(cx: float, cy: float, radius: float, points: list[tuple[float, float]], angle: float):
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in points]


def _star_points(n: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    pts = []
    for i in range(2 * n):
        r = 1.0 if i % 2 == 0 else inner
        a = math.pi * i / n - math.pi / 2
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


_SHAPES = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(0.0, -1.0), (0.87, 0.5), (-0.87, 0.5)],
    "star": _star_points(),
    "cross": [
        (-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3),
        (0.3, 1), (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3),
    ],
}  # fmt: skip


def draw_demo_image(category: str, rng: random.Random, size: int = 96) -> Image.Image:
    """One picture of `category`, drawn with the randomness of `rng`."""
    hue = DEMO_CATEGORIES[category]
    top = [rng.randint(0, 90) for _ in range(3)]
    bottom = [min(255, c + rng.randint(20, 110)) for c in top]
    if rng.random() < 0.5:
        top, bottom = bottom, top
    bg = Image.new("RGB", (size, size))
    px = bg.load()
    for y in range(size):
        t = y / max(1, size - 1)
        row = tuple(int(a + (b - a) * t) for a, b in zip(top, bottom, strict=True))
        for x in range(size):
            px[x, y] = row
    draw = ImageDraw.Draw(bg)
    for _ in range(rng.randint(0, 6)):
        x, y, r = (
            rng.uniform(0, size),
            rng.uniform(0, size),
            rng.uniform(1, size * 0.04),
        )
        grey = rng.randint(60, 200)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(grey, grey, grey))
    radius = size * rng.uniform(0.22, 0.36)
    cx = rng.uniform(radius, size - radius)
    cy = rng.uniform(radius, size - radius)
    colour = _colour(rng, hue)
    if category == "circle":
        sx = radius * rng.uniform(0.85, 1.0)
        draw.ellipse([cx - sx, cy - radius, cx + sx, cy + radius], fill=colour)
    else:
        draw.polygon(
            _polygon(cx, cy, radius, _SHAPES[category], rng.uniform(-0.4, 0.4)),
            fill=colour,
        )
    if rng.random() < 0.3:
        bg = bg.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    # Grey sensor noise like Image.effect_noise, but drawn from `rng` (PIL's
    # comes from C's rand(), which no Python seed reaches): the same seed
    # gives the same pictures.
    sigma = rng.uniform(5, 25)
    grain = np.random.default_rng(rng.getrandbits(64)).normal(128.0, sigma, (size, size))
    noise = Image.fromarray(grain.clip(0, 255).astype(np.uint8)).convert("RGB")
    return Image.blend(bg, noise, 0.12)


def generate_demo_folder(folder: Path, *, per_category: int = 60, size: int = 96, seed: int = 0) -> Path:
    """Write the demo dataset as `folder/<category>/<n>.png` (ImageFolder layout)."""
    rng = random.Random(seed)
    for category in DEMO_CATEGORIES:
        (folder / category).mkdir(parents=True, exist_ok=True)
        for i in range(per_category):
            draw_demo_image(category, rng, size).save(folder / category / f"{category}_{i:03d}.png")
    return folder


def load_demo_dataset(
    *,
    session: Session,
    per_category: int = 60,
    size: int = 96,
    seed: int = 0,
    status: ImageStatus = ImageStatus.validated,
    uploaded_by: str | None = "demo",
) -> IngestReport:
    """Draw the demo pictures and ingest them (validated by default)."""
    rng = random.Random(seed)
    files = (
        NewFile(_png(draw_demo_image(category, rng, size)), f"{category}_{i:03d}.png", category)
        for category in DEMO_CATEGORIES
        for i in range(per_category)
    )
    return ingest_files(files, session=session, status=status, source=ImageSource.import_, uploaded_by=uploaded_by)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
