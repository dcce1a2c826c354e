"""Activation quantization: observers equal torch's, evaluation never moves a range,
calibrated PTQ packs and restores bit for bit, and QAT with activations resumes exactly
(the observed range is in the checkpoint)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from torch import nn
from torch.ao.quantization.observer import MinMaxObserver, MovingAverageMinMaxObserver

from quant import (
    ActivationQuant,
    IntFormat,
    QuantConfig,
    input_quantizers,
    load_packed,
    quantize_,
    save_packed,
)
from trainables.config import ConfigError, TrialConfig
from trainables.loop import run_trial
from trainables.sessions import LocalSession

FMT = IntFormat(bits=8, symmetric=False)
BATCHES = [torch.randn(32, 7) * s + s for s in (1.0, 3.0, 0.5, 2.0)]


@pytest.mark.parametrize("observer, torch_observer", [
    ("minmax", MinMaxObserver), ("moving_average", MovingAverageMinMaxObserver)])
def test_observers_equal_torch(observer: str, torch_observer) -> None:
    ours = ActivationQuant(FMT, observer)
    theirs = torch_observer(dtype=torch.quint8, qscheme=torch.per_tensor_affine,
                            quant_min=0, quant_max=255)
    ours.train()
    for x in BATCHES:
        out = ours(x)
        theirs(x)
        scale, zp = theirs.calculate_qparams()
        assert torch.equal(ours.qparams()[0].reshape(1), scale)
        assert torch.equal(ours.qparams()[1].reshape(1), zp.long())
        assert torch.equal(out, torch.fake_quantize_per_tensor_affine(
            x, scale.item(), int(zp.item()), 0, 255))


def test_evaluation_never_moves_the_range_and_the_gradient_passes_straight() -> None:
    act = ActivationQuant(FMT, "minmax")
    act.train()
    act(BATCHES[0])
    low, high = act.low.clone(), act.high.clone()
    act.eval()
    act(BATCHES[1] * 100)
    assert torch.equal(act.low, low) and torch.equal(act.high, high)
    x = BATCHES[0].clone().requires_grad_(True)
    act(x).sum().backward()
    scale, zp = act.qparams()
    x2 = BATCHES[0].clone().requires_grad_(True)
    torch.fake_quantize_per_tensor_affine(x2, scale.item(), int(zp), 0, 255).sum().backward()
    assert torch.equal(x.grad, x2.grad) and x.grad.mean() > 0.95  # straight through


def test_percentile_and_mse_ignore_an_outlier() -> None:
    x = torch.randn(10_000)
    x[0] = 1000.0
    ranges = {}
    for observer in ("minmax", "percentile", "mse"):
        act = ActivationQuant(FMT, observer).train()
        act(x)
        ranges[observer] = act.high.item()
    assert ranges["minmax"] == 1000.0
    assert ranges["percentile"] < 10 and ranges["mse"] <= ranges["minmax"]


def test_mse_observer_lowers_the_error_of_a_heavy_tailed_input() -> None:
    x = torch.distributions.Laplace(0.0, 1.0).sample((20_000,))
    fmt = IntFormat(bits=4, symmetric=True)
    errors = {}
    for observer in ("minmax", "mse"):
        act = ActivationQuant(fmt, observer).train()
        errors[observer] = (act(x) - x).pow(2).mean().item()
    assert errors["mse"] < 0.8 * errors["minmax"]


def test_calibrated_ptq_packs_and_restores_bit_for_bit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    cfg = QuantConfig(weights=IntFormat(4, True, True), activations=FMT)
    with pytest.raises(ValueError, match="calibration"):
        quantize_(copy.deepcopy(model), cfg)
    quantize_(model, cfg, calibration=BATCHES)
    assert len(input_quantizers(model)) == 2
    save_packed(model, tmp_path / "m.qsw")
    restored = nn.Sequential(nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    load_packed(tmp_path / "m.qsw", restored)
    x = torch.randn(5, 7) * 4
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))
        float_out = nn.Sequential(*[copy.deepcopy(m) for m in model])
        for m in float_out:
            if hasattr(m, "input_quant"):
                m.input_quant.enabled = False
        assert not torch.equal(float_out(x), model(x))  # the inputs really are quantized


def tiny(root: Path, *overrides: str) -> TrialConfig:
    return tiny_config(root, *overrides)


def test_qat_with_activations_resumes_exactly(tiny_root: Path, tmp_path: Path) -> None:
    cfg = tiny(tiny_root, "quant.mode=qat", "quant.bits=4", "quant.activation_bits=4")
    full = run_trial(cfg, LocalSession())
    crashed = LocalSession(checkpoint_dir=tmp_path / "ckpt", stop_after=1)
    with pytest.raises(InterruptedError):
        run_trial(cfg, crashed)
    resumed = run_trial(cfg, LocalSession(resume_from=tmp_path / "ckpt"))
    def keep(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in m.items() if "seconds" not in k and "per_s" not in k}
                for m in history]

    assert keep(resumed) == keep(full)
    assert full[-1]["test_acc_q"] == full[-1]["test_acc"]  # convert == the QAT forward


def test_ptq_with_activations_in_a_trial(tiny_root: Path) -> None:
    final = run_trial(tiny(tiny_root, "quant.mode=ptq", "quant.bits=8",
                           "quant.activation_bits=8", "quant.observer=percentile",
                           "train.epochs=1"), LocalSession())[-1]
    assert abs(final["test_acc_q"] - final["test_acc"]) < 0.1


def test_bad_activation_fields_name_the_field() -> None:
    with pytest.raises(ConfigError, match="quant.activation_bits.*2..16"):
        TrialConfig().with_overrides(["quant.activation_bits=1"])
    with pytest.raises(ConfigError, match="quant.observer.*percentile"):
        TrialConfig().with_overrides(["quant.observer=histogram"])
    with pytest.raises(ValueError, match="per-tensor IntFormat"):
        ActivationQuant(IntFormat(8, per_channel=True))


def test_clipped_inputs_get_no_gradient_as_in_torch() -> None:
    act = ActivationQuant(FMT, "minmax").train()
    act(torch.tensor([0.0, 1.0]))  # range 0..1
    act.observing = False
    x = torch.tensor([-0.5, 0.5, 2.0], requires_grad=True)
    act(x).sum().backward()
    # torch's own fake-quant backward masks the same elements
    scale, zp = act.qparams()
    x2 = x.detach().clone().requires_grad_(True)
    torch.fake_quantize_per_tensor_affine(x2, scale.item(), int(zp), 0, 255).sum().backward()
    assert torch.equal(x.grad, x2.grad) and x.grad.tolist() == [0.0, 1.0, 0.0]
