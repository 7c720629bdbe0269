"""The decoded-image cache returns what a fresh decode would, per input size,
from memory or from its files on disk."""

import pytest
import torch
from sqlmodel import select

from core import dataset
from core.cache import TensorCache, get_cache, image_key
from core.dataset import decode_image, load_images
from core.ingest import image_path
from core.models import TrainingImage
from tests.factories import add_demo


@pytest.fixture
def stored(session):
    add_demo(session, per_category=2, size=40)
    images = session.exec(select(TrainingImage).order_by(TrainingImage.id)).all()
    return [image_path(i) for i in images], [i.sha256 for i in images]


def fresh(paths, size) -> torch.Tensor:
    return torch.stack([decode_image(p, size) for p in paths])


def no_decoding(monkeypatch):
    def refuse(path, size):
        raise AssertionError(f"decoded {path} at {size} px again")

    monkeypatch.setattr(dataset, "decode_image", refuse)


def test_cached_images_equal_a_fresh_decode_and_are_not_decoded_again(stored, monkeypatch):
    paths, shas = stored
    first = load_images(paths, 32, shas)
    assert torch.equal(first, fresh(paths, 32))
    no_decoding(monkeypatch)
    assert torch.equal(load_images(paths, 32, shas), first)


def test_another_input_size_is_another_entry(stored, monkeypatch):
    paths, shas = stored
    small = load_images(paths, 32, shas)
    large = load_images(paths, 48, shas)
    assert large.shape[-2:] == (48, 48)
    assert torch.equal(large, fresh(paths, 48))
    assert torch.equal(get_cache().get(image_key(shas[0], 32)), small[0])
    assert torch.equal(get_cache().get(image_key(shas[0], 48)), large[0])


def test_disk_fallback_serves_every_image_when_memory_holds_none(stored, monkeypatch, data_dir):
    paths, shas = stored
    monkeypatch.setenv("CACHE_MAX_BYTES", "0")
    from core.config import get_settings

    get_settings.cache_clear()
    expected = load_images(paths, 32, shas)
    assert len(get_cache()) == 0 and get_cache().memory_bytes == 0
    assert len(list((data_dir / "cache").rglob("*.npy"))) == len(paths)
    no_decoding(monkeypatch)
    # Another process (a new cache object) reads the same files.
    other = TensorCache(data_dir / "cache", max_bytes=0)
    assert torch.equal(load_images(paths, 32, shas, cache=other), expected)


def test_memory_keeps_the_most_recently_used_entries_within_its_byte_bound(tmp_path):
    one = torch.zeros(100, dtype=torch.uint8)
    cache = TensorCache(tmp_path, max_bytes=250)
    for key in "abc":
        cache.put(key, one + ord(key))
    assert len(cache) == 2 and cache.memory_bytes == 200
    cache.get("b")
    cache.put("d", one)
    assert list(cache._entries) == ["b", "d"]
    assert torch.equal(cache.get("a"), one + ord("a"))  # evicted from memory, read from disk


def test_a_damaged_cache_file_is_recomputed_not_used(stored, data_dir):
    paths, shas = stored
    expected = load_images(paths, 32, shas)
    cache = TensorCache(data_dir / "cache", max_bytes=0)
    cache.path(image_key(shas[0], 32)).write_bytes(b"not an array")
    assert cache.get(image_key(shas[0], 32)) is None
    assert torch.equal(load_images(paths, 32, shas, cache=cache), expected)
