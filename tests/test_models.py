"""Models: output shapes on MNIST-like and CIFAR-like inputs; ResNet sizes from the paper."""

from __future__ import annotations

import pytest
import torch

from trainables.config import MODELS, ModelConfig
from trainables.models import build_model


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("channels, size, classes", [(1, 28, 10), (3, 32, 100)])
def test_output_shape(name: str, channels: int, size: int, classes: int) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name), channels, size, classes).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "alexnet"])
def test_torchvision_models_on_large_inputs(name: str) -> None:
    model = build_model(ModelConfig(name=name), 3, 96, 2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, 2)


@pytest.mark.parametrize("name, millions", [("resnet20", 0.27), ("resnet44", 0.66),
                                            ("resnet56", 0.85)])
def test_cifar_resnet_sizes_match_he_et_al(name: str, millions: float) -> None:
    # Table 6 of He et al. 2016: 0.27M, 0.66M, 0.85M parameters (option A shortcuts).
    model = build_model(ModelConfig(name=name), 3, 32, 10)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params - millions) < 0.01


def test_mlp_and_lenet_follow_their_config() -> None:
    mlp = build_model(ModelConfig(name="mlp", widths=(64, 32)), 1, 28, 10)
    linears = [m for m in mlp.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 64), (64, 32), (32, 10)]
    lenet = build_model(ModelConfig(name="lenet", channels=(6, 16), hidden=(120, 84),
                                    kernel_size=5, batch_norm=True), 1, 28, 10)
    convs = [m for m in lenet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(6, (5, 5)), (16, (5, 5))]
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in lenet.modules())
