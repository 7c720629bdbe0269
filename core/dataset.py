"""Images to tensors: decoded, upright, RGB, resized to a square input."""

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from core.cache import TensorCache, get_cache, image_key
from core.images import load_rgb
from core.storage import temp_path_for

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_image(source: Path | BinaryIO, size: int) -> torch.Tensor:
    """One image (a file, or its bytes in a stream) as a uint8 tensor of shape (3, size, size)."""
    image = load_rgb(source).resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


# Images decoded per step of `load_images` and `write_image_file`: bounds
# what a first decode holds besides its output.
DECODE_CHUNK = 256


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
    for _ in _decoded_chunks(paths, size, shas, cache, remember=True, out=out):
        pass  # each chunk is decoded into its place in `out`
    return out


def write_image_file(
    path: Path, paths: Sequence[Path], size: int, shas: Sequence[str], cache: TensorCache | None = None
) -> "ImageFile":
    """The images (in this order) decoded into one file of uint8 rows (3, size,
    size), read back a batch at a time by the returned `ImageFile`: a round
    too large for memory trains from it. A complete file from an earlier
    attempt is used as it is.

    Pixels come from the cache's files or a fresh decode (then cached), never
    through the cache's memory, so what this process holds stays one chunk."""
    row = 3 * size * size
    if not (path.is_file() and path.stat().st_size == len(paths) * row):
        cache = cache or get_cache()
        buffer = torch.empty((min(DECODE_CHUNK, len(paths)), 3, size, size), dtype=torch.uint8)
        tmp = temp_path_for(path)
        try:
            with open(tmp, "wb") as fh:
                for _, chunk in _decoded_chunks(paths, size, shas, cache, remember=False, out=buffer):
                    fh.write(chunk.numpy().tobytes())
            os.replace(tmp, path)  # the rows are recomputable: no fsync
        finally:
            tmp.unlink(missing_ok=True)
    return ImageFile(path, size, 0, len(paths))


def _decoded_chunks(paths, size, shas, cache, *, remember: bool, out: torch.Tensor):
    """(start, pixels) of `paths` DECODE_CHUNK at a time, each filled into
    `out` (the whole output, or one chunk's buffer reused for every chunk)."""
    whole = len(out) == len(paths)
    # PIL releases the GIL while decoding and resizing, so threads use every core.
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        for start in range(0, len(paths), DECODE_CHUNK):
            stop = min(start + DECODE_CHUNK, len(paths))
            chunk = out[start:stop] if whole else out[: stop - start]
            todo = []
            for i in range(start, stop):
                key = image_key(shas[i], size) if cache is not None else None
                hit = cache.get(key, remember=remember) if key is not None else None
                if hit is None:
                    todo.append(i)
                else:
                    chunk[i - start] = hit
            for i, pixels in zip(todo, pool.map(lambda i: decode_image(paths[i], size), todo), strict=True):
                chunk[i - start] = pixels
                if cache is not None:
                    cache.put(image_key(shas[i], size), pixels, remember=remember)
            yield start, chunk


class ImageFile:
    """Rows `start:stop` of a file of decoded images (uint8, 3 x size x
    size each), indexed like the uint8 tensor `load_images` returns (an int
    list or tensor of indices, or a slice with step 1) and read from disk on
    each access: the process holds only the rows asked for. The operating
    system's page cache, not this process, keeps what fits in memory."""

    def __init__(self, path: Path, size: int, start: int, stop: int):
        self.path, self.size, self.start, self.stop = Path(path), size, start, stop
        self.row_bytes = 3 * size * size

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), 3, self.size, self.size)

    def split(self, lengths: list[int]) -> list["ImageFile"]:
        """Consecutive parts of these rows, `lengths` long (as `torch.Tensor.split` with a list)."""
        if sum(lengths) != len(self):
            raise ValueError(f"parts of {sum(lengths)} rows do not make up {len(self)}")
        ends = [self.start + sum(lengths[: k + 1]) for k in range(len(lengths))]
        return [ImageFile(self.path, self.size, a, b) for a, b in zip([self.start, *ends], ends, strict=False)]

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("an ImageFile reads slices with step 1 only")
            stop = max(start, stop)
            out = torch.empty((stop - start, 3, self.size, self.size), dtype=torch.uint8)
            self._read(out, [(0, start, stop - start)])
            return out
        wanted = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        if len(wanted) and (int(wanted.min()) < -len(self) or int(wanted.max()) >= len(self)):
            raise IndexError(f"index out of range for {len(self)} images")
        wanted = wanted % max(1, len(self))
        # Read in file order, runs of consecutive rows with one call each, then put back in the order asked.
        rows, order = torch.sort(wanted)
        breaks = [0, *(torch.nonzero(rows.diff() != 1).flatten() + 1).tolist(), len(rows)]
        spans = [(a, int(rows[a]), b - a) for a, b in pairwise(breaks) if b > a]
        in_file_order = torch.empty((len(rows), 3, self.size, self.size), dtype=torch.uint8)
        self._read(in_file_order, spans)
        out = torch.empty_like(in_file_order)
        out[order] = in_file_order
        return out

    def _read(self, out: torch.Tensor, spans: list[tuple[int, int, int]]) -> None:
        """Fill rows `at:at+n` of `out` from this view's rows `first:first+n`, for each (at, first, n)."""
        flat = out.numpy().reshape(len(out), -1)
        with open(self.path, "rb", buffering=0) as fh:
            for at, first, n in spans:
                view = memoryview(flat[at : at + n]).cast("B")
                got = os.preadv(fh.fileno(), [view], (self.start + first) * self.row_bytes)
                if got != n * self.row_bytes:
                    raise OSError(f"{self.path} is shorter than expected: read {got} of {n * self.row_bytes} bytes")


# What a round's images are held in: indexed the same way either way.
Images = torch.Tensor | ImageFile


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) to float, scaled and ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=batch.device).view(1, 3, 1, 1)
    return (batch.float().div_(255.0) - mean) / std
