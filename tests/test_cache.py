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


def test_a_round_streamed_from_its_image_file_reads_exactly_the_pixels_of_the_in_memory_path(stored, tmp_path):
    paths, shas = stored
    expected = load_images(paths, 32, shas)
    rows = dataset.write_image_file(tmp_path / "images.u8", paths, 32, shas)
    assert rows.shape == expected.shape
    assert torch.equal(rows[:], expected)
    # A shuffled batch with a repeat, a list, a negative index, and a part's own rows (a split's view).
    batch = torch.tensor([5, 0, 3, 3, 7, 1])
    assert torch.equal(rows[batch], expected[batch])
    assert torch.equal(rows[[2, -1]], expected[[2, -1]])
    _, part, _ = rows.split([3, 4, len(rows) - 7])
    assert len(part) == 4 and torch.equal(part[1:3], expected[4:6]) and torch.equal(part[[3, 0]], expected[[6, 3]])
    with pytest.raises(IndexError):
        part[[4]]


def test_a_streamed_round_decodes_into_its_file_without_filling_the_memory_cache(stored, tmp_path, monkeypatch):
    paths, shas = stored
    rows = dataset.write_image_file(tmp_path / "images.u8", paths, 32, shas)
    assert len(get_cache()) == 0
    assert (tmp_path / "images.u8").stat().st_size == len(paths) * 3 * 32 * 32
    # The decoded pixels went to the cache's files: another size's file or a later round decodes nothing.
    no_decoding(monkeypatch)
    again = dataset.write_image_file(tmp_path / "again.u8", paths, 32, shas)
    assert torch.equal(again[:], rows[:])
