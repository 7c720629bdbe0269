"""Small images and rows for tests."""

import io
import struct
import zlib

from PIL import Image
from sqlmodel import Session

from core.demo import load_demo_dataset
from core.ingest import ingest_bytes
from core.models import ImageStatus


def image_bytes(colour=(200, 30, 30), size=(32, 32), fmt="PNG", **save) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def distinct_images(n: int, size=(16, 16)) -> list[bytes]:
    """`n` different small PNGs (different bytes, so no duplicates)."""
    return [image_bytes(((i * 7) % 256, (i * 13) % 256, (i * 29) % 256 + 0), size) for i in range(n)]


def png_with_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` (a decompression bomb)."""
    data = bytearray(image_bytes(size=(1, 1)))
    # IHDR data starts at byte 16: width, height, then 5 more bytes, then CRC.
    data[16:24] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF
    data[29:33] = struct.pack(">I", crc)
    return bytes(data)


def add_images(session: Session, per_category: dict[str, int], status=ImageStatus.validated) -> list[int]:
    """Store distinct images per category; returns their ids."""
    ids, offset = [], 0
    for category, n in per_category.items():
        for data in distinct_images(n + offset)[offset:]:
            ids.append(ingest_bytes(data, "x.png", session=session, category=category, status=status).image_id)
        offset += n
    session.commit()
    return ids


def add_demo(session: Session, per_category: int = 12, size: int = 32, status=ImageStatus.validated):
    report = load_demo_dataset(session=session, per_category=per_category, size=size, status=status)
    session.commit()
    return report
