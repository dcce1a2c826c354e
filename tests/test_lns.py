"""The LNS format that quant/ and LNS-Madam share: hand-computed grids and properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from quant import LNSFormat


def test_lns4_grid_by_hand():
    fmt = LNSFormat(bits=4, frac_bits=0)  # sign + 3-bit exponent: 7 magnitudes and zero
    assert (fmt.levels, fmt.gamma, fmt.zero_code) == (7, 1, 7)
    assert fmt.magnitudes(2.0).tolist() == [2.0, 1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125]
    x = torch.tensor([2.0, -1.3, 0.7, 0.36, 0.02, 0.01, 0.0, -5.0], dtype=torch.float64)
    # Codes are round(-log2(|x| / 2)): 1.3 -> 0.62 -> 1 (1.0); 0.7 -> 1.51 -> 2 (0.5);
    # 0.36 -> 2.47 -> 2 (0.5); 0.02 -> 6.64, past the last code 6 but above half of it
    # (0.0156 / 2) -> 0.03125; 0.01 is below that half -> 0; -5 clips to -2.
    q = fmt.fake_quantize(x, scale=2.0)
    assert q.tolist() == [2.0, -1.0, 0.5, 0.5, 0.03125, 0.0, 0.0, -2.0]


def test_frac_bits_put_gamma_codes_per_octave():
    fmt = LNSFormat(bits=8, frac_bits=2)
    mags = fmt.magnitudes(1.0)
    assert mags[:5].tolist() == pytest.approx([1, 2**-0.25, 2**-0.5, 2**-0.75, 0.5])
    assert fmt.levels == 127 and mags[-1].item() == pytest.approx(2 ** (-126 / 4))


def test_underflow_modes():
    fmt = LNSFormat(bits=3, frac_bits=0)  # magnitudes 1, 1/2, 1/4 and zero
    x = torch.tensor([0.1, 0.2, -0.01, 0.0])
    assert fmt.fake_quantize(x, 1.0, underflow="zero").tolist() == [0.0, 0.25, 0.0, 0.0]
    assert fmt.fake_quantize(x, 1.0, underflow="clamp").tolist() == [0.25, 0.25, -0.25, 0.0]
    with pytest.raises(ValueError, match="underflow='up' is invalid: allowed one of zero"):
        fmt.encode(x, 1.0, underflow="up")


@pytest.mark.parametrize("kwargs,match", [(dict(bits=1), "bits=1 is invalid"),
                                          (dict(bits=17), "bits=17"),
                                          (dict(frac_bits=-1), "frac_bits=-1"),
                                          (dict(bits=4.0), "bits=4.0")])
def test_bad_formats_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LNSFormat(**kwargs)


formats = st.builds(LNSFormat, bits=st.integers(2, 12), frac_bits=st.integers(0, 5))
values = st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=64)


@settings(max_examples=200, deadline=None)
@given(formats, values)
def test_quantize_is_on_grid_idempotent_and_within_half_a_log_step(fmt, xs):
    x = torch.tensor(xs, dtype=torch.float64)
    scale = x.abs().max().clamp_min(1e-30)
    q = fmt.fake_quantize(x, scale)
    grid = set(fmt.magnitudes(scale.item()).tolist()) | {0.0}
    assert all(abs(v) in grid for v in q.tolist())
    assert torch.equal(fmt.fake_quantize(q, scale), q)
    assert torch.all(torch.sign(q) * torch.sign(x) >= 0)
    smallest = fmt.magnitudes(scale.item())[-1].item()
    inside = (x.abs() >= smallest) & (q != 0)
    ratio = (q[inside] / x[inside]).abs().log2().abs()
    assert torch.all(ratio <= 0.5 / fmt.gamma + 1e-12)  # nearest code in log2 units


def test_encode_decode_round_trip_every_code():
    fmt = LNSFormat(bits=6, frac_bits=2)
    code = torch.arange(fmt.levels + 1, dtype=torch.int32)
    sign = torch.ones_like(code, dtype=torch.int8)
    x = fmt.decode(sign, code, 3.0, dtype=torch.float64)
    s2, c2 = fmt.encode(x, 3.0)
    assert torch.equal(c2, code) and torch.equal(s2[:-1], sign[:-1]) and s2[-1] == 0
    assert x[-1] == 0 and x[0] == 3.0 and math.isclose(x[4].item(), 1.5)


def test_non_finite_values_pass_through():
    fmt = LNSFormat(bits=4, frac_bits=0)
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5])
    q = fmt.fake_quantize(x, 1.0)
    assert torch.isnan(q[0]) and q[1] == float("inf") and q[2] == -float("inf") and q[3] == 0.5
    assert torch.isnan(fmt.fake_quantize(torch.tensor([float("nan"), 1.0]))).all()  # NaN scale


dtypes = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])
specials = st.sampled_from([0.0, -0.0, 1e-40, -3e-39, 1.0, float("nan"), float("inf"),
                            -float("inf")])


@settings(max_examples=300, deadline=None)
@given(formats, st.lists(st.one_of(st.floats(-1e3, 1e3, width=32), specials), min_size=1,
                         max_size=40),
       dtypes, st.sampled_from(["zero", "clamp"]), st.sampled_from([None, 0.5, 1e-3]))
def test_fake_quantize_equals_decode_of_encode_bit_for_bit(fmt, xs, dtype, underflow, scale):
    """fake_quantize has its own (fewer-pass) path: the oracle is encode -> decode, with
    non-finite values passed through, compared as bits (-0.0 vs +0.0 included)."""
    x = torch.tensor(xs, dtype=torch.float32).to(dtype)
    used = fmt.default_scale(x) if scale is None else scale
    # An inf or NaN max |x| scales nothing meaningfully (decode's 0 * inf is NaN): there
    # only the non-finite values are specified, and test_non_finite_values_pass_through
    # checks them.
    assume(bool(torch.isfinite(torch.as_tensor(used))))
    sign, code = fmt.encode(x, used, underflow)
    expected = torch.where(torch.isfinite(x), fmt.decode(sign, code, used, dtype=dtype), x)
    got = fmt.fake_quantize(x, scale, underflow)
    assert got.dtype == dtype and got.shape == x.shape
    as_bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    assert torch.equal(got.view(as_bits), expected.view(as_bits)), (x, got, expected)


def test_a_zero_dim_tensor_leaves_the_shared_grid_alone():
    """Before: decode indexed the cached grid with a 0-dim code, which returns a view, and
    scaled it in place: every later decode in the process used a corrupted grid (2.5 then
    rounded to 6.25)."""
    fmt = LNSFormat(bits=4, frac_bits=0)
    grid = fmt.unit_magnitudes()
    assert fmt.fake_quantize(torch.tensor(2.5)).item() == 2.5
    assert fmt.fake_quantize(torch.tensor(2.5), underflow="clamp").item() == 2.5
    assert fmt.decode(torch.tensor(1, dtype=torch.int8), torch.tensor(0), 2.5).item() == 2.5
    assert torch.equal(fmt.unit_magnitudes(), grid)


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 3, 3), (7,)])
@pytest.mark.parametrize("bits, frac_bits", [(4, 0), (8, 3)])
def test_per_channel_is_per_tensor_on_each_output_channel(shape, bits, frac_bits):
    """The oracle: the per-tensor format applied to each row (axis 0) with its own max."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[0]).reshape(
        -1, *([1] * (len(shape) - 1)))
    x[1] = 0.0  # an all-zero channel
    fmt, tensor_fmt = LNSFormat(bits, frac_bits, per_channel=True), LNSFormat(bits, frac_bits)
    expected = torch.stack([tensor_fmt.fake_quantize(row) for row in x])
    assert torch.equal(fmt.fake_quantize(x), expected)
    enc = fmt.quantize(x)
    assert enc.params["scale"].shape == (shape[0],)
    assert torch.equal(enc.params["scale"], x.abs().reshape(shape[0], -1).amax(1).clamp_min(
        torch.finfo(torch.float32).tiny))
    assert torch.equal(fmt.dequantize(enc), expected)
    # Small channels use the whole grid: better SQNR than one scale for the tensor.
    def sqnr(q):
        return float(10 * torch.log10(x.pow(2).sum() / (x - q).pow(2).sum()))
    if len(shape) > 1:
        assert sqnr(expected) > sqnr(tensor_fmt.fake_quantize(x))
    assert fmt.name == f"lns{bits}" + (f"f{frac_bits}" if frac_bits else "") + "-pc"


def test_per_channel_with_an_explicit_scale_per_channel_and_bf16():
    fmt = LNSFormat(4, 0, per_channel=True)
    x = torch.tensor([[0.3, -0.6, 0.05], [4.0, 1.0, -3.0]], dtype=torch.bfloat16)
    scale = torch.tensor([1.0, 4.0])  # given, not the max: row 0 clips at 1
    # By hand: row 0 / 1 -> 0.3 -> 2^-2 (log2 -1.74), 0.6 -> 2^-1, 0.05 -> 2^-4 (-4.32);
    # row 1 / 4 -> 1, 1/4, 3/4 -> 2^-0 (log2 -0.415) -> 4, 1, -4.
    expected = torch.tensor([[0.25, -0.5, 0.0625], [4.0, 1.0, -4.0]], dtype=torch.bfloat16)
    assert torch.equal(fmt.fake_quantize(x, scale), expected)
    sign, code = fmt.encode(x, scale)
    assert torch.equal(fmt.decode(sign, code, scale, dtype=torch.bfloat16), expected)


def test_all_finite_agrees_with_the_elementwise_check():
    from quant.codes import all_finite

    big = torch.full((4,), 3e38)  # the sum overflows, every element is finite
    cases = [torch.zeros(0), torch.ones(3), big, torch.tensor([1.0, float("nan")]),
             torch.tensor([float("inf"), -float("inf")]), big.half(), torch.tensor(2.0)]
    for x in cases:
        assert all_finite(x) == bool(torch.isfinite(x).all()), x
