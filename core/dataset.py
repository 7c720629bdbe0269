"""Images to tensors: decoded, upright, RGB, resized to a square input."""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.ingest import load_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_image(path: Path, size: int) -> torch.Tensor:
    """One image as a uint8 tensor of shape (3, size, size)."""
    image = load_rgb(path).resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_images(paths: Sequence[Path], size: int) -> torch.Tensor:
    """Stack images into a uint8 tensor (N, 3, size, size)."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    for i, path in enumerate(paths):
        out[i] = decode_image(path, size)
    return out


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) to float, scaled and ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (batch.float().div_(255.0) - mean) / std
