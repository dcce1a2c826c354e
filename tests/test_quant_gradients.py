"""Training "all in LNS" (LNS-Madam's setting): LNS activations in the forward pass and
gradients rounded in the backward pass (quant/gradients.py, quant/activations.py).

References are computed by hand in float64 from the chain rule (not by the hooks under
test); the rounding itself is LNSFormat's (tested against its float64 reference in
test_lns.py), and "on the grid" is checked independently from log2 of the values."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import quant
from quant import IntFormat, LNSFormat, QuantConfig, prepare_qat_

FMT = LNSFormat(8, 3)


def _on_lns_grid(t: torch.Tensor, fmt: LNSFormat) -> bool:
    """Every nonzero |t| / max|t| is 2**(-e / 2**frac_bits) for an integer e in range."""
    t = t.detach().double().flatten()
    scale = t.abs().max()
    nonzero = t[t != 0].abs() / scale
    e = -torch.log2(nonzero) * fmt.gamma
    return bool(torch.allclose(e, e.round(), atol=1e-6)) and \
        bool((e.round() >= 0).all() and (e.round() < fmt.levels).all())


def _linear(seed: int = 0) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    layer = nn.Linear(6, 4)
    x = torch.randn(5, 6)
    c = torch.randn(5, 4) * torch.logspace(-4, 1, 4)  # dL/dy over five decades
    return layer, x, c


def test_linear_gradients_equal_the_hand_computed_rounded_chain_rule() -> None:
    layer, x, c = _linear()
    prepare_qat_(layer, QuantConfig(weights=FMT, gradients=FMT))
    x = x.requires_grad_()
    y = layer(x)
    (y * c).sum().backward()

    w_q = FMT.fake_quantize(layer.parametrizations.weight.original.detach())
    dy = FMT.fake_quantize(c)  # the gradient at the layer's output, rounded
    # y = x W^T + b: dW = dy^T x, dx = dy W, db = sum dy (float64, by hand)
    dw = FMT.fake_quantize((dy.double().T @ x.detach().double()).float())
    dx = (dy.double() @ w_q.double()).float()
    torch.testing.assert_close(layer.parametrizations.weight.original.grad, dw)
    torch.testing.assert_close(x.grad, dx)
    torch.testing.assert_close(layer.bias.grad, dy.sum(0))
    assert _on_lns_grid(layer.parametrizations.weight.original.grad, FMT)


def test_the_forward_pass_is_unchanged_and_gradients_are_on_the_grid() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True), nn.Flatten(),
                          nn.Linear(4 * 36, 3))
    plain = copy.deepcopy(model)
    prepare_qat_(model, QuantConfig(weights=FMT, gradients=FMT))
    prepare_qat_(plain, QuantConfig(weights=FMT))
    x = torch.randn(8, 1, 8, 8)
    out, ref = model(x), plain(x)
    assert torch.equal(out, ref)  # gradient rounding is the identity forward
    out.square().sum().backward()
    for name, p in model.named_parameters():
        if name.endswith("original"):  # the weights (biases stay float)
            assert _on_lns_grid(p.grad, FMT), name
    ref.square().sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if n.endswith("original")]
    exact = [p.grad for n, p in plain.named_parameters() if n.endswith("original")]
    assert any(not torch.equal(g, e) for g, e in zip(grads, exact, strict=True))  # it did round
    for g, e in zip(grads, exact, strict=True):  # rounded, not another direction
        cosine = torch.nn.functional.cosine_similarity(g.flatten(), e.flatten(), dim=0)
        assert float(cosine) > 0.99


def test_non_finite_gradients_pass_unchanged() -> None:
    g = torch.tensor([1.0, float("nan"), 0.3])
    assert torch.equal(quant.round_gradient(g, FMT), g) is False  # NaN != NaN
    out = quant.round_gradient(g, FMT)
    assert out[0] == 1.0 and math.isnan(out[1]) and out[2] == 0.3
    zeros = torch.zeros(4)
    assert torch.equal(quant.round_gradient(zeros, FMT), zeros)


@pytest.mark.parametrize("top", [3e-8, 1e-3, 5.0])
def test_int_gradients_are_symmetric_levels_of_max_g_at_any_magnitude(top: float) -> None:
    g = torch.tensor([top, -top / 3, top / 7, 0.0], dtype=torch.float64)
    step = top / 127  # by hand: levels -127..127, the largest magnitude exact
    expected = torch.round(g / step) * step
    torch.testing.assert_close(quant.round_gradient(g.float(), IntFormat(8, True)),
                               expected.float(), rtol=1e-6, atol=0)
    assert quant.round_gradient(torch.zeros(0), IntFormat(8, True)).numel() == 0
    assert quant.round_gradient(torch.zeros(0), FMT).numel() == 0


def test_int_gradients_and_bad_gradient_formats() -> None:
    layer, x, c = _linear(2)
    prepare_qat_(layer, QuantConfig(weights=IntFormat(8), gradients=IntFormat(8)))
    (layer(x) * c).sum().backward()
    grad = layer.parametrizations.weight.original.grad.double()
    steps = grad.flatten().unique().diff()  # an evenly spaced grid: gaps are multiples
    ratio = steps / steps.min()
    torch.testing.assert_close(ratio, ratio.round(), atol=1e-3, rtol=0)
    assert float((grad.max() - grad.min()) / steps.min()) <= 255 + 1e-6
    for bad in (IntFormat(8, per_channel=True), quant.CodebookFormat(4), "lns8"):
        with pytest.raises(ValueError, match="gradients=.* is invalid: allowed an LNSFormat "
                                             "or a per-tensor IntFormat"):
            QuantConfig(weights=FMT, gradients=bad)


def test_strip_and_convert_remove_the_rounding_and_deepcopy_keeps_it() -> None:
    layer, x, c = _linear(3)
    prepare_qat_(layer, QuantConfig(weights=FMT, gradients=FMT))
    twin = copy.deepcopy(layer)
    (twin(x.requires_grad_()) * c).sum().backward()
    assert _on_lns_grid(twin.parametrizations.weight.original.grad, FMT)
    quant.strip_qat_(layer)
    assert not layer._forward_hooks and not hasattr(layer, "gradient_format")
    quant.convert_(twin)
    assert not twin._forward_hooks


def test_lns_activations_forward_and_straight_through_inside_the_range() -> None:
    act = quant.ActivationQuant(FMT, "minmax")
    x = torch.linspace(-3, 2, 41, requires_grad=True)
    y = act(x)  # observes [-3, 2]: scale 3
    assert _on_lns_grid(y, FMT)
    torch.testing.assert_close(y, FMT.fake_quantize(x.detach(), 3.0))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # all inside the observed range
    act.observing = False
    z = torch.tensor([-6.0, 1.0, 5.0], requires_grad=True)
    out = act(z)
    out.sum().backward()
    assert out[0] == -3.0 and out[2] == 3.0  # clipped to the scale
    assert z.grad.tolist() == [0.0, 1.0, 0.0]  # no gradient where clipped
