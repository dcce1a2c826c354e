"""The logarithmic number system (LNS) format, shared by quantization and LNS-Madam.

A value is a sign and an unsigned integer exponent code ``e`` on a base-2 grid with
``frac_bits`` fractional bits (``gamma = 2**frac_bits`` codes per octave)::

    x = sign * scale * 2 ** (-e / gamma),   e in {0, ..., levels - 1}

``bits`` counts the sign bit, so the exponent has ``bits - 1`` bits; its all-ones code
(``e == levels``) means zero. ``scale`` is the largest magnitude, per tensor or, with
``per_channel``, per output channel (axis 0, as IntFormat): a channel of small weights
then uses the whole grid instead of its bottom codes. Rounding is
to the nearest code in the log domain (nearest in relative error); a magnitude below the
smallest level either becomes zero (``underflow="zero"``, when it is closer to 0 than to
the smallest level) or stays at the smallest level (``underflow="clamp"``, what a
multiplicative optimizer needs: a weight at zero could never move again).

Example::

    fmt = LNSFormat(bits=4, frac_bits=0)   # sign + 3-bit exponent: 1, 1/2, ..., 1/64, 0
    q = fmt.fake_quantize(torch.randn(100))  # every |q| / max|x| is a power of two or 0
    enc = fmt.quantize(w)                    # codes: sign bit + exponent, and the scale
    LNSFormat(4, 0, per_channel=True).quantize(w).params["scale"]   # max |w| per row
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from quant.codes import Encoded

__all__ = ["LNSFormat", "UNDERFLOWS"]

UNDERFLOWS = ("zero", "clamp")


@dataclass(frozen=True)
class LNSFormat:
    """Sign + ``bits - 1``-bit exponent code with ``frac_bits`` fractional bits."""

    bits: int = 8
    frac_bits: int = 3
    per_channel: bool = False  # default_scale: one scale per output channel (axis 0)

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ValueError(f"bits={self.bits!r} is invalid: allowed an integer in 2..16")
        if not isinstance(self.frac_bits, int) or not 0 <= self.frac_bits <= 10:
            raise ValueError(f"frac_bits={self.frac_bits!r} is invalid: allowed an integer "
                             "in 0..10")
        if not isinstance(self.per_channel, bool):
            raise ValueError(f"per_channel={self.per_channel!r} is invalid: allowed true or "
                             "false")

    @property
    def gamma(self) -> int:
        """Exponent codes per factor of two."""
        return 1 << self.frac_bits

    @property
    def levels(self) -> int:
        """Number of nonzero magnitudes; code ``levels`` is zero."""
        return (1 << (self.bits - 1)) - 1

    @property
    def zero_code(self) -> int:
        return self.levels

    def unit_magnitudes(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``2**(-e / gamma)`` for every code, zero for the zero code (float64, a copy).
        Decoding looks values up in this table: a vectorized exp2 can differ in the last
        bit between tensor lengths, and grid values must be the same numbers everywhere."""
        return _unit_table(self.bits, self.frac_bits, str(device)).clone()

    def magnitudes(self, scale: float = 1.0) -> torch.Tensor:
        """All nonzero magnitudes of the grid, largest first (float64)."""
        return scale * _unit_table(self.bits, self.frac_bits, "cpu")[: self.levels]

    def encode(self, x: torch.Tensor, scale: torch.Tensor | float,
               underflow: str = "zero") -> tuple[torch.Tensor, torch.Tensor]:
        """(sign in {-1, 0, 1} as int8, exponent code as int32) of ``x``; ``scale`` > 0."""
        if underflow not in UNDERFLOWS:
            raise ValueError(f"underflow={underflow!r} is invalid: allowed one of "
                             f"{', '.join(UNDERFLOWS)}")
        scale = _broadcast(torch.as_tensor(scale, dtype=torch.float64, device=x.device), x)
        # In place after the first copy: QAT encodes every weight at every step, and each
        # float64 temporary cost as much as the arithmetic (LNS-4 QAT of LeNet: 1.31x FP32).
        ratio = x.detach().to(torch.float64, copy=True).abs_().div_(scale)
        # Nearest code in the log domain, round(-log2(ratio) * gamma) (negating the factor
        # instead of the log is exact); ratio 0 gives +inf, clamped below.
        code = torch.log2(ratio).mul_(-self.gamma).round_()
        # NaN (from a NaN input or scale) gets a valid code; fake_quantize() passes it on.
        code = code.nan_to_num_(nan=float(self.levels - 1)).clamp_(0, self.levels - 1)
        sign = torch.sign(x.detach()).to(torch.int8)
        if underflow == "zero":
            smallest = 2.0 ** (-(self.levels - 1) / self.gamma)
            is_zero = (ratio < smallest / 2) | (sign == 0)
            code.masked_fill_(is_zero, self.zero_code)
            sign = sign.masked_fill_(is_zero, 0)
        return sign, code.to(torch.int32)

    def decode(self, sign: torch.Tensor, code: torch.Tensor, scale: torch.Tensor | float,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The values that (sign, code) encode, in ``dtype``."""
        scale = _broadcast(torch.as_tensor(scale, dtype=torch.float64, device=code.device),
                           code)
        if code.dtype not in (torch.int32, torch.int64):
            code = code.long()
        # index_select of the flat codes: 4x faster than table[code] on this CPU.
        table = _unit_table(self.bits, self.frac_bits, str(code.device))
        magnitude = table.index_select(0, code.reshape(-1)).view(code.shape)
        return magnitude.mul_(scale).mul_(sign).to(dtype)  # in place: see encode()

    @property
    def name(self) -> str:
        return (f"lns{self.bits}" + (f"f{self.frac_bits}" if self.frac_bits else "") +
                ("-pc" if self.per_channel else ""))

    def default_scale(self, x: torch.Tensor) -> torch.Tensor:
        """max |x| (float32), so nothing clips; tiny for an all-zero tensor (or channel).
        Per channel: one per index of axis 0 (a 0-dim tensor has one)."""
        magnitude = x.detach().abs()
        if self.per_channel and x.dim() > 0:
            top = magnitude.reshape(x.shape[0], -1).amax(1)
        else:
            top = magnitude.max()
        return top.float().clamp_min(torch.finfo(torch.float32).tiny)

    def fake_quantize(self, x: torch.Tensor, scale: torch.Tensor | float | None = None,
                      underflow: str = "zero") -> torch.Tensor:
        """Round ``x`` onto the grid (``scale`` default: max |x|, so nothing clips).
        Equal to ``decode(*encode(x))`` bit for bit wherever the scale is finite, in
        about half the passes over ``x`` (QAT runs it on every weight at every step): no
        sign and code tensors. NaN and inf in ``x`` stay what they were."""
        if underflow not in UNDERFLOWS:
            raise ValueError(f"underflow={underflow!r} is invalid: allowed one of "
                             f"{', '.join(UNDERFLOWS)}")
        own_scale = scale is None
        scale = _broadcast(torch.as_tensor(self.default_scale(x) if own_scale else scale,
                                           dtype=torch.float64, device=x.device), x)
        ratio = x.detach().to(torch.float64, copy=True).abs_().div_(scale)
        code = torch.log2(ratio).mul_(-self.gamma).round_()  # as encode()
        code = code.nan_to_num_(nan=float(self.levels - 1)).clamp_(0, self.levels - 1)
        table = _unit_table(self.bits, self.frac_bits, str(x.device))
        q = table.index_select(0, code.to(torch.int32).reshape(-1)).view(x.shape)
        q = q.mul_(scale).mul_(torch.sign(x.detach()))
        # Exact zeros (and, with underflow "zero", what is nearer 0 than the smallest
        # level) are +0.0, as decode() makes them.
        if underflow == "zero":
            zero = ratio < 2.0 ** (-(self.levels - 1) / self.gamma) / 2
        else:
            zero = ratio == 0
        q = q.masked_fill_(zero, 0.0).to(x.dtype)
        if own_scale and bool(torch.isfinite(scale).all()):
            return q  # max |x| is finite (max propagates NaN): x holds no inf or NaN
        return torch.where(torch.isfinite(x), q, x)  # NaN and inf stay what they were

    def quantize(self, x: torch.Tensor, scale: torch.Tensor | float | None = None,
                 underflow: str = "zero") -> Encoded:
        """Codes ``sign_bit << (bits - 1) | exponent`` (the zero code for 0) and the scale;
        decoding gives exactly :meth:`fake_quantize`. Non-finite values raise."""
        if not torch.isfinite(x).all():
            raise ValueError("cannot encode NaN or inf in an LNS format")
        if scale is None:
            scale = self.default_scale(x)
        elif not isinstance(scale, torch.Tensor):  # as encode() reads it: float64
            scale = torch.tensor(float(scale), dtype=torch.float64)
        sign, code = self.encode(x, scale, underflow)
        code = torch.where(sign == 0, self.zero_code, code.to(torch.int64))  # exact zeros
        codes = code | ((sign < 0).to(torch.int64) << (self.bits - 1))
        # One scale per channel (shape (C,)) or per tensor (0-dim).
        return Encoded(codes, self.bits,
                       {"scale": scale.reshape(-1) if scale.dim() else scale.reshape(())})

    def dequantize(self, enc: Encoded, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        code = enc.codes & ((1 << (self.bits - 1)) - 1)
        negative = (enc.codes >> (self.bits - 1)) & 1
        sign = torch.where(code == self.zero_code, 0, 1 - 2 * negative).to(torch.int8)
        return self.decode(sign, code, enc.params["scale"], dtype=dtype)

    def on_grid(self, x: torch.Tensor, scale: torch.Tensor | float) -> bool:
        """Whether every value of ``x`` is exactly a grid value (for tests and asserts)."""
        return bool(torch.equal(self.fake_quantize(x, scale), x))


def _broadcast(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-channel scale (shape (C,)) shaped to multiply ``like`` along axis 0."""
    if scale.dim() == 1 and like.dim() > 1:
        return scale.reshape(-1, *([1] * (like.dim() - 1)))
    return scale


@functools.lru_cache(maxsize=64)
def _unit_table(bits: int, frac_bits: int, device: str) -> torch.Tensor:
    # Built once per format and device: LNS-Madam decodes every weight at every step, and
    # a 16-bit format's table has 32768 entries. Callers index it and never write to it.
    fmt = LNSFormat(bits, frac_bits)
    codes = torch.arange(fmt.levels + 1, dtype=torch.float64, device=device)
    table = torch.exp2(-codes / fmt.gamma)
    table[fmt.zero_code] = 0.0
    return table
