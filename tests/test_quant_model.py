"""Model transforms and packed artifacts: QAT's straight-through estimator, convert equals
PTQ, disabled fake-quant equals FP32, per-layer formats, and save -> load bit for bit with
the compression ratios on LeNet-5."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import optim
from quant import (
    CodebookFormat,
    FloatFormat,
    IntFormat,
    LNSFormat,
    QuantConfig,
    convert_,
    load_packed,
    prepare_qat_,
    quantize_,
    quantized_layers,
    save_packed,
    state_dict_bytes,
)
from trainables.config import ModelConfig
from trainables.models import build_model

LENET5 = ModelConfig(name="lenet", channels=(6, 16), hidden=(120, 84), kernel_size=5)
MODELS = {"mlp": (ModelConfig(name="mlp", widths=(64, 32)), 1, 28),
          "lenet5": (LENET5, 1, 28),
          "resnet20": (ModelConfig(name="resnet20"), 3, 32)}


def make(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    cfg, channels, size = MODELS[name]
    torch.manual_seed(seed)
    model = build_model(cfg, channels, size, 10).eval()
    return model, torch.randn(6, channels, size, size, generator=torch.Generator().manual_seed(1))


def test_qat_forward_equals_the_ptq_model_and_convert_equals_ptq() -> None:
    cfg = QuantConfig(weights=IntFormat(4, True, True))
    qat, x = make("lenet5")
    ptq = copy.deepcopy(qat)
    quantize_(ptq, cfg)
    prepare_qat_(qat, cfg)
    with torch.no_grad():
        assert torch.equal(qat(x), ptq(x))
    convert_(qat)
    assert not any(parametrize.is_parametrized(m) for m in qat.modules())
    for (name, a), (_, b) in zip(qat.state_dict().items(), ptq.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("fmt", [IntFormat(4, True, True), LNSFormat(8)])
def test_a_channels_last_model_keeps_its_layout_and_values_when_quantized(fmt) -> None:
    """quantize_ of a channels-last model gives channels-last weights (a conv model run
    with NCHW weights on channels-last inputs takes the slow conv and pool kernels), with
    the very values the NCHW model's quantization gives."""
    nchw, x = make("lenet5")
    last = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    quantize_(nchw, QuantConfig(weights=fmt))
    quantize_(last, QuantConfig(weights=fmt))
    for (name, a), (_, b) in zip(nchw.named_parameters(), last.named_parameters(),
                                 strict=True):
        assert torch.equal(a, b), name
        if b.dim() == 4:  # the strides, also where one channel makes both layouts dense
            assert b.stride() == b.contiguous(memory_format=torch.channels_last).stride()
            assert a.stride() == a.contiguous().stride(), name  # an NCHW model stays NCHW
    with torch.no_grad():
        out = last(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(out, nchw(x), rtol=1e-5, atol=1e-5)


def test_disabled_fake_quant_equals_fp32_forward_and_backward() -> None:
    fp32, x = make("lenet5")
    qat = copy.deepcopy(fp32)
    prepare_qat_(qat, QuantConfig(weights=IntFormat(2)))
    for m in qat.modules():
        if parametrize.is_parametrized(m, "weight"):
            m.parametrizations["weight"][0].enabled = False
    fp32(x).square().sum().backward()
    qat(x).square().sum().backward()
    assert torch.equal(fp32(x), qat(x))
    conv_fp32, conv_qat = fp32.features[0], qat.features[0]
    assert torch.equal(conv_fp32.weight.grad, conv_qat.parametrizations["weight"].original.grad)


def test_straight_through_gradient_is_the_gradient_at_the_quantized_weight() -> None:
    lin = nn.Linear(5, 3)
    fmt = LNSFormat(4, 0)
    x = torch.randn(8, 5)
    w_q = fmt.fake_quantize(lin.weight.detach()).requires_grad_(True)
    (x @ w_q.T + lin.bias).pow(2).sum().backward()  # the oracle: plain autograd at w_q
    prepare_qat_(lin, QuantConfig(weights=fmt), filter_fn=lambda m, n: True)
    lin(x).pow(2).sum().backward()
    assert torch.allclose(lin.parametrizations["weight"].original.grad, w_q.grad)


def test_overrides_give_mixed_precision_and_none_keeps_float() -> None:
    model, _ = make("lenet5")
    first = "features.0"
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    cfg = QuantConfig(weights=IntFormat(4), overrides=((first, IntFormat(8)), (last, None)))
    quantize_(model, cfg)
    layers = quantized_layers(model)
    assert layers[first] == IntFormat(8) and last not in layers
    assert all(f == IntFormat(4) for n, f in layers.items() if n != first)
    assert len(torch.unique(model.features[0].weight)) > 16  # 8 bits: many levels
    with pytest.raises(ValueError, match=r"overrides\[0\]"):
        QuantConfig(weights=IntFormat(4), overrides=(("x", "int8"),))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("fmt", [IntFormat(8), IntFormat(4, True, True), IntFormat(4, False),
                                 LNSFormat(4, 0), LNSFormat(8, 3), LNSFormat(4, 0, True),
                                 CodebookFormat(2), CodebookFormat(16), FloatFormat("bf16")],
                         ids=lambda f: f.name)
def test_packed_model_restores_bit_for_bit(tmp_path: Path, name: str, fmt) -> None:
    model, x = make(name)
    quantize_(model, QuantConfig(weights=fmt, overrides=(("fc*", IntFormat(8)),)))
    path = tmp_path / "m.qsw"
    size = save_packed(model, path)
    assert size == path.stat().st_size
    restored, _ = make(name, seed=5)  # other random weights: everything must come from the file
    load_packed(path, restored)
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))
    assert save_packed(restored, tmp_path / "again.qsw") == size  # saves again unchanged
    assert (tmp_path / "again.qsw").read_bytes() == path.read_bytes()


@pytest.mark.parametrize("fmt, goal", [(IntFormat(8), 3.9), (IntFormat(4, True, True), 7.5),
                                       (LNSFormat(4, 0), 7.5), (CodebookFormat(2), 25.0)],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_lenet5_compression_ratio_goals(tmp_path: Path, fmt, goal: float) -> None:
    model, _ = make("lenet5")
    fp32 = state_dict_bytes(model, tmp_path / "fp32.pt")
    quantize_(model, QuantConfig(weights=fmt))
    assert fp32 / save_packed(model, tmp_path / "m.qsw") >= goal


def test_a_weight_changed_after_convert_is_not_saved_silently(tmp_path: Path) -> None:
    model, _ = make("mlp")
    quantize_(model, QuantConfig(weights=IntFormat(4)))
    with torch.no_grad():
        model.net[1].weight.add_(0.01)
    with pytest.raises(ValueError, match="changed after convert_"):
        save_packed(model, tmp_path / "m.qsw")
    (tmp_path / "junk").write_bytes(b"nope")
    with pytest.raises(ValueError, match="not a qsweep packed model"):
        load_packed(tmp_path / "junk", model)


@pytest.mark.parametrize("name", ["sgd", "eg", "madam", "lns_madam"])
def test_optimizers_train_through_the_fake_quant(name: str) -> None:
    model, x = make("mlp")
    model.train()
    prepare_qat_(model, QuantConfig(weights=IntFormat(4, True, True)))
    y = torch.arange(6) % 10
    lr = {"sgd": 0.05, "eg": 0.5, "madam": 0.05, "lns_madam": 0.125}[name]
    opt = optim.build_for_model(name, model, bias_lr=0.05 if optim.needs_bias_group(name)
                                else None, lr=lr)
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_converting_a_copy_leaves_the_qat_model_training() -> None:
    # torch's remove_parametrizations would delete the weight property from the class
    # that a deepcopy shares with the original: the original then has no weight at all.
    qat, x = make("lenet5")
    prepare_qat_(qat, QuantConfig(weights=IntFormat(4)))
    before = qat(x)
    converted = convert_(copy.deepcopy(qat))
    assert torch.equal(converted(x), before) and torch.equal(qat(x), before)
    assert parametrize.is_parametrized(qat.features[0], "weight")


def test_damaged_packed_files_are_refused_by_name(tmp_path: Path) -> None:
    model, _ = make("mlp")
    quantize_(model, QuantConfig(weights=IntFormat(4)))
    good = tmp_path / "m.qsw"
    save_packed(model, good)
    raw = good.read_bytes()
    fresh = make("mlp")[0]
    (tmp_path / "cut.qsw").write_bytes(raw[:-10])
    (tmp_path / "long.qsw").write_bytes(raw + b"\0")
    (tmp_path / "head.qsw").write_bytes(raw[:12])
    bits = raw.replace(b'"bits":4', b'"bits":2', 1)
    (tmp_path / "bits.qsw").write_bytes(bits)
    for name, match in (("cut", "outside"), ("long", "beyond"), ("head", "damaged"),
                        ("bits", "4-bit codes for a 2-bit format")):
        with pytest.raises(ValueError, match=match):
            load_packed(tmp_path / f"{name}.qsw", fresh)


def test_tied_weights_and_unconverted_models_are_refused(tmp_path: Path) -> None:
    shared = nn.Linear(4, 4)
    tied = nn.Sequential(shared, nn.ReLU(), nn.Linear(4, 4))
    tied[2].weight = shared.weight
    with pytest.raises(ValueError, match="2.weight is tied to 0.weight"):
        prepare_qat_(tied, QuantConfig(weights=IntFormat(4)))
    model, _ = make("mlp")
    prepare_qat_(model, QuantConfig(weights=IntFormat(4)))
    with pytest.raises(ValueError, match="convert_"):
        save_packed(model, tmp_path / "m.qsw")


def test_lns_codes_decode_to_the_fake_quantized_values() -> None:
    x = torch.tensor([0.0, 1e-9, 0.3, -0.7, 1.0])
    for scale, underflow in ((0.3, "zero"), (None, "clamp"), (2.0, "clamp")):
        fmt = LNSFormat(4, 0)
        enc = fmt.quantize(x, scale, underflow)
        assert torch.equal(fmt.dequantize(enc), fmt.fake_quantize(x, scale, underflow))
