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


def add_images(
    session: Session, per_category: dict[str, int], status=ImageStatus.validated, size=(16, 16)
) -> list[int]:
    """Store distinct images (`size`: width, height) per category; returns their ids."""
    ids, offset = [], 0
    for category, n in per_category.items():
        for data in distinct_images(n + offset, size)[offset:]:
            ids.append(ingest_bytes(data, "x.png", session=session, category=category, status=status).image_id)
        offset += n
    session.commit()
    return ids


def add_demo(session: Session, per_category: int = 12, size: int = 32, status=ImageStatus.validated):
    report = load_demo_dataset(session=session, per_category=per_category, size=size, status=status)
    session.commit()
    return report


def add_token(session: Session, role: str, **kwargs) -> dict[str, str]:
    """A new API token for `role`; returns the Authorization header that sends it."""
    from core.tokens import create_token

    created = create_token(
        session=session, actor=as_actor(), role=role, label=kwargs.pop("label", f"test {role}"), **kwargs
    )
    session.commit()
    return {"Authorization": f"Bearer {created.secret}"}


def add_fake_version(session: Session, version: str = "1.0.0", *, production: bool = True, classes=("cat", "dog")):
    """A ModelVersion with small stand-in artifact files (for download tests, no training)."""
    import hashlib

    from core.config import get_settings
    from core.export import artifact_path, runtime_version

    artifacts = []
    for fmt in ("ptl", "pte"):
        path = artifact_path(version, fmt)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = f"stand-in {fmt} of {version}".encode()
        path.write_bytes(data)
        artifacts.append(
            {
                "format": fmt,
                "path": path.relative_to(get_settings().data_dir).as_posix(),
                "sha256": hashlib.sha256(data).hexdigest(),
                "size_bytes": len(data),
                "runtime": runtime_version(fmt),
                "parity": {"passed": True},
            }
        )
    model = version_row(
        version,
        classes,
        metrics={"train_accuracy": 98.2, "val_accuracy": 95.5, "model_size_mb": 8.1},
        artifacts=artifacts,
        is_production=production,
    )
    session.add(model)
    session.commit()
    return model


def as_actor(name: str = "tester", role: str = "admin"):
    """Who a core call acts as (an admin unless said otherwise)."""
    from core.access import Actor

    return Actor(name, role)


def add_user(session: Session, name: str, role: str, password: str = "correct horse battery"):
    """A dashboard user with a known password; returns it."""
    from core.users import create_user

    user = create_user(name, role, session=session, actor=as_actor("setup"), password=password).user
    session.commit()
    return user


def sign_in(at, user) -> None:
    """Make an AppTest run as `user` signed in: a real session, whose token
    the AppTest carries in session state (it cannot send the browser's cookie)."""
    from core.db import session_scope
    from core.sessions import claim_ticket, start_session

    with session_scope() as s:
        at.session_state["session_token"] = claim_ticket(start_session(user.id, session=s), session=s).token


def version_row(version: str, classes=("cat", "dog"), **fields):
    """An unsaved ModelVersion row (no files)."""
    from core.models import ModelVersion
    from core.registry import parse_version

    major, minor, patch = parse_version(version)
    return ModelVersion(
        version=version,
        major=major,
        minor=minor,
        patch=patch,
        classes=list(classes),
        architecture="mobilenet_v3_small",
        image_size=32,
        checkpoint_path=f"checkpoints/model_{version}.pt",
        **fields,
    )
