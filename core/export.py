"""Mobile artifacts: `.ptl` (lite interpreter) and `.pte` (ExecuTorch, XNNPACK).

Each file is written under a temporary name, loaded back in its own runtime,
checked against the eager model on the validation images, and only then
renamed into place. A file that fails the check never appears.
"""

import importlib.metadata
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from core.config import get_settings
from core.dataset import decode_image, normalize
from core.errors import InvalidImageError, NotFoundError
from core.ingest import file_sha256
from core.models import ModelVersion
from core.storage import commit_temp, temp_path_for

log = logging.getLogger(__name__)

# Every format this module can write; EXPORT_FORMATS picks among them.
FORMATS = ("ptl", "pte")
# An artifact's logits may differ from the eager model's by this much plus
# LOGIT_RTOL times the largest eager logit: the runtimes run one image at a
# time where the eager pass ran a batch, and float32 kernels for other batch
# sizes round differently, in proportion to the values (a model trained from
# scratch can have logits in the tens; one such job differed by 1.01e-3).
MAX_LOGIT_DIFF = 1e-3
LOGIT_RTOL = 1e-4


class ExportError(RuntimeError):
    """An artifact could not be produced or failed its parity check."""


@dataclass(frozen=True)
class Parity:
    images: int
    top1_agreement: float
    max_abs_logit_diff: float
    threshold: float = MAX_LOGIT_DIFF

    @property
    def passed(self) -> bool:
        return self.top1_agreement == 1.0 and self.max_abs_logit_diff < self.threshold

    def as_dict(self) -> dict:
        return {
            "images": self.images,
            "top1_agreement": self.top1_agreement,
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "threshold": self.threshold,
            "passed": self.passed,
        }


def artifact_path(version: str, fmt: str) -> Path:
    return get_settings().mobile_models_dir / f"model_{version}.{fmt}"


def runtime_version(fmt: str) -> str:
    if fmt == "ptl":
        return f"torch {torch.__version__.split('+')[0]} lite interpreter"
    return f"executorch {importlib.metadata.version('executorch')}"


def _write_ptl(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    traced = torch.jit.trace(model, example)
    traced._save_for_lite_interpreter(str(path))


def _write_pte(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
        XnnpackPartitioner,
    )
    from executorch.exir import to_edge_transform_and_lower

    exported = torch.export.export(model, (example,))
    program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch()
    path.write_bytes(program.buffer)


def load_runner(path: Path, fmt: str):
    """A callable (1, 3, H, W) -> logits running `path` in its own runtime."""
    if fmt == "ptl":
        from torch.jit.mobile import _load_for_lite_interpreter

        module = _load_for_lite_interpreter(str(path))
        return lambda x: module(x)
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(path)).load_method("forward")
    return lambda x: method.execute([x])[0]


def check_parity(path: Path, fmt: str, images: torch.Tensor, eager_logits: torch.Tensor) -> Parity:
    """Run every image through the artifact and compare with the eager logits."""
    run = load_runner(path, fmt)
    agree, worst = 0, 0.0
    with torch.inference_mode():
        for i in range(images.shape[0]):
            out = run(images[i : i + 1].contiguous())
            worst = max(worst, float((out - eager_logits[i : i + 1]).abs().max()))
            agree += int(out.argmax(1).item() == eager_logits[i].argmax().item())
    largest = float(eager_logits.abs().max()) if eager_logits.numel() else 0.0
    threshold = MAX_LOGIT_DIFF + LOGIT_RTOL * largest
    return Parity(images.shape[0], agree / max(1, images.shape[0]), worst, threshold)


def export_model(
    model: nn.Module,
    version: str,
    images: torch.Tensor,
    on_step: Callable[[str], None] | None = None,
    formats: Sequence[str] | None = None,
) -> list[dict]:
    """Write, verify and publish the artifacts of `version` in `formats`
    (default: every one of EXPORT_FORMATS).

    `images` are normalised validation images (N, 3, H, W). Returns one record
    per artifact; raises ExportError (leaving no file behind) on any failure.
    `on_step` hears "exporting" before each file is written and "checking the
    phone files" before it is run in its own runtime.
    """
    on_step = on_step or (lambda step: None)
    model = model.eval()
    with torch.inference_mode():
        eager = model(images)
    example = images[:1].contiguous()
    records, published = [], []
    try:
        for fmt in get_settings().formats if formats is None else formats:
            final = artifact_path(version, fmt)
            records.append(publish_artifact(model, fmt, final, images, eager, example, on_step))
            published.append(final)
    except ExportError:
        remove_files(published)
        raise
    except Exception as exc:
        remove_files(published)
        raise ExportError(f"export of model {version} failed: {exc}") from exc
    return records


def publish_artifact(
    model: nn.Module,
    fmt: str,
    final: Path,
    images: torch.Tensor,
    eager: torch.Tensor,
    example: torch.Tensor,
    on_step: Callable[[str], None] = lambda step: None,
) -> dict:
    """Write `model` as `fmt` to `final` (under a temporary name until its
    outputs on `images` match `eager`) and return its record; ExportError
    when they do not match. `federated` exports the frozen backbone this way."""
    tmp = temp_path_for(final)
    try:
        on_step("exporting")
        (_write_ptl if fmt == "ptl" else _write_pte)(model, example, tmp)
        on_step("checking the phone files")
        parity = check_parity(tmp, fmt, images, eager)
        if not parity.passed:
            raise ExportError(
                f".{fmt} export does not match the trained model: top-1 agreement "
                f"{parity.top1_agreement:.1%}, largest logit difference {parity.max_abs_logit_diff:.2e} "
                f"(at most {parity.threshold:.2e} allowed)"
            )
        commit_temp(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "format": fmt,
        "path": final.relative_to(get_settings().data_dir).as_posix(),
        "sha256": file_sha256(final),
        "size_bytes": final.stat().st_size,
        "runtime": runtime_version(fmt),
        "parity": parity.as_dict(),
    }


def try_model(version: ModelVersion, data: bytes, *, top: int = 5) -> list[tuple[str, float]]:
    """What `version` predicts for one picture (the bytes of an image file):
    its `top` categories with their probabilities, highest first, run through
    the exported `.ptl` in the lite interpreter, as a phone runs it."""
    try:
        pixels = decode_image(io.BytesIO(data), version.image_size)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise InvalidImageError(f"Cannot read that file as an image ({exc}); use a JPEG, PNG or WebP picture") from None
    lite = next((a for a in version.artifacts if a["format"] == "ptl"), None)
    path = get_settings().data_dir / lite["path"] if lite else None
    if path is None or not path.is_file():
        raise NotFoundError(f"Model {version.version} has no .ptl file to run; re-export it or try another version")
    batch = normalize(pixels.unsqueeze(0)).contiguous()
    with torch.inference_mode():
        probabilities = load_runner(path, "ptl")(batch).float().softmax(1)[0]
    best = probabilities.topk(min(top, len(version.classes)))
    return [(version.classes[i], float(p)) for p, i in zip(best.values.tolist(), best.indices.tolist(), strict=True)]


def remove_files(paths: list[Path]) -> None:
    for path in paths:
        Path(path).unlink(missing_ok=True)
