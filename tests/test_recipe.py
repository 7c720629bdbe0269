"""The training recipe: schedule, augmentation, initial weights, resume."""

import io
import itertools

import pytest
import torch
import torchvision

from core.training import recipe
from core.training.recipe import Recipe


def lrs_of(optimizer, scheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_schedule_warms_up_linearly_to_the_peak_then_decays_to_zero():
    model = torch.nn.Linear(4, 2)
    settings = Recipe(warmup=0.1, peak_factor=3.0)
    optimizer = recipe.build_optimizer(model, 0.001, settings)
    scheduler = recipe.build_scheduler(optimizer, epochs=10, steps_per_epoch=10, recipe=settings)
    lrs = lrs_of(optimizer, scheduler, 100)
    peak = 0.003
    # Ten warm-up steps, each a tenth of the peak more; the first is not zero.
    assert lrs[:10] == pytest.approx([peak * (i + 1) / 10 for i in range(10)])
    assert max(lrs) == pytest.approx(peak)
    decay = lrs[10:]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert decay[len(decay) // 2] == pytest.approx(peak / 2, rel=0.05)  # a cosine: half way, half the peak
    assert decay[-1] < peak * 0.01


def test_schedule_without_warm_up_starts_at_the_operators_learning_rate():
    optimizer = recipe.build_optimizer(torch.nn.Linear(4, 2), 0.001, Recipe(warmup=0.0, peak_factor=1.0))
    scheduler = recipe.build_scheduler(optimizer, 2, 5, Recipe(warmup=0.0, peak_factor=1.0))
    assert lrs_of(optimizer, scheduler, 1) == [pytest.approx(0.001)]


def test_weight_decay_spares_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    optimizer = recipe.build_optimizer(model, 0.001, Recipe(weight_decay=0.05))
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay[id(model[0].weight)] == 0.05
    assert decay[id(model[0].bias)] == decay[id(model[1].weight)] == decay[id(model[1].bias)] == 0.0


def test_scheduler_state_saved_and_loaded_as_checkpoints_do_resumes_the_same_rates():
    def fresh():
        model = torch.nn.Linear(4, 2)
        optimizer = recipe.build_optimizer(model, 0.001)
        return optimizer, recipe.build_scheduler(optimizer, epochs=4, steps_per_epoch=5)

    optimizer, scheduler = fresh()
    lrs_of(optimizer, scheduler, 7)  # killed after seven steps
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    expected = lrs_of(optimizer, scheduler, 13)

    resumed_optimizer, resumed_scheduler = fresh()
    buffer.seek(0)
    payload = torch.load(buffer, weights_only=False)
    resumed_optimizer.load_state_dict(payload["optimizer"])
    resumed_scheduler.load_state_dict(payload["scheduler"])
    assert lrs_of(resumed_optimizer, resumed_scheduler, 13) == pytest.approx(expected)


@pytest.mark.parametrize("augment", ["none", "flip", "affine"])
def test_augmentation_keeps_shape_dtype_and_which_picture_is_which(augment):
    # Each picture one flat grey: whatever moves inside it, its value says
    # which picture (so which label) it still is.
    x = torch.arange(10, 250, 30, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 32, 32).contiguous()
    out = recipe.augment_batch(x, torch.Generator().manual_seed(0), Recipe(augment=augment))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out, x)


def test_affine_augmentation_moves_the_picture_repeatably_and_keeps_its_background():
    x = torch.full((4, 3, 32, 32), 255, dtype=torch.uint8)
    x[:, :, 12:20, 12:20] = 0  # a dark square on paper
    settings = Recipe(augment="affine")
    out = recipe.augment_batch(x, torch.Generator().manual_seed(1), settings)
    again = recipe.augment_batch(x, torch.Generator().manual_seed(1), settings)
    assert torch.equal(out, again)
    assert not torch.equal(out, x)
    # The corners stay paper (no black frame from the shift), and the square stays whole.
    assert (out[:, :, 0, 0] == 255).all() and (out[:, :, -1, -1] == 255).all()
    dark = (out[:, 0] < 128).sum((1, 2)).float()
    assert ((dark > 40) & (dark < 90)).all(), dark


@pytest.mark.parametrize(("height", "width"), [(32, 32), (24, 40), (224, 160)])
def test_the_broadcast_grid_is_pytorchs_affine_grid(height, width):
    # Turned, zoomed and shifted rows, as the affine augmentation draws them,
    # on square and oblong pictures (x along the width, y along the height).
    g = torch.Generator().manual_seed(3)
    turn, scale = torch.rand(6, generator=g) * 6 - 3, 0.8 + torch.rand(6, generator=g) * 0.4
    tx, ty = torch.rand(6, generator=g) - 0.5, torch.rand(6, generator=g) - 0.5
    cos, sin = torch.cos(turn) * scale, torch.sin(turn) * scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    expected = torch.nn.functional.affine_grid(theta, [6, 3, height, width], align_corners=False)
    got = recipe.affine_grid(cos, sin, tx, ty, height, width)
    assert got.shape == expected.shape == (6, height, width, 2)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_unknown_augmentation_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown augment 'mirror'"):
        recipe.augment_batch(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.Generator(), Recipe(augment="mirror"))


@pytest.mark.parametrize(
    ("architecture", "blocks"), [("resnet18", 8), ("mobilenet_v3_small", 6), ("efficientnet_b0", 9)]
)
def test_zero_init_starts_every_residual_branch_at_zero(architecture, blocks):
    model = torchvision.models.get_model(architecture, weights=None, num_classes=3)
    norms = recipe.residual_branch_norms(model)
    assert len(norms) == blocks
    assert all(n.weight.abs().sum() > 0 for n in norms)
    recipe.init_model(model, Recipe(zero_init_residual=True))
    assert all(n.weight.abs().sum() == 0 for n in norms)
    # Only those: the other norms keep their scale, and the model still answers.
    others = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) and all(m is not n for n in norms)]
    assert all(m.weight.abs().sum() > 0 for m in others)
    assert torch.isfinite(model.eval()(torch.rand(1, 3, 32, 32))).all()


def test_a_full_round_trains_with_the_recipe_stepping_its_schedule_every_batch(session, ptl_only):
    from sqlmodel import select

    from core.models import EpochMetric
    from core.splits import split_snapshot
    from core.training import rounds as training
    from tests.factories import add_demo

    add_demo(session, per_category=12, size=32)
    params = {"epochs": 2, "batch_size": 8, "learning_rate": 0.002, "image_size": 32, "use_existing_model": False}
    round_ = training.start_training(params, session=session)
    session.commit()
    assert training.run_training_round(round_.id, session=session) is not None, round_.error
    rates = [m.learning_rate for m in session.exec(select(EpochMetric).order_by(EpochMetric.epoch))]

    labels = [round_.classes.index(s["label"]) for s in round_.snapshot]
    keys = [s["split_key"] for s in round_.snapshot]
    n_train = len(split_snapshot(keys, labels, round_.classes, round_.parameters["val_split"], 0).train)
    steps = -(-n_train // 8)
    optimizer = recipe.build_optimizer(torch.nn.Linear(2, 2), 0.002)
    expected = lrs_of(optimizer, recipe.build_scheduler(optimizer, 2, steps), steps + 1)
    assert rates == pytest.approx([expected[0], expected[steps]])


def test_a_checkpoint_from_before_the_recipe_resumes_its_weights_and_epoch_with_the_schedule_where_it_stood(tmp_path):
    import random

    from core.training.loop import resume_from

    # As the previous code saved it: AdamW over one group, a cosine stepped per epoch.
    old_model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    old_optimizer = torch.optim.AdamW(old_model.parameters(), lr=0.001)
    old_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(old_optimizer, T_max=4)
    old_optimizer.step()
    old_scheduler.step()
    payload = {
        "epoch": 2,
        "best_accuracy": 50.0,
        "best_epoch": 2,
        "best_state": None,
        "state_dict": old_model.state_dict(),
        "optimizer": old_optimizer.state_dict(),
        "scheduler": old_scheduler.state_dict(),
        "rng": {"python": random.getstate(), "torch": torch.get_rng_state()},
    }
    torch.save(payload, tmp_path / "checkpoint.pt")

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = recipe.build_optimizer(model, 0.001)
    scheduler = recipe.build_scheduler(optimizer, epochs=4, steps_per_epoch=5)
    state = resume_from(tmp_path / "checkpoint.pt", model, optimizer, scheduler, steps_per_epoch=5)
    assert state.epoch == 2 and state.best_epoch == 2
    assert torch.equal(model[0].weight, old_model[0].weight)

    reference = recipe.build_optimizer(torch.nn.Linear(4, 3), 0.001)
    expected = lrs_of(reference, recipe.build_scheduler(reference, epochs=4, steps_per_epoch=5), 11)[10]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)  # step 10 of 20: where epoch 3 starts


def test_a_checkpoint_of_the_default_optimizer_resumes_into_the_fused_one_and_steps_as_the_default_would(tmp_path):
    from core.training.loop import TrainState, checkpoint_payload, resume_from

    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        optimizer = recipe.build_optimizer(model, 0.001)
        return model, optimizer, recipe.build_scheduler(optimizer, epochs=2, steps_per_epoch=3)

    def step(model, optimizer, scheduler, seed):
        optimizer.zero_grad()
        x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
        model(x).square().mean().backward()
        optimizer.step()
        scheduler.step()

    # A checkpoint written by an optimizer of PyTorch's default kernel (as
    # before the fused one, or on a device without it).
    model, optimizer, scheduler = fresh()
    assert optimizer.param_groups[0]["fused"]  # the product's kernel on the CPU
    for group in optimizer.param_groups:
        group["fused"] = None
    for seed in range(3):
        step(model, optimizer, scheduler, seed)
    state = TrainState(1, 50.0, 1, None)
    path = tmp_path / "checkpoint.pt"
    torch.save(checkpoint_payload(_Config(), ["a", "b"], state, model, optimizer, scheduler), path)
    step(model, optimizer, scheduler, 3)  # the default's next step, the reference

    resumed, fused, fused_scheduler = fresh()
    resume_from(path, resumed, fused, fused_scheduler, steps_per_epoch=3)
    # PyTorch's load_state_dict would have taken the saved kernel setting.
    assert all(group["fused"] for group in fused.param_groups)
    step(resumed, fused, fused_scheduler, 3)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


class _Config:
    def to_dict(self) -> dict:
        return {}
