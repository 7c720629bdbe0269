"""What a phone needs to know about a model version, and where its files are."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlmodel import Session

from core import registry
from core.config import get_settings
from core.dataset import IMAGENET_MEAN, IMAGENET_STD
from core.errors import NotFoundError
from core.models import ModelVersion
from core.quality_views import quality_metrics


@dataclass(frozen=True)
class ArtifactFile:
    path: Path
    filename: str
    sha256: str
    size_bytes: int


def resolve_version(version: str | None, *, session: Session) -> ModelVersion:
    """`version` (MAJOR.MINOR.PATCH), or the production model when it is empty."""
    if version:
        return registry.get_version(version, session=session)
    production = registry.production_version(session=session)
    if production is None:
        known = ", ".join(v.version for v in registry.list_versions(session=session))
        hint = f"promote one of {known}" if known else "train a model first"
        raise NotFoundError(f"No model is in production yet: {hint}")
    return production


def verified_artifacts(version: ModelVersion) -> list[dict]:
    """The files of `version` that passed their parity check in their own
    runtime: the only ones a phone is told about or may download."""
    return [a for a in version.artifacts if (a.get("parity") or {}).get("passed")]


def artifact_file(version: ModelVersion, fmt: str) -> ArtifactFile:
    """The verified file of `version` in format `fmt` (`ptl` or `pte`)."""
    artifacts = verified_artifacts(version)
    record = next((a for a in artifacts if a["format"] == fmt), None)
    if record is None:
        formats = ", ".join(a["format"] for a in artifacts) or "none"
        raise NotFoundError(f"Model {version.version} has no '{fmt}' file; its formats: {formats}")
    path = get_settings().data_dir / record["path"]
    if not path.is_file():
        raise NotFoundError(f"The {fmt} file of model {version.version} is missing from {path.parent}")
    return ArtifactFile(path, path.name, record["sha256"], record["size_bytes"])


def model_manifest(version: ModelVersion, *, download_url: Callable[[str, str], str]) -> dict:
    """Version, classes in output order, input and normalisation, metrics, and
    one entry per verified artifact; `download_url(version, format)` makes its link."""
    metrics = version.metrics
    return {
        "version": version.version,
        "model_version_id": version.id,
        "created": version.created_at,
        "is_production": version.is_production,
        "architecture": version.architecture,
        "classes": list(version.classes),
        "num_classes": len(version.classes),
        "input": {
            "shape": [1, 3, version.image_size, version.image_size],
            "layout": "NCHW",
            "dtype": "float32",
            "color": "RGB",
            "resize": f"{version.image_size}x{version.image_size}, no crop",
            "scale": 1 / 255,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        },
        "metrics": quality_metrics(metrics),
        "artifacts": [
            {
                "format": a["format"],
                "filename": Path(a["path"]).name,
                "url": download_url(version.version, a["format"]),
                "sha256": a["sha256"],
                "size_bytes": a["size_bytes"],
                "runtime": a["runtime"],
            }
            for a in verified_artifacts(version)
        ],
    }
