"""How a `full` training round learns: optimizer, learning-rate schedule,
loss, augmentation of each batch and the initial weights.

One `Recipe` holds every choice; `RECIPE` is the one the product trains
with. Each field was measured on its own against the previous recipe, on
several kinds of small real-looking pictures (bench/recipe.py, BENCHMARKS.md
"Training recipe"), and kept only where it helped. The operator's numbers keep
their meaning: `epochs` and `batch_size` are unchanged, and the learning rate
is the peak of the schedule divided by `peak_factor` (see `build_scheduler`).
"""

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Recipe:
    """The training choices that do not come from the operator. The defaults
    are the product's choices before this recipe (the benchmark's baseline)."""

    # AdamW's decoupled weight decay, applied to weights only (not to biases
    # or BatchNorm's scale and shift, where decay only fights the normalisation).
    weight_decay: float = 0.01
    # Share of the steps over which the rate climbs linearly from near zero
    # to its peak (0: none, as before the recipe); a cosine to zero follows.
    warmup: float = 0.0
    # Peak learning rate = the operator's learning rate x this.
    peak_factor: float = 1.0
    label_smoothing: float = 0.0
    # "flip": mirror half the images left-right (what the product did before;
    # wrong for letters and digits, whose mirror image is another class or
    # none). "affine": a small random shift, turn and zoom, safe for most
    # pictures. "none": the pictures as they are.
    augment: str = "flip"
    # Start each residual branch at zero (its last BatchNorm's scale), so every
    # block begins as the identity (torchvision's `zero_init_residual`).
    zero_init_residual: bool = False


# The recipe every `full` round uses (the kept rows of BENCHMARKS.md "Training
# recipe"); looked up at each call, so a benchmark can swap it.
RECIPE = Recipe(warmup=0.05, peak_factor=3.0, augment="affine")

# "affine" augmentation's range, as fractions of the side / degrees: small
# enough to keep a glyph or a digit what it is.
SHIFT = 0.1
TURN_DEGREES = 10.0
ZOOM = 0.1


# Devices where AdamW's fused kernel runs: one pass over all the parameters
# instead of PyTorch's default loop of tensor operations. On this 2-core CPU a
# step of mobilenet_v3_small takes 3.7 ms against 14.5 (BENCHMARKS.md section
# 9). It rounds differently (within 1.2e-7 over 300 steps on the same
# gradients), so a training takes another path to the same outcome: held-out
# accuracy over 16 seeds of glyphs and documents, default against fused, in
# BENCHMARKS.md section 9 (session 10).
FUSED_DEVICES = ("cpu", "cuda")


def build_optimizer(model: nn.Module, learning_rate: float, recipe: Recipe | None = None) -> torch.optim.Optimizer:
    """AdamW over the parameters that train, decaying weights but not biases
    or norms; fused where the parameters' device has the kernel."""
    recipe = recipe or RECIPE
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = bool(params) and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=learning_rate * recipe.peak_factor, fused=fused or None
    )


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict(state)`, keeping the optimizer's own kernel:
    PyTorch takes every setting of the saved groups, `fused` and `foreach`
    too, so a checkpoint of an optimizer built otherwise (before the fused
    kernel, or on another device) would silently switch it."""
    kernels = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kernel in zip(optimizer.param_groups, kernels, strict=True):
        group.update(kernel)
        if group.get("fused"):
            # The fused kernel keeps its step counts on the parameters' device.
            for p in group["params"]:
                saved = optimizer.state.get(p, {})
                if "step" in saved:
                    saved["step"] = saved["step"].to(device=p.device, dtype=torch.float32)


def build_scheduler(
    optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int, recipe: Recipe | None = None
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step schedule: linear warm-up over `recipe.warmup` of the steps,
    then a cosine down to zero at the last step. Step it after every
    optimizer step; its state_dict (the step count) resumes it exactly."""
    recipe = recipe or RECIPE
    total = max(1, epochs * steps_per_epoch)
    warm = round(recipe.warmup * total)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_loss(recipe: Recipe | None = None) -> nn.Module:
    """Cross-entropy, with the recipe's label smoothing."""
    recipe = recipe or RECIPE
    return nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)


def augment_batch(x: torch.Tensor, generator: torch.Generator, recipe: Recipe | None = None) -> torch.Tensor:
    """A training batch (uint8, N x C x H x W) randomly changed as the recipe
    says; same shape and dtype, and the same order (labels still match).
    `generator` makes it repeatable (a resumed epoch sees the same batches)."""
    recipe = recipe or RECIPE
    n = x.shape[0]
    if recipe.augment == "none" or n == 0:
        return x
    if recipe.augment == "flip":
        flip = torch.rand(n, generator=generator) < 0.5
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    if recipe.augment != "affine":
        raise ValueError(f"unknown augment {recipe.augment!r}; one of none, flip, affine")

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    turn = torch.deg2rad(uniform(-TURN_DEGREES, TURN_DEGREES))
    scale = 1 / uniform(1 - ZOOM, 1 + ZOOM)
    # affine_grid maps output to input coordinates in [-1, 1]: a shift of
    # SHIFT of the side is 2 * SHIFT there.
    tx, ty = uniform(-2 * SHIFT, 2 * SHIFT), uniform(-2 * SHIFT, 2 * SHIFT)
    cos, sin = torch.cos(turn) * scale, torch.sin(turn) * scale
    grid = affine_grid(cos, sin, tx, ty, x.shape[2], x.shape[3])
    # "border" repeats the edge pixels: paper stays paper, sky stays sky,
    # where zeros would draw a black frame that no real picture has.
    out = nn.functional.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(x.dtype)


def affine_grid(
    cos: torch.Tensor, sin: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """`nn.functional.affine_grid` (align_corners False) of the rows
    [[cos, -sin, tx], [sin, cos, ty]], by broadcasting: the same grid to
    within 1e-6, where PyTorch's batched product with a 3-wide inner
    dimension took 0.74 ms of a 64 px batch of 32 (0.17 ms here) and 3.9 ms
    at 160 px (0.39 ms) on this 2-core machine (BENCHMARKS.md section 9)."""

    def centres(k: int) -> torch.Tensor:  # pixel centres in [-1, 1]
        return (torch.arange(k, dtype=torch.float32) * 2 + 1) / k - 1

    xs, ys = centres(width).view(1, 1, width), centres(height).view(1, height, 1)
    cos, sin, tx, ty = (v.view(-1, 1, 1) for v in (cos, sin, tx, ty))
    return torch.stack([cos * xs + (tx - sin * ys), sin * xs + (cos * ys + ty)], 3)


def init_model(model: nn.Module, recipe: Recipe | None = None) -> nn.Module:
    """The recipe's changes to a freshly built model's initial weights."""
    recipe = recipe or RECIPE
    if recipe.zero_init_residual:
        for norm in residual_branch_norms(model):
            nn.init.zeros_(norm.weight)
    return model


def residual_branch_norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The last BatchNorm of every residual branch of torchvision's ResNet,
    MobileNetV3 and EfficientNet blocks (blocks without a shortcut excluded:
    zeroing those would cut the signal)."""
    from torchvision.models.efficientnet import MBConv
    from torchvision.models.mobilenetv3 import InvertedResidual
    from torchvision.models.resnet import BasicBlock, Bottleneck

    norms = []
    for block in model.modules():
        if isinstance(block, BasicBlock):
            norms.append(block.bn2)
        elif isinstance(block, Bottleneck):
            norms.append(block.bn3)
        elif isinstance(block, InvertedResidual | MBConv) and block.use_res_connect:
            last = [m for m in block.block[-1].modules() if isinstance(m, nn.BatchNorm2d)]
            norms.extend(last[-1:])
    return norms
