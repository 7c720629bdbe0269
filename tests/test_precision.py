"""The training steps' precision on the CPU: bfloat16 autocast for the
architectures it speeds up, on CPUs that compute bfloat16 natively; float32
otherwise, and always for evaluation (the recorded accuracies are the
exported float model's: test_model_quality checks the files score them)."""

import pytest
import torch
import torchvision

from core.config import get_settings
from core.training import placement
from core.training.config import TrainingConfig
from core.training.placement import CPU, CPU_BF16_ARCHITECTURES, Placement, amp_dtype
from core.training.trainers import FullTrainer, HeadTrainer


@pytest.fixture
def native_bf16(monkeypatch):
    """Pretend the CPU has (or lacks) native bfloat16: returns a setter."""

    def set_to(value: bool) -> None:
        monkeypatch.setattr(placement, "cpu_computes_bf16", lambda: value)

    return set_to


def test_resnet18_trains_in_bf16_on_a_cpu_that_computes_it_and_the_depthwise_networks_in_float32(native_bf16):
    native_bf16(True)
    assert CPU_BF16_ARCHITECTURES == ("resnet18",)
    assert amp_dtype(CPU, "resnet18") == torch.bfloat16
    assert amp_dtype(CPU, "mobilenet_v3_small") is None
    assert amp_dtype(CPU, "efficientnet_b0") is None
    assert amp_dtype(CPU) is None
    assert Placement(CPU).describe("resnet18") == "cpu (bf16)"
    assert Placement(CPU).describe("mobilenet_v3_small") == "cpu"
    # bfloat16 needs no loss scaling.
    assert not Placement(CPU).grad_scaler("resnet18").is_enabled()


def test_no_bf16_where_the_cpu_would_only_emulate_it(native_bf16):
    native_bf16(False)
    assert amp_dtype(CPU, "resnet18") is None
    assert Placement(CPU).describe("resnet18") == "cpu"


def test_training_cpu_bf16_false_keeps_every_architecture_in_float32(native_bf16, monkeypatch):
    native_bf16(True)
    monkeypatch.setenv("TRAINING_CPU_BF16", "false")
    get_settings.cache_clear()
    try:
        assert amp_dtype(CPU, "resnet18") is None
    finally:
        monkeypatch.delenv("TRAINING_CPU_BF16")
        get_settings.cache_clear()


def test_the_autocast_context_runs_resnet18s_convolutions_in_bf16_and_leaves_evaluation_float32(native_bf16):
    native_bf16(True)
    model = torchvision.models.resnet18(num_classes=3).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with Placement(CPU).autocast("resnet18"):
        assert model(x).dtype == torch.bfloat16
    with Placement(CPU).autocast("mobilenet_v3_small"):
        assert model(x).dtype == torch.float32
    assert model(x).dtype == torch.float32


def test_head_mode_trains_its_one_layer_in_float32_whatever_the_backbone():
    config = TrainingConfig(architecture="resnet18", training_mode="head")
    assert HeadTrainer.amp_architecture(config) is None
    assert FullTrainer.amp_architecture(TrainingConfig(architecture="resnet18")) == "resnet18"
