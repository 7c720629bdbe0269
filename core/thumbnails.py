"""Small previews of stored images, made once and kept on disk.

A thumbnail is keyed by the image's SHA-256 and the requested size, so it never
goes stale (the image bytes cannot change under the same hash) and pages never
resize the full image on a rerun.
"""

from pathlib import Path

from PIL import Image

from core.config import get_settings
from core.images import load_rgb
from core.models import TrainingImage
from core.storage import commit_temp, temp_path_for

DEFAULT_SIZE = 160


def thumbnail_path(sha256: str, size: int = DEFAULT_SIZE) -> Path:
    """Where the `size`-pixel thumbnail of the image with `sha256` is kept."""
    return get_settings().thumbnails_dir / sha256[:2] / f"{sha256}_{size}.jpg"


def thumbnail(image: TrainingImage, size: int = DEFAULT_SIZE) -> Path:
    """The thumbnail of `image` (longest side `size` px), made on first use."""
    path = thumbnail_path(image.sha256, size)
    if path.exists():
        return path
    preview = load_rgb(get_settings().data_dir / image.path)
    preview.thumbnail((size, size), Image.Resampling.LANCZOS)
    # Written under a temporary name: two sessions may make the same one at once.
    tmp = temp_path_for(path)
    try:
        preview.save(tmp, format="JPEG", quality=85)
        commit_temp(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
