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


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_lenet_pools_before_relu_with_the_same_numbers(channels_last: bool,
                                                       batch_norm: bool) -> None:
    """LeNet pools, then applies ReLU (cheaper); the oracle is the textbook order (ReLU,
    then pool) with the same weights: outputs and every gradient bit-identical, ties of
    the pooled window and zeros included."""
    torch.manual_seed(0)
    lenet = build_model(ModelConfig(name="lenet", channels=(4, 8), hidden=(16,),
                                    batch_norm=batch_norm), 1, 12, 3)
    layers, reference = list(lenet.features), []
    for module in layers:
        if isinstance(module, torch.nn.ReLU):  # put each ReLU back before its pool
            reference.insert(len(reference) - 1, torch.nn.ReLU())
        else:
            reference.append(module)
    assert [type(m) for m in reference] != [type(m) for m in layers]
    textbook = torch.nn.Sequential(*reference)
    x = torch.randn(6, 1, 12, 12)
    x[0] = 0.0  # all-zero maps: every pooled window ties
    x[1, :, :6] = x[1, :, :1]  # rows repeated: ties among positive values
    memory = torch.channels_last if channels_last else torch.contiguous_format
    lenet = lenet.to(memory_format=memory)
    x = x.to(memory_format=memory)

    def run(features: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
        lenet.zero_grad(set_to_none=True)
        out = lenet.classifier(features(x))
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in lenet.parameters()]

    out, grads = run(lenet.features)
    out_ref, grads_ref = run(textbook)
    assert torch.equal(out, out_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert torch.equal(g, g_ref)
