"""Number formats against independent oracles: torch's own observers and fake-quant ops,
x.to(dtype), float64 hand computations and scikit-learn's k-means; Hypothesis properties;
packing round trips; bad configs name the field."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

from quant import CodebookFormat, FloatFormat, IntFormat, LNSFormat, pack_bits, unpack_bits
from quant.packed import format_from_dict, format_to_dict

INT_FORMATS = [IntFormat(b, s, pc) for b in (2, 3, 4, 8, 12, 16) for s in (True, False)
               for pc in (False, True)]
ALL_FORMATS = [*INT_FORMATS, FloatFormat("fp16"), FloatFormat("bf16"), LNSFormat(4, 0),
               LNSFormat(4, 1, per_channel=True), LNSFormat(8, 3), CodebookFormat(2),
               CodebookFormat(4), CodebookFormat(16)]


def torch_fake_quant(fmt: IntFormat, x: torch.Tensor) -> torch.Tensor:
    """The oracle: torch's min-max observer, then torch's fake-quant op."""
    dtype = (torch.qint8 if fmt.symmetric else torch.quint8) if fmt.bits <= 8 else torch.qint32
    kwargs = dict(dtype=dtype, qscheme=fmt.qscheme, quant_min=fmt.quant_min,
                  quant_max=fmt.quant_max)
    if fmt.per_channel:
        observer = PerChannelMinMaxObserver(ch_axis=0, **kwargs)
        observer(x)
        scale, zp = observer.calculate_qparams()
        return torch.fake_quantize_per_channel_affine(x, scale, zp.int(), 0, fmt.quant_min,
                                                      fmt.quant_max)
    observer = MinMaxObserver(**kwargs)
    observer(x)
    scale, zp = observer.calculate_qparams()
    return torch.fake_quantize_per_tensor_affine(x, scale.item(), int(zp.item()),
                                                 fmt.quant_min, fmt.quant_max)


finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
tensors = st.tuples(st.integers(1, 6), st.integers(1, 7)).flatmap(
    lambda shape: st.lists(finite, min_size=shape[0] * shape[1], max_size=shape[0] * shape[1])
    .map(lambda v: torch.tensor(v, dtype=torch.float32).reshape(shape)))


@settings(max_examples=60, deadline=None)
@given(x=tensors, index=st.integers(0, len(INT_FORMATS) - 1))
def test_int_equals_torch_observer_and_fake_quant(x: torch.Tensor, index: int) -> None:
    fmt = INT_FORMATS[index]
    assert torch.equal(fmt.fake_quantize(x), torch_fake_quant(fmt, x))


@pytest.mark.parametrize("fmt", INT_FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("x", [torch.zeros(3, 4), torch.full((3, 4), -2.5), torch.tensor([[7.0]]),
                               torch.full((2, 3), 1e-30)], ids=["zeros", "constant", "single",
                                                                "tiny"])
def test_int_edge_tensors_equal_torch(fmt: IntFormat, x: torch.Tensor) -> None:
    assert torch.equal(fmt.fake_quantize(x), torch_fake_quant(fmt, x))


def test_int4_by_hand() -> None:
    # symmetric 4 bits: levels -8..7, scale = max|x| / 7.5 (torch's convention)
    # in float32, as torch's kernel: level = round_half_even(x * (1 / scale))
    values = np.array([-3.0, -1.1, 0.3, 1.5], dtype=np.float32)
    scale = np.float32(3.0) / np.float32(7.5)
    levels = np.clip(np.round(values * (np.float32(1) / scale)), -8, 7)
    assert levels.tolist() == [-8.0, -3.0, 1.0, 4.0]  # -7.5 exactly in float32: half to even
    x = torch.from_numpy(values)
    assert IntFormat(4).fake_quantize(x).tolist() == (levels * scale).tolist()
    assert IntFormat(4).quantize(x).codes.tolist() == [0, 5, 9, 12]  # level + 8


@settings(max_examples=40, deadline=None)
@given(x=tensors, index=st.integers(0, len(INT_FORMATS) - 1))
def test_int_error_is_half_a_step_inside_the_range(x: torch.Tensor, index: int) -> None:
    fmt = INT_FORMATS[index]
    scale, zp = fmt.qparams(x)
    q = fmt.fake_quantize(x, scale, zp)
    s = fmt._broadcast(scale, x).double()
    z = fmt._broadcast(zp, x).double()
    low, high = (fmt.quant_min - z) * s, (fmt.quant_max - z) * s
    inside = (x.double() >= low) & (x.double() <= high)
    err = (x.double() - q.double()).abs()
    # float32 rounding of x * (1 / s) and of the dequantized value
    tol = (s / 2) * (1 + 1e-5) + x.double().abs() * 2.0**-22 + 1e-30
    assert bool(((err <= tol) | ~inside).all())
    assert torch.equal(fmt.fake_quantize(q, scale, zp), q)  # idempotent with its params


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.name)
def test_fake_quantize_is_quantize_then_dequantize_and_codes_pack(fmt) -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 9) * 3
    enc = fmt.quantize(x)
    assert torch.equal(fmt.dequantize(enc), fmt.fake_quantize(x))
    assert enc.codes.min() >= 0 and enc.codes.max() < 2 ** enc.bits
    packed = pack_bits(enc.codes, enc.bits)
    assert len(packed) == math.ceil(x.numel() * enc.bits / 8)
    assert torch.equal(unpack_bits(packed, enc.bits, x.numel()).reshape(x.shape), enc.codes)
    assert format_from_dict(format_to_dict(fmt)) == fmt


@pytest.mark.parametrize("fmt", [FloatFormat("fp16"), FloatFormat("bf16"), LNSFormat(4, 0),
                                 LNSFormat(8, 3), CodebookFormat(4), CodebookFormat(16)],
                         ids=lambda f: f.name)
def test_idempotent(fmt) -> None:
    torch.manual_seed(1)
    q = fmt.fake_quantize(torch.randn(40, 5))
    assert torch.equal(fmt.fake_quantize(q), q)


def test_float_formats_equal_a_cast() -> None:
    x = torch.tensor([1.0 + 2**-11, 1.0 + 3 * 2**-11, 65520.0, 1e-8, -3.3, 0.0])
    assert torch.equal(FloatFormat("fp16").fake_quantize(x), x.to(torch.float16).float())
    assert torch.equal(FloatFormat("bf16").fake_quantize(x), x.to(torch.bfloat16).float())


@settings(max_examples=40, deadline=None)
@given(codes=st.lists(st.integers(0, 2**16 - 1), min_size=0, max_size=50),
       bits=st.integers(1, 16))
def test_bit_packing_round_trips(codes: list[int], bits: int) -> None:
    t = torch.tensor([c % (1 << bits) for c in codes], dtype=torch.int64)
    assert torch.equal(unpack_bits(pack_bits(t, bits), bits, len(t)), t)


def test_int4_packs_two_per_byte_low_nibble_first() -> None:
    assert pack_bits(torch.tensor([1, 2, 15]), 4) == bytes([0x21, 0x0F])


def test_codebook_is_optimal_and_beats_kmeans_plus_plus() -> None:
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(0)
    x = torch.tensor(rng.standard_t(4, size=3000), dtype=torch.float32)
    for k in (2, 4, 16):
        fmt = CodebookFormat(k)
        enc = fmt.quantize(x)
        q = fmt.dequantize(enc)
        assert set(q.tolist()) <= set(enc.params["codebook"].tolist())
        sse = (x.double() - q.double()).pow(2).sum().item()
        km = KMeans(k, init="k-means++", n_init=1, random_state=0).fit(
            x.double().numpy().reshape(-1, 1))
        assert sse <= km.inertia_ * (1 + 1e-6), (k, sse, km.inertia_)
    # Gaussian, k=2: the optimum is +-E|x| = +-sqrt(2/pi), error 1 - 2/pi (4.40 dB)
    g = torch.tensor(rng.standard_normal(200_000), dtype=torch.float32)
    q = CodebookFormat(2).fake_quantize(g)
    sqnr = 10 * math.log10(g.double().pow(2).sum() / (g.double() - q.double()).pow(2).sum())
    assert sqnr == pytest.approx(10 * math.log10(1 / (1 - 2 / math.pi)), abs=0.05)


def test_lossy_formats_keep_a_signal_to_noise_floor() -> None:
    g = torch.randn(20_000, generator=torch.Generator().manual_seed(0))

    def sqnr(fmt) -> float:
        q = fmt.fake_quantize(g)
        return 10 * math.log10(g.pow(2).sum() / (g - q).pow(2).sum())

    # Uniform quantizers gain ~6 dB per bit; the floors leave room for the clip to max|x|.
    assert sqnr(IntFormat(8)) > 38 and sqnr(IntFormat(4)) > 14 and sqnr(IntFormat(16)) > 85
    assert sqnr(LNSFormat(8, 3)) > 28 and sqnr(CodebookFormat(16)) > 19


def test_nan_passes_through_fake_quant_and_cannot_be_encoded() -> None:
    x = torch.tensor([1.0, float("nan"), -2.0])
    assert torch.isnan(IntFormat(8).fake_quantize(x, torch.tensor(0.1),
                                                  torch.tensor(0)))[1]
    for fmt in (IntFormat(8), LNSFormat(4, 0), CodebookFormat(4)):
        with pytest.raises(ValueError, match="NaN"):
            fmt.quantize(x)


@pytest.mark.parametrize("make, match", [
    (lambda: IntFormat(bits=0), "bits=0 is invalid: allowed an integer in 2..16"),
    (lambda: IntFormat(bits=17), "bits=17 is invalid"),
    (lambda: IntFormat(bits=4, symmetric="yes"), "symmetric='yes' is invalid"),
    (lambda: CodebookFormat(k=1), "k=1 is invalid: allowed an integer in 2..256"),
    (lambda: CodebookFormat(k=257), "k=257"),
    (lambda: FloatFormat("fp8"), "kind='fp8' is invalid: allowed one of fp16, bf16"),
    (lambda: LNSFormat(bits=17), "bits=17"),
    (lambda: LNSFormat(4, 0, per_channel="yes"), "per_channel='yes' is invalid: allowed true"),
    (lambda: format_from_dict({"type": "posit", "bits": 8}), "type='posit' is invalid"),
])
def test_bad_formats_name_the_field(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()
