"""LSQ, learned step sizes (Esser et al., 2020) for symmetric INT weights in QAT: the
forward pass is exactly the format's fake quantization with the learned step (what
convert_ packs), the backward pass is the paper's, checked against the formulas computed
by hand in float64."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import quant
from quant import IntFormat, QuantConfig, prepare_qat_


def _hand_gradients(w: torch.Tensor, step: torch.Tensor, c: torch.Tensor, fmt: IntFormat
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """dL/dw and dL/dstep for L = sum(c * q(w)), per tensor (step 0-dim) or per output
    channel (step [C]), in float64."""
    w, c = w.double(), c.double()
    s = step.double().reshape(-1, *([1] * (w.dim() - 1))) if step.dim() else step.double()
    v = w / s
    inside = (v >= fmt.quant_min) & (v <= fmt.quant_max)
    clipped = v.clamp(fmt.quant_min, fmt.quant_max)
    dq_ds = torch.where(inside, torch.round(v) - v, clipped)
    n = w.numel() // max(1, step.numel())
    g = 1 / math.sqrt(n * fmt.quant_max)
    dstep = (c * dq_ds * g)
    dstep = dstep.reshape(w.shape[0], -1).sum(1) if step.dim() else dstep.sum()
    return (c * inside).float(), dstep.float()


@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_gradients_equal_the_papers_formulas(per_channel: bool) -> None:
    torch.manual_seed(0)
    fmt = IntFormat(3, symmetric=True, per_channel=per_channel)
    layer = nn.Linear(16, 4)
    prepare_qat_(layer, QuantConfig(weights=fmt, lsq=True))
    fq = layer.parametrizations.weight[0]
    w = layer.parametrizations.weight.original
    c = torch.randn(4, 16)
    (layer.weight * c).sum().backward()
    dw, dstep = _hand_gradients(w.detach(), fq.step.detach(), c, fmt)
    torch.testing.assert_close(w.grad, dw)
    torch.testing.assert_close(fq.step.grad, dstep, rtol=1e-5, atol=1e-6)  # float32 sums
    assert bool((~(w.grad == c)).any())  # some weights fell outside the 3-bit range
    # LSQ's start: 2 mean|w| / sqrt(quant_max)
    expected = 2 * w.detach().abs().mean(dim=1 if per_channel else None) / math.sqrt(3)
    torch.testing.assert_close(fq.step.detach(), expected)


def test_forward_is_the_formats_fake_quantization_and_convert_keeps_it() -> None:
    torch.manual_seed(1)
    fmt = IntFormat(4, symmetric=True, per_channel=True)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(inplace=True), nn.Flatten(),
                          nn.Linear(3 * 36, 5))
    prepare_qat_(model, QuantConfig(weights=fmt, lsq=True))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(8, 1, 8, 8)
    for _ in range(5):  # the steps move away from their start
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    conv = model[0].parametrizations.weight
    step = conv[0].step.detach()
    zero = torch.zeros(step.shape, dtype=torch.int64)
    assert torch.equal(model[0].weight, fmt.fake_quantize(conv.original.detach(), step, zero))
    assert not torch.equal(step, quant.transforms.lsq_initial_step(conv.original, fmt))
    model.eval()
    before = model(x)
    quant.convert_(model)
    assert torch.equal(model(x), before)  # what was trained is what is packed


def test_lsq_learns_a_better_step_than_its_start() -> None:
    """A 2-bit layer fitting its own float weights: the step moves to cut the error."""
    torch.manual_seed(2)
    fmt = IntFormat(2, symmetric=True)
    target = torch.randn(64, 64)
    layer = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        layer.weight.copy_(target)
    prepare_qat_(layer, QuantConfig(weights=fmt, lsq=True))
    step = layer.parametrizations.weight[0].step
    opt = torch.optim.SGD([step], lr=0.5)
    first = None
    for _ in range(200):
        opt.zero_grad()
        loss = (layer.weight - target).square().mean()
        first = float(loss.detach()) if first is None else first
        loss.backward()
        opt.step()
    assert float((layer.weight - target).square().mean().detach()) < 0.9 * first


@pytest.mark.parametrize("weights", [quant.LNSFormat(4), IntFormat(4, symmetric=False)])
def test_lsq_needs_symmetric_int_weights(weights) -> None:
    with pytest.raises(ValueError, match="lsq=True is invalid with weights .*: allowed "
                                         "symmetric IntFormat weights only"):
        QuantConfig(weights=weights, lsq=True)


def test_a_trial_with_lsq_trains_packs_and_resumes_exactly(tiny_root: Path,
                                                           tmp_path: Path) -> None:
    from conftest import tiny_config
    from test_quant_stage import assert_resumes_exactly, packed_accuracy

    from trainables.config import ConfigError
    from trainables.loop import run_trial
    from trainables.sessions import LocalSession

    cfg = tiny_config(tiny_root, "quant.mode=qat", "quant.bits=3", "quant.per_channel=true",
                      "quant.lsq=true")
    full = run_trial(cfg, LocalSession(checkpoint_dir=tmp_path / "full"))
    minmax = run_trial(cfg.with_overrides(["quant.lsq=false"]), LocalSession())
    assert full[0]["train_loss"] != minmax[0]["train_loss"]
    assert full[-1]["train_loss"] < full[0]["train_loss"]
    packed = tmp_path / "full" / "artifacts" / "model.qsw"
    assert packed_accuracy(cfg, packed) == full[-1]["test_acc_q"]
    assert_resumes_exactly(cfg, tmp_path, full)
    with pytest.raises(ConfigError, match="quant.lsq=True is invalid: allowed false with "
                                          "quant.mode=ptq"):
        tiny_config(tiny_root, "quant.mode=ptq", "quant.lsq=true")


def test_a_step_pushed_to_or_below_zero_is_floored_and_can_come_back() -> None:
    """An optimizer may overshoot the step below 0: the layer must not die (every weight
    clipped to ~0 with no gradient), and the step must get a gradient to recover."""
    torch.manual_seed(3)
    fmt = IntFormat(4, symmetric=True)
    layer = nn.Linear(16, 8)
    prepare_qat_(layer, QuantConfig(weights=fmt, lsq=True))
    fq = layer.parametrizations.weight[0]
    with torch.no_grad():
        fq.step.fill_(-0.5)
    target = layer.parametrizations.weight.original.detach().clone()
    w = layer.weight
    assert bool(torch.isfinite(w).all()) and bool((w != 0).any())  # floored, not 0
    start = float((w - target).square().mean().detach())
    opt = torch.optim.SGD([fq.step], lr=5.0)
    for _ in range(50):  # every weight clips at the floor, yet the step gets a gradient
        opt.zero_grad()
        (layer.weight - target).square().mean().backward()
        opt.step()
    assert float(fq.step.detach()) > 0
    assert float((layer.weight - target).square().mean().detach()) < 0.5 * start


def test_lsq_on_another_device_keeps_its_parameters_there() -> None:
    """The zero point follows the step's device (a CPU one broke per-channel CUDA runs);
    the meta device stands in for a GPU here."""
    layer = nn.Linear(8, 4, device="meta")
    prepare_qat_(layer, QuantConfig(weights=IntFormat(4, True, True), lsq=True))
    assert layer.weight.device.type == "meta"
    assert layer.parametrizations.weight[0].step.device.type == "meta"


def test_lsq_is_refused_where_it_cannot_learn() -> None:
    from trainables.config import ConfigError, TrialConfig

    with pytest.raises(ValueError, match="lsq=True is invalid for PTQ"):
        quant.quantize_(nn.Linear(4, 2), QuantConfig(weights=IntFormat(4, True), lsq=True))
    with pytest.raises(ValueError, match="lsq=1 is invalid: allowed True or False"):
        QuantConfig(weights=IntFormat(4, True), lsq=1)
    with pytest.raises(ConfigError, match="quant.lsq=True is invalid: allowed false with "
                                          "quant.qat_start_epoch=1"):
        TrialConfig().with_overrides(["quant.mode=qat", "quant.lsq=true",
                                      "quant.qat_start_epoch=1", "train.epochs=3"])
