"""Tensors computed from images (decoded pixels, backbone features), kept so
that no epoch and no later job computes them again.

Entries are keyed by what they depend on (the image's SHA-256 and the input
size; for features also the backbone and its weights), so a changed setting
is a different key and never a stale hit. Two levels: an in-memory LRU bounded
by bytes (`CACHE_MAX_BYTES`), shared by every job of a worker process, and one
`.npy` file per entry under `DATA_DIR/cache/`, written atomically, which
serves datasets that do not fit in memory and later processes.
"""

import hashlib
import io
import threading
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from core.config import get_settings
from core.storage import write_atomic


class TensorCache:
    """A bytes-bounded LRU of tensors in memory, backed by one file per entry."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def path(self, key: str) -> Path:
        # Keys hold arbitrary text (architecture names, sizes); the file name
        # is its hash, fanned out so no folder grows too large.
        name = hashlib.sha256(key.encode()).hexdigest()
        return self.folder / name[:2] / f"{name}.npy"

    def get(self, key: str, remember: bool = True) -> torch.Tensor | None:
        """The tensor stored under `key`, from memory or else from disk (then
        kept in memory unless `remember` is false)."""
        with self._lock:
            tensor = self._entries.get(key)
            if tensor is not None:
                self._entries.move_to_end(key)
                return tensor
        path = self.path(key)
        try:
            tensor = torch.from_numpy(np.load(path, allow_pickle=False))
        except FileNotFoundError:
            return None
        except (ValueError, OSError, EOFError):
            path.unlink(missing_ok=True)  # damaged (a power cut): recomputed and written again
            return None
        if remember:
            self._remember(key, tensor)
        return tensor

    def put(self, key: str, tensor: torch.Tensor, remember: bool = True) -> None:
        """Store `tensor` (kept as given, callers must not modify it later; on
        disk only unless `remember`)."""
        tensor = tensor.detach().contiguous()
        path = self.path(key)
        if not path.exists():
            buffer = io.BytesIO()
            np.save(buffer, tensor.numpy(), allow_pickle=False)
            write_atomic(path, buffer.getvalue(), durable=False)
        if remember:
            self._remember(key, tensor)

    def _remember(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if size > self.max_bytes:
            return  # served from disk only
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()
            self._entries[key] = tensor
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.numel() * evicted.element_size()

    @property
    def memory_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)


@lru_cache
def _cache(folder: Path, max_bytes: int) -> TensorCache:
    return TensorCache(folder, max_bytes)


def get_cache() -> TensorCache:
    """The process-wide cache for the current settings (one per DATA_DIR)."""
    settings = get_settings()
    return _cache(settings.cache_dir, settings.cache_max_bytes)


def image_key(sha256: str, size: int) -> str:
    """Decoded pixels of one image at one input size."""
    return f"image/{sha256}/{size}"


def feature_key(sha256: str, size: int, backbone: str, flipped: bool = False) -> str:
    """Pooled backbone features of one image; `backbone` names the
    architecture and the identity of its weights."""
    return f"features/{backbone}/{sha256}/{size}/{'flip' if flipped else 'plain'}"
