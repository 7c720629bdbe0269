"""How good a model is: evaluation passes (loss, logits, accuracy, per-class
figures, the misclassified images), BatchNorm recalibration, and a
version's predictions on a round's test images.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from core import registry
from core.dataset import load_images
from core.models import ModelVersion
from core.training.networks import build_model, head
from core.training.placement import MEMORY_FORMAT, device_of, prepare_batch

# Test images decoded and scored at once by `predict_test_images`.
PREDICT_CHUNK = 1024


def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, max_images: int = 512, batch_size: int = 64) -> None:
    """Recompute BatchNorm running statistics from the current weights.

    The running averages lag behind weights that change quickly (a model
    trained from scratch), so evaluation with them is far worse than the
    training accuracy; a no-grad pass over training images fixes that."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or x.shape[0] < 2:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches below
    # A fixed random sample: the rows of `x` are grouped by class.
    sample = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:max_images]]
    device = device_of(model)
    model.train()
    with torch.no_grad():
        for start in range(0, sample.shape[0], batch_size):
            chunk = sample[start : start + batch_size]
            if chunk.shape[0] > 1:
                model(prepare_batch(chunk, device))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 128) -> tuple[float, torch.Tensor]:
    """Mean loss and the logits of every image (eval mode, no autograd, full
    precision: the figures recorded are those of the exported float model)."""
    device = device_of(model)
    model.eval()
    logits = []
    with torch.inference_mode():
        for start in range(0, x.shape[0], batch_size):
            logits.append(model(prepare_batch(x[start : start + batch_size], device)).float().cpu())
    out = torch.cat(logits) if logits else torch.empty(0, head(model).out_features)
    loss = float(nn.functional.cross_entropy(out, y)) if len(y) else 0.0
    return loss, out


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Percent of rows whose highest logit is the label."""
    return float((logits.argmax(1) == y).float().mean() * 100) if len(y) else 0.0


def summarise(logits: torch.Tensor, y: torch.Tensor, classes: list[str]) -> dict:
    """Per-class accuracy (percent) and the confusion matrix (rows: truth)."""
    n = len(classes)
    matrix = torch.zeros((n, n), dtype=torch.long)
    for truth, pred in zip(y.tolist(), logits.argmax(1).tolist(), strict=True):
        matrix[truth, pred] += 1
    per_class = {}
    for i, name in enumerate(classes):
        total = int(matrix[i].sum())
        per_class[name] = round(100.0 * int(matrix[i, i]) / total, 2) if total else None
    return {"per_class_accuracy": per_class, "confusion_matrix": matrix.tolist()}


def misclassified(logits: torch.Tensor, y: torch.Tensor, image_ids: list[int], classes: list[str]) -> list[dict]:
    """The validation images the model got wrong: truth, prediction, confidence."""
    probs = logits.softmax(1)
    out = []
    for i, (truth, pred) in enumerate(zip(y.tolist(), probs.argmax(1).tolist(), strict=True)):
        if truth != pred:
            out.append(
                {
                    "image_id": image_ids[i],
                    "true": classes[truth],
                    "predicted": classes[pred],
                    "confidence": round(float(probs[i, pred]), 4),
                }
            )
    return out


@dataclass
class TestImages:
    """The round's test images: what the promotion gate compares versions on."""

    ids: list[int]
    labels: list[str]
    paths: list[Path]
    shas: list[str]
    # The new model's prediction for each of them.
    predicted: dict[int, str]


def predict_test_images(version: ModelVersion, test: TestImages) -> dict[int, str]:
    """`version`'s prediction for each test image whose label it knows."""
    known = [i for i, label in enumerate(test.labels) if label in version.classes]
    if not known:
        return {}
    payload = registry.load_checkpoint(version)
    model = build_model(version.architecture, len(version.classes))
    model.load_state_dict(payload["state_dict"])
    model = model.to(memory_format=MEMORY_FORMAT)
    predicted = []
    # A chunk at a time: a large round's test images need not fit in memory.
    for start in range(0, len(known), PREDICT_CHUNK):
        part = known[start : start + PREDICT_CHUNK]
        x = load_images([test.paths[i] for i in part], version.image_size, [test.shas[i] for i in part])
        predicted += evaluate(model, x, torch.zeros(len(part), dtype=torch.long))[1].argmax(1).tolist()
    return {test.ids[i]: version.classes[p] for i, p in zip(known, predicted, strict=True)}
