"""Reading image files: upright (EXIF orientation applied), as stored or in RGB.

The lowest image module: ingest, the splits' look-alike hashes, datasets and
thumbnails all open pictures through it, and it imports nothing of `core`.
"""

from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps


def load_upright(source: Path | BinaryIO) -> Image.Image:
    """Open an image (a file, or a stream of its bytes) upright, in its own mode."""
    with Image.open(source) as im:
        return ImageOps.exif_transpose(im)


def load_rgb(source: Path | BinaryIO) -> Image.Image:
    """Open an image (a file, or a stream of its bytes) upright in RGB."""
    return load_upright(source).convert("RGB")
