"""Images to tensors: decoded, upright, RGB, resized to a square input."""

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from core.cache import TensorCache, get_cache, image_key
from core.images import load_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_image(source: Path | BinaryIO, size: int) -> torch.Tensor:
    """One image (a file, or its bytes in a stream) as a uint8 tensor of shape (3, size, size)."""
    image = load_rgb(source).resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_images(
    paths: Sequence[Path],
    size: int,
    shas: Sequence[str] | None = None,
    cache: TensorCache | None = None,
) -> torch.Tensor:
    """Stack images into a uint8 tensor (N, 3, size, size).

    Given the images' SHA-256s, each is decoded at most once per size: later
    calls (epochs, jobs) read the decoded pixels from the cache."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    if shas is not None:
        cache = cache or get_cache()
    todo = []
    for i in range(len(paths)):
        hit = cache.get(image_key(shas[i], size)) if cache is not None else None
        if hit is None:
            todo.append(i)
        else:
            out[i] = hit
    # PIL releases the GIL while decoding and resizing, so threads use every core.
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        for i, pixels in zip(todo, pool.map(lambda i: decode_image(paths[i], size), todo), strict=True):
            out[i] = pixels
            if cache is not None:
                cache.put(image_key(shas[i], size), pixels)
    return out


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) to float, scaled and ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=batch.device).view(1, 3, 1, 1)
    return (batch.float().div_(255.0) - mean) / std
